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


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_evaluate_evaluates_each_protocols_newest_run(tmp_path):
    """A review: `make evaluate` took the newest best.ckpt of any earlier run, so a new fit that saved no best.ckpt
    (it never validated) had an earlier run's model evaluated under its name. It takes the newest run's best.ckpt,
    else that run's last.ckpt, and says so."""
    import os
    import time

    runs = tmp_path / "ev" / "runs" / "m-in_domain"
    old = runs / "version_0" / "checkpoints" / "best.ckpt"
    new = runs / "version_1" / "checkpoints" / "last.ckpt"
    for i, f in enumerate((old, new)):
        f.parent.mkdir(parents=True)
        f.write_text("x")
        os.utime(f.parents[1], (time.time() - 100 + 50 * i,) * 2)
    fake = tmp_path / "venv"
    (fake / "bin").mkdir(parents=True)
    (fake / ".installed").write_text("")
    (fake / "bin" / "imaging-meta").write_text("#!/bin/sh\necho \"cli $*\"\n")
    (fake / "bin" / "imaging-meta").chmod(0o755)
    out = subprocess.run(["make", "-o", f"{fake}/.installed", "evaluate", f"VENV={fake}", "PROTOCOLS=in_domain",
                          "MODEL=m", f"EVAL_DIR={tmp_path / 'ev'}"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    evaluated = next(line for line in out.splitlines() if line.startswith("cli evaluate"))
    assert f"--checkpoint {new}" in evaluated and "no best.ckpt" in out
    best = runs / "version_1" / "checkpoints" / "best.ckpt"
    best.write_text("x")
    out = subprocess.run(["make", "-o", f"{fake}/.installed", "evaluate", f"VENV={fake}", "PROTOCOLS=in_domain",
                          "MODEL=m", f"EVAL_DIR={tmp_path / 'ev'}"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert f"--checkpoint {best}" in next(line for line in out.splitlines() if line.startswith("cli evaluate"))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_a_venv_without_pip_is_made_again_in_place(tmp_path):
    """A review: a .venv whose python runs but has no pip (a first make stopped during ensurepip) passed `test -x`,
    and every later target failed with "No module named pip" until the user removed it by hand."""
    log = tmp_path / "log"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(
        f'#!/bin/sh\nif [ "$*" = "-m pip --version" ]; then exit 1; fi\necho "venv python $*" >> {log}\n')
    system = tmp_path / "python3"
    system.write_text(f'#!/bin/sh\necho "system python $*" >> {log}\n')
    for f in (venv / "bin" / "python", system):
        f.chmod(0o755)
    subprocess.run(["make", f"{venv}/.installed", f"VENV={venv}", f"PYTHON={system}"], cwd=ROOT, capture_output=True,
                   text=True, check=True)
    calls = log.read_text().splitlines()
    assert calls[0] == f"system python -m venv {venv}" and calls[1].startswith("venv python -m pip install")
