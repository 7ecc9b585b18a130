"""The disk cache's first fill under DDP (`datamodules.segmentation._warmed`), on 2 CPU processes (gloo): the
ranks share the fill, no item is written twice, and a fill longer than the process group's timeout does not
stop the run (a review, 2026-12-06: rank 0 filled alone while the others waited in a barrier bound by
Lightning's 30-minute timeout, and a real cohort's first fill killed the run as an 'internal error')."""

import datetime
import json
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


class _SlowItems:
    """Eight items; reading one records it in the rank's file, and rank 0's items take long."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.folder, self.rank = folder, rank

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        if self.rank == 0:
            time.sleep(0.8)  # four items: 3.2 s, beyond the group's 1.5 s timeout
        with open(self.folder / f"rank{self.rank}.txt", "a") as f:
            f.write(f"{i}\n")
        return i


def _rank(rank: int, folder: str) -> None:
    from datamodules.segmentation import _warmed

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=1.5))
    try:
        _warmed(_SlowItems(Path(folder), rank))
        (Path(folder) / f"done{rank}.json").write_text(json.dumps(time.time()))
    finally:
        dist.destroy_process_group()


def test_the_ranks_share_the_first_cache_fill_and_outwait_the_group_timeout(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path),), nprocs=2, join=True)
    filled = [sorted(int(x) for x in (tmp_path / f"rank{r}.txt").read_text().split()) for r in (0, 1)]
    assert filled == [[0, 2, 4, 6], [1, 3, 5, 7]]  # each item once, by one rank
    assert all((tmp_path / f"done{r}.json").exists() for r in (0, 1))  # rank 1 waited 3 s without a timeout
