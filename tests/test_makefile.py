"""What the Makefile's housekeeping targets remove."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_clean_removes_the_demo_cohort_not_prepared_datasets_nor_a_users_data_dir():
    """A review: ``make clean`` ran ``rm -rf data``, taking the Synapse, CHAOS and MedMNIST folders that
    docs/recipes.md prepares under data/. It removes the generated demo cohort, data/demo, alone, and never the
    DATA_DIR a user points at their own scans."""
    dry = subprocess.run(["make", "-n", "clean", "DATA_DIR=/data/my_cohort"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    removed = next(line.split()[2:] for line in dry.splitlines() if line.startswith("rm -rf"))
    assert "data/demo" in removed and "runs" in removed
    assert "data" not in removed and "/data/my_cohort" not in removed
