"""Shared fixtures: a small demo cohort, generated once per test session into a temporary folder."""

import pytest
import torch

# one thread: these are tiny tensors, and two threads on a shared 2-core machine spin-wait (measured 10-100x slower)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    from datamodules.demo import generate_demo_cohort

    root = tmp_path_factory.mktemp("demo") / "cohort"
    generate_demo_cohort(root, seed=0, patients_per_site=3)
    return root


@pytest.fixture(scope="session")
def demo_index(demo_root, tmp_path_factory):
    from datamodules.scan import scan_to_file

    path = tmp_path_factory.mktemp("index") / "index.json"
    return scan_to_file(demo_root, path), path


SMALL_DATA = dict(
    protocol="cross_organ",
    test_organs=["spleen", "kidney_left"],
    val_fraction=0.2,
    test_fraction=0.3,
    n_shot=1,
    n_query=1,
    episodes_per_epoch=8,
    val_episodes=4,
    test_episodes=6,
    batch_size=2,
    spacing=(9.0, 9.0),
    slice_size=(32, 32),
    min_organ_pixels=4,
)
