"""Every option of the tool commands reaches the function it controls (a review broke each pass-through in turn
and found many that no test noticed: `--device cpu` would still take the GPU, `--salt` would give other
pseudonyms without a word). Each command runs once with every option away from its default, the called function
replaced by one that records its arguments."""

from pathlib import Path

import pytest

from imaging_meta.commands.cli import cli_main
from imaging_meta.volume.segmenter import ScanOptions


def recorder(monkeypatch, module, name: str, result=None) -> dict:
    received: dict = {}

    def recorded(*args, **kwargs):
        received.update(kwargs, args=args)
        return result(*args, **kwargs) if callable(result) else result

    monkeypatch.setattr(module, name, recorded)
    return received


@pytest.mark.parametrize("flags, expected", [
    ([], {"largest_component": True, "empty_if_unlike": False, "adapt_seed": 0, "adapt_steps": 40,
          "scale": "structure", "label_value": None, "max_support_slices": 12}),
    (["--no-largest-component", "--empty-if-unlike", "--adapt-seed", "7", "--adapt-steps", "3", "--scale",
      "checkpoint", "--label-value", "2", "--max-support-slices", "5", "--modality", "MR"],
     {"largest_component": False, "empty_if_unlike": True, "adapt_seed": 7, "adapt_steps": 3, "scale": "checkpoint",
      "label_value": 2, "max_support_slices": 5, "modality": "MR"}),
])
def test_the_command_lines_options_reach_segment(tmp_path, monkeypatch, flags, expected):
    from imaging_meta.commands import segment as command

    received = recorder(monkeypatch, command, "segment", [])
    rc = cli_main(["segment", "--checkpoint", str(tmp_path / "m.ckpt"), "--support-image", "s.nii.gz",
                   "--support-label", "l.nii.gz", "--query", "q.nii.gz", "--out", str(tmp_path / "out"), *flags])
    assert rc == 0
    assert {k: received.get(k) for k in expected} == expected


def test_segment_passes_the_scan_options_and_the_device(tmp_path, monkeypatch):
    from imaging_meta.commands import segment as command

    got = recorder(monkeypatch, command, "segment", [])
    assert cli_main(["segment", "--checkpoint", "m.ckpt", "--support-image", "s.nii.gz", "--support-label", "l.nii.gz",
                     "--query", "q.nii.gz", "--out", str(tmp_path), "--device", "cpu", "--no-intensity",
                     "--no-negative-slices", "--z-smoothing", "0.1", "--max-support-slices", "3", "--keep-empty",
                     "--pooled-calibration", "--position-prior"]) == 0
    assert got["device"] == "cpu"
    assert got["options"] == ScanOptions(intensity=False, negatives=False, smooth_z=0.1, max_support_slices=3,
                                         relax_empty=False, across_scans=False, position=True)


def test_classify_passes_its_options(tmp_path, monkeypatch):
    from imaging_meta.commands import classify as command

    got = recorder(monkeypatch, command, "classify", tmp_path / "p.csv")
    assert cli_main(["classify", "--checkpoint", "m.ckpt", "--support", "s", "--query", "q", "--out",
                     str(tmp_path / "p.csv"), "--device", "cpu", "--finetune-steps", "5"]) == 0
    assert (got["device"], got["finetune_steps"], got["space"]) == ("cpu", 5, "auto")
    assert got["args"][:3] == ("m.ckpt", "s", ["q"])


def test_evaluate_passes_every_option(tmp_path, monkeypatch):
    from imaging_meta.commands import evaluate as command

    md = tmp_path / "results.md"
    md.write_text("report\n")
    got = recorder(monkeypatch, command, "evaluate", (tmp_path / "results.json", md))
    assert cli_main(["evaluate", "--checkpoint", "m.ckpt", "--out", str(tmp_path / "run"), "--shots", "2", "3",
                     "--episodes", "7", "--seed", "5", "--data-config", "d.yaml", "--data-root", "root",
                     "--cache-dir", "cache", "--batch-size", "3", "--no-baselines", "--panel", "1", "--name", "mine",
                     "--device", "cpu", "--salt", "pepper", "--interval", "episode-t", "--scan-protocols",
                     "oracle_extent", "--scan-pairs", "4", "--scan-pairing", "cross_site", "--adapt-steps", "2",
                     "--scale", "structure", "--log-dir", "logs"]) == 0
    expected = {"shots": [2, 3], "episodes": 7, "seed": 5, "data_config": "d.yaml", "data_root": "root",
                "cache_dir": "cache", "batch_size": 3, "device": "cpu", "baselines": False, "n_panel": 1,
                "name": "mine", "salt": "pepper", "interval": "episode-t", "scan_protocols": ["oracle_extent"],
                "scan_pairs": 4, "adapt_steps": 2, "scan_pairing": "cross_site", "scan_scale": "structure",
                "log_dir": "logs"}
    assert {k: got.get(k) for k in expected} == expected


def test_demo_passes_its_seed_and_size(tmp_path, monkeypatch):
    from datamodules.synthetic import demo

    got = recorder(monkeypatch, demo, "generate_demo_cohort", "done")
    assert cli_main(["demo", "--out", str(tmp_path / "demo"), "--seed", "3", "--patients-per-site", "2"]) == 0
    assert (got["seed"], got["patients_per_site"]) == (3, 2) and got["args"] == (Path(tmp_path / "demo"),)


def test_scan_passes_its_site_fields_and_salt(tmp_path, monkeypatch):
    from datamodules.indexing import scan

    class Index:
        def summary(self) -> str:
            return "0 cases"

    got = recorder(monkeypatch, scan, "scan_to_file", Index())
    assert cli_main(["scan", str(tmp_path), "--out", str(tmp_path / "index.json"), "--site-fields", "manufacturer",
                     "--salt", "pepper"]) == 0
    assert got["site_fields"] == ("manufacturer",) and got["salt"] == "pepper"


@pytest.fixture(autouse=True)
def _no_salt_from_the_environment(monkeypatch):
    monkeypatch.delenv("IMAGING_META_SALT", raising=False)
