"""The data path on the demo cohort: episodes per second through the real datamodules, with and without
their caches, and the cost of assembling an episode against a training step.

Segmentation (`datamodules.segmentation.SegmentationDataModule`, the ``demo_segmentation`` config): the
preprocessed volumes are held by MONAI ``CacheDataset`` (``cache="memory"``), ``PersistentDataset``
(``cache="disk"``: cold, i.e. filled during setup, then warm in a new process that reads it back) or a plain
``Dataset`` (``cache="none"``: every slice re-reads and re-preprocesses its volume). Classification
(`datamodules.classification.ClassificationDataModule`, ``demo_classification``): the item table is built from
the DICOM/NIfTI volumes and ``lesions.csv``; with a cache folder it is saved (cold) and read back (warm), without
one (``cache_dir=None``) it is built on every setup. Episodes are then served from memory either way.

Throughput is the training DataLoader (``num_workers=0``, the configs' augmentation, batches of ``batch_size``
episodes) after one untimed batch. Assembly is one batch of episodes from sampler indices: cached tensors
-> slices or items (with and without augmentation) -> `collate_episodes`; it is set against a training step
(loss + backward + optimizer step) of ``protonet_seg`` / ``maml_cls`` on such a batch.

Every cache lives in a temporary folder removed at the end; the index of the cohort is scanned once.
Validation and test episodes are switched off (only the training loader is measured), and the classification
benchmark holds no classes out for validation or test.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    DATA_CONFIGS,
    MODEL_CONFIGS,
    BenchOptions,
    Section,
    build_from_config,
    load_yaml,
    log,
    summarize,
    sync_for,
    time_calls,
    try_case,
)

SEG_QUICK = {"spacing": [9.0, 9.0], "slice_size": [32, 32], "min_organ_pixels": 4, "val_fraction": 0.2,
             "test_fraction": 0.3, "n_query": 1, "batch_size": 2}
CLS_QUICK = {"n_query": 1, "batch_size": 2}


def _seg_module(data_dir: str, index_path: str, cache_dir: str, cache: str, episodes: int, quick: bool):
    from datamodules.segmentation import SegmentationDataModule

    init = dict(load_yaml(DATA_CONFIGS / "demo_segmentation.yaml")["data"]["init_args"])
    init.update(root=data_dir, index_path=index_path, cache_dir=cache_dir, cache=cache, num_workers=0,
                episodes_per_epoch=episodes, val_episodes=0, test_episodes=0)
    if quick:
        init.update(SEG_QUICK)
    return SegmentationDataModule(**init)


def _cls_module(data_dir: str, cache_dir: str | None, episodes: int, quick: bool):
    from datamodules.classification import ClassificationDataModule

    init = dict(load_yaml(DATA_CONFIGS / "demo_classification.yaml")["data"]["init_args"])
    init["source"] = {"class_path": "datamodules.sources.lesion_csv.LesionCSV",
                      "init_args": {"csv": str(Path(data_dir) / "lesions.csv")}}
    init.update(cache_dir=cache_dir, num_workers=0, episodes_per_epoch=episodes, val_episodes=0, test_episodes=0,
                val_classes_count=0, test_classes_count=0)
    if quick:
        init.update(CLS_QUICK)
    return ClassificationDataModule(**init)


def scan_case(data_dir: str, index_path: str) -> dict:
    """Seconds to scan the cohort into an index (DICOM headers, NIfTI, sidecars)."""
    from datamodules.indexing.scan import scan_to_file

    t0 = time.perf_counter()
    index = scan_to_file(str(Path(data_dir).resolve()), index_path)
    return {"seconds": time.perf_counter() - t0, "cases": len(index.labelled_cases)}


def _throughput(dm, batches: int) -> dict:
    """Setup seconds (already taken by the caller) aside: episodes per second of the training loader."""
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # untimed: the first batch pays for lazy initialisation
    times = []
    n = 0
    for _ in range(batches):
        t0 = time.perf_counter()
        batch = next(it)
        times.append(time.perf_counter() - t0)
        n += batch.n_tasks
    return {"episodes_per_s": n / sum(times), "episodes": n, "batch_size": dm.hparams.batch_size, **summarize(times)}


def seg_throughput_case(data_dir: str, index_path: str, cache_dir: str, cache: str, batches: int, quick: bool) -> dict:
    """Setup time and training-loader throughput of the segmentation datamodule with one cache setting."""
    dm = _seg_module(data_dir, index_path, cache_dir, cache, episodes=10_000, quick=quick)
    t0 = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    return {"setup_s": setup_s, "cases": len(dm.cases), "slice_size": list(dm.hparams.slice_size),
            **_throughput(dm, batches)}


def cls_throughput_case(data_dir: str, cache_dir: str | None, batches: int, quick: bool) -> dict:
    """Setup time and training-loader throughput of the classification datamodule (item table cached or not)."""
    dm = _cls_module(data_dir, cache_dir, episodes=10_000, quick=quick)
    t0 = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    return {"setup_s": setup_s, "items": len(dm.table), "patch": list(dm.table.images.shape[1:]), **_throughput(dm, batches)}


def _assembly(dataset, sampler, batch_size: int, repeat: int, warmup: int):
    """Median time of one batch: ``batch_size`` specs -> episodes -> `collate_episodes`; and one such batch."""
    from imaging_meta.episode import collate_episodes

    specs = iter(sampler)
    chunks = [[next(specs) for _ in range(batch_size)] for _ in range(repeat + warmup)]
    state = {"i": 0}

    def assemble():
        chunk = chunks[state["i"] % len(chunks)]
        state["i"] += 1
        return collate_episodes([dataset[s] for s in chunk])

    times = time_calls(assemble, repeat, warmup)
    return summarize(times), collate_episodes([dataset[s] for s in chunks[0]])


def _step_time(config: Path, overrides: dict, episode, repeat: int, warmup: int, device: str) -> dict:
    learner, optimizer, _ = build_from_config(config, overrides, device)
    learner.train()
    episode = episode.to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        learner.loss(episode).backward()
        optimizer.step()

    return summarize(time_calls(step, repeat, warmup, sync_for(device)))


def seg_assembly_case(data_dir: str, index_path: str, cache_dir: str, repeat: int, warmup: int, quick: bool,
                      device: str = "cpu") -> dict:
    """Episode assembly (memory cache) against a ``protonet_seg`` training step on the same batch shape."""
    from datamodules.segmentation import SegmentationEpisodeDataset

    dm = _seg_module(data_dir, index_path, cache_dir, "memory", episodes=10_000, quick=quick)
    dm.setup("fit")
    loader = dm.train_dataloader()
    bs = dm.hparams.batch_size
    aug, _ = _assembly(loader.dataset, loader.sampler, bs, repeat, warmup)
    plain_ds = SegmentationEpisodeDataset(loader.dataset.volumes, loader.dataset.cases, None)
    plain, episode = _assembly(plain_ds, loader.sampler, bs, repeat, warmup)
    over = {"in_channels": 1}
    if quick:
        over["backbone_kwargs"] = {"out_channels": 8, "features": [4, 8, 8, 16, 16, 4]}
    step = _step_time(MODEL_CONFIGS / "protonet_seg.yaml", over, episode, repeat, warmup, device)
    shape = f"{bs} tasks x {dm.hparams.n_shot}+{dm.hparams.n_query} slices {'x'.join(map(str, dm.hparams.slice_size))}"
    return {"assembly_aug": aug, "assembly_plain": plain, "step": step, "shape": shape}


def cls_assembly_case(data_dir: str, cache_dir: str, repeat: int, warmup: int, quick: bool, device: str = "cpu") -> dict:
    """Episode assembly (item table in memory) against a ``maml_cls`` training step on the same batch shape."""
    from datamodules.classification import ClassificationEpisodeDataset

    dm = _cls_module(data_dir, cache_dir, episodes=10_000, quick=quick)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    h = dm.hparams
    aug, _ = _assembly(loader.dataset, loader.sampler, h.batch_size, repeat, warmup)
    plain, episode = _assembly(ClassificationEpisodeDataset(loader.dataset.table, None), loader.sampler, h.batch_size,
                               repeat, warmup)
    over = {"n_way": h.n_way, "in_channels": int(dm.table.images.shape[1])}
    if quick:
        over["backbone_kwargs"] = {"width": 8}
    step = _step_time(MODEL_CONFIGS / "maml_cls.yaml", over, episode, repeat, warmup, device)
    size = "x".join(map(str, dm.table.images.shape[2:]))
    shape = f"{h.batch_size} tasks x {h.n_way}-way {h.n_shot}-shot {h.n_query}-query, {size} patches"
    return {"assembly_aug": aug, "assembly_plain": plain, "step": step, "shape": shape}


def run(opts: BenchOptions) -> list[Section]:
    """The throughput table and the assembly table."""
    data_dir = str(Path(opts.data_dir).resolve())
    if not (Path(data_dir) / "lesions.csv").is_file():
        raise FileNotFoundError(f"{data_dir} is not the demo cohort (no lesions.csv): run `make demo` or pass --data-dir")
    quick = opts.quick
    batches = 2 if quick else 10
    none_batches = 1 if quick else 3
    repeat, warmup = (2, 1) if quick else (opts.repeat, opts.warmup)
    rows, data, failures = [], [], []
    asm_rows, asm_data, asm_fail = [], [], []

    def attempt(label: str, fn, kwargs: dict, fails: list[str]) -> dict | None:
        res = try_case(fn, kwargs, opts, label, fails, "data")
        if res is not None:
            log(f"[data] {label}: done")
        return res

    with tempfile.TemporaryDirectory(prefix="imaging-meta-bench-") as tmp:
        index_path = str(Path(tmp) / "index.json")
        scan = attempt("scan", scan_case, {"data_dir": data_dir, "index_path": index_path}, failures)
        if scan is not None:
            rows.append(["segmentation", "scan of the cohort into an index", scan["seconds"], None, None, None])
            data.append({"case": "scan", "result": scan})
            seg = [("memory (MONAI CacheDataset)", "memory", "seg-memory", batches),
                   ("disk cold (PersistentDataset, filled in setup)", "disk", "seg-disk", batches),
                   ("disk warm (PersistentDataset, read back)", "disk", "seg-disk", batches),
                   ("none (plain Dataset, no cache)", "none", "seg-none", none_batches)]
            for label, cache, folder, n in seg:
                res = attempt(f"segmentation {label}", seg_throughput_case,
                              {"data_dir": data_dir, "index_path": index_path, "cache_dir": str(Path(tmp) / folder),
                               "cache": cache, "batches": n, "quick": quick}, failures)
                data.append({"case": f"segmentation {label}", "result": res})
                rows.append(["segmentation", label, *(("error",) * 4 if res is None else
                             (res["setup_s"], res["episodes_per_s"], res["median_ms"], res["episodes"]))])
            res = attempt("segmentation assembly", seg_assembly_case,
                          {"data_dir": data_dir, "index_path": index_path, "cache_dir": str(Path(tmp) / "seg-memory"),
                           "repeat": repeat, "warmup": warmup, "quick": quick, "device": opts.device}, asm_fail)
            asm_data.append({"case": "segmentation", "result": res})
            if res is not None:
                asm_rows.append(["segmentation", res["shape"], "protonet_seg", res["assembly_aug"]["median_ms"],
                                 res["assembly_plain"]["median_ms"], res["step"]["median_ms"],
                                 res["assembly_aug"]["median_ms"] / res["step"]["median_ms"]])
        for label, folder in (("item table cache cold (built, saved)", "cls"), ("item table cache warm (read back)", "cls"),
                              ("no cache (cache_dir None, built every setup)", None)):
            res = attempt(f"classification {label}", cls_throughput_case,
                          {"data_dir": data_dir, "cache_dir": None if folder is None else str(Path(tmp) / folder),
                           "batches": batches * 2, "quick": quick}, failures)
            data.append({"case": f"classification {label}", "result": res})
            rows.append(["classification", label, *(("error",) * 4 if res is None else
                         (res["setup_s"], res["episodes_per_s"], res["median_ms"], res["episodes"]))])
        res = attempt("classification assembly", cls_assembly_case,
                      {"data_dir": data_dir, "cache_dir": str(Path(tmp) / "cls"), "repeat": repeat, "warmup": warmup,
                       "quick": quick, "device": opts.device}, asm_fail)
        asm_data.append({"case": "classification", "result": res})
        if res is not None:
            asm_rows.append(["classification", res["shape"], "maml_cls", res["assembly_aug"]["median_ms"],
                             res["assembly_plain"]["median_ms"], res["step"]["median_ms"],
                             res["assembly_aug"]["median_ms"] / res["step"]["median_ms"]])
    note = (f"Demo cohort {data_dir}; datamodules built from configs/data/demo_*.yaml"
            f"{' shrunk for --quick' if quick else ''}; training loader, num_workers=0, augmentation on; "
            f"{opts.threads} thread(s). Setup: `setup()` (index already scanned); the cold rows fill the cache.")
    return [
        Section("data_throughput", "Data path: episodes per second", [note, __doc__.split("\n\n")[1].replace("\n", " ")],
                ["task", "cache", "setup s", "episodes/s", "median ms per batch", "episodes timed"], rows, data, failures),
        Section("data_assembly", "Data path: episode assembly vs a training step",
                [f"One batch from sampler indices: cached tensors -> episodes -> `collate_episodes`; median of {repeat} "
                 f"after {warmup}. Step: zero_grad + loss + backward + the config's optimizer step on such a batch, "
                 f"device {opts.device}. `ratio` = assembly (augmented) / step."],
                ["task", "batch", "learner", "assembly ms (augmented)", "assembly ms (no augmentation)", "step ms", "ratio"],
                asm_rows, asm_data, asm_fail),
    ]
