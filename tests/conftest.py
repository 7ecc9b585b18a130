"""Shared fixtures: a small demo cohort, generated once per test session into a temporary folder; and guards
that the suite writes nothing into the repository (every test writes under ``tmp_path``) and that no test leaves
the process as another Lightning rank than 0."""

import os
from pathlib import Path

import pytest
import torch

# one thread: these are tiny tensors, and two threads on a shared 2-core machine spin-wait (measured 10-100x slower)
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def repository_root_stays_clean():
    """Fail the session when the repository root gains an entry (say ``checkpoints/`` from a Trainer without
    ``default_root_dir``, or ``lightning_logs/``): tests write under ``tmp_path`` only."""
    before = set(os.listdir(REPO_ROOT))
    yield
    new = sorted(set(os.listdir(REPO_ROOT)) - before)
    if new:
        pytest.fail(f"the test run wrote {new} into the repository root {REPO_ROOT}; write under tmp_path "
                    "(a Trainer needs default_root_dir=tmp_path when its logger is off or replaced)", pytrace=False)


@pytest.fixture(autouse=True)
def no_proxy_between_tests_and_their_loopback_servers():
    """The download tests talk to servers on 127.0.0.1; an http_proxy of the machine running the tests took their
    requests elsewhere (a proxy's 502 instead of the failure under test; a review). The environment is restored
    by hand, not with monkeypatch: requesting monkeypatch here set it up before `process_stays_rank_zero`, whose
    check then ran before the tests' own monkeypatching was undone."""
    names = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "no_proxy", "NO_PROXY")
    saved = {name: os.environ.get(name) for name in names}
    for name in names[:6]:
        os.environ.pop(name, None)
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "*"
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def process_stays_rank_zero():
    """Fail a test that leaves Lightning's process-wide rank other than 0 (a Trainer built for another rank, as a
    simulated cluster job does): every later test would silently log nothing."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    yield
    rank = getattr(rank_zero_only, "rank", 0)
    if rank != 0:
        rank_zero_only.rank = 0
        pytest.fail(f"the test left lightning's rank_zero_only.rank at {rank}; restore it (monkeypatch.setattr)",
                    pytrace=False)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    from datamodules.synthetic.demo import generate_demo_cohort

    root = tmp_path_factory.mktemp("demo") / "cohort"
    generate_demo_cohort(root, seed=0, patients_per_site=3)
    return root


@pytest.fixture(scope="session")
def demo_index(demo_root, tmp_path_factory):
    from datamodules.indexing.scan import scan_to_file

    path = tmp_path_factory.mktemp("index") / "index.json"
    return scan_to_file(demo_root, path), path


@pytest.fixture(scope="session")
def legacy_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints in the layout main's code wrote before the restructuring (`tests.helpers.legacy_checkpoint`):
    ``protonet_seg`` (its data folders gone) and ``protonet_cls``, by name."""
    from tests.helpers import legacy_checkpoint

    folder = tmp_path_factory.mktemp("legacy")
    return {name: legacy_checkpoint(name, folder / f"{name}.ckpt", "/gone/cohort", "/gone/cache")
            for name in ("protonet_seg", "protonet_cls")}

