"""`imaging-meta results` end to end with its runs faked (`fake_results_runs` stands in for the fit and test
subprocesses): what reaches each run, what ``--resume`` reuses, which failures it reports while the other learners
still run, and the exact markdown it writes.

Found by a mutation review of `imaging_meta.commands.results` (2026-12): each test here fails when one line of the
command is changed in a way the earlier tests let through.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from imaging_meta.commands import results
from tests.imaging_meta.test_learner_configs import fake_results_runs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    results.add_arguments(p)
    return p


def _run_results(out: Path, *argv: str) -> int:
    return results.run_results(_parser().parse_args(["--out", str(out), *argv]))


def _table_lines(report: str) -> list[str]:
    return [x for x in report.splitlines() if x.startswith("|")]


def test_extra_setting_a_logger_option_is_refused_before_any_run(tmp_path, monkeypatch):
    """``--extra --trainer.logger.init_args.save_dir x`` moved every run out of ``OUT/runs``, where `results` then
    looked for their checkpoints and reports: it must be refused, like the logger itself, before any run."""
    calls: list = []
    monkeypatch.setattr(results, "_run", fake_results_runs(tmp_path / "out", calls))
    for extra in (["--trainer.logger.init_args.save_dir", "x"], ["--trainer.logger.save_dir=x"]):
        with pytest.raises(ValueError, match=r"results` sets trainer\.logger for each run itself; use --out"):
            _run_results(tmp_path / "out", "--learners", "pixels_cls", "--shots", "1", "--extra", *extra)
    assert calls == []


def test_a_run_that_wrote_only_last_ckpt_is_tested_with_it(tmp_path, monkeypatch):
    """A fit without validation writes last.ckpt and no best.ckpt: the learner was reported failed ("training
    wrote no checkpoint") although its model was there."""
    calls: list = []
    monkeypatch.setattr(results, "_run", fake_results_runs(tmp_path / "out", calls, checkpoint="last.ckpt"))
    assert _run_results(tmp_path / "out", "--learners", "pixels_cls", "--shots", "1") == 0
    tests = [c for c in calls if c[3] == "test"]
    assert [Path(c[c.index("--ckpt_path") + 1]).name for c in tests] == ["last.ckpt"]
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| pixels_cls | 0.500 ± 0.010 |" in report and "failed" not in report


def test_resume_runs_again_after_a_config_file_is_edited(tmp_path, monkeypatch):
    """``--resume`` compared the command alone: an edited model config (same file name) kept the old model and
    its scores in the table."""
    configs = tmp_path / "configs"
    shutil.copytree(results.CONFIGS, configs)
    calls: list = []
    monkeypatch.setattr(results, "_run", fake_results_runs(tmp_path / "out", calls))
    argv = ["--configs", str(configs), "--learners", "pixels_cls", "--shots", "1", "--resume"]
    assert _run_results(tmp_path / "out", *argv) == 0
    calls.clear()
    assert _run_results(tmp_path / "out", *argv) == 0 and calls == []  # nothing changed: reused
    model = configs / "model" / "pixels_cls.yaml"
    model.write_text(model.read_text() + "\n# edited\n")
    assert _run_results(tmp_path / "out", *argv) == 0
    assert [c[3] for c in calls] == ["fit", "test"]


def test_extra_arguments_reach_every_fit_and_test(tmp_path, monkeypatch):
    """``--extra`` is "further arguments for every fit and test": dropped from the fit, a model was trained
    without them and tested with them."""
    calls: list = []
    monkeypatch.setattr(results, "_run", fake_results_runs(tmp_path / "out", calls))
    assert _run_results(tmp_path / "out", "--learners", "pixels_cls", "--extra", "--seed_everything", "7") == 0
    assert sorted(c[3] for c in calls) == ["fit", "test", "test"]
    for cmd in calls:
        assert cmd[-2:] == ["--seed_everything", "7"], cmd[3]


def test_a_test_scored_at_another_shot_count_than_its_column_is_reported_failed(tmp_path, monkeypatch):
    """A config given with ``--extra`` that sets its own shots made the 1-shot column's test score 3-shot episodes:
    the table showed 3-shot scores under the 1-shot label."""
    calls: list = []
    monkeypatch.setattr(results, "_run", fake_results_runs(tmp_path / "out", calls, context={"n_shot": 3}))
    assert _run_results(tmp_path / "out", "--learners", "pixels_cls", "--shots", "1") == 1
    report = (tmp_path / "out" / "results.md").read_text()
    assert "- pixels_cls: failed, no result: " in report
    assert "tested 3-shot, where this column is 1-shot" in report
    assert "| pixels_cls |" not in report


def test_the_segmentation_table_names_the_shot_count_its_tests_report(tmp_path, monkeypatch):
    """Segmentation tests at the data config's shots (no ``--shots``): its column is the shot count the test
    reports, not "None-shot"."""
    calls: list = []
    monkeypatch.setattr(results, "_run", fake_results_runs(tmp_path / "out", calls))
    assert _run_results(tmp_path / "out", "--learners", "protonet_seg") == 0
    report = (tmp_path / "out" / "results.md").read_text()
    header = next(x for x in _table_lines(report) if x.startswith("| learner |"))
    assert header.startswith("| learner | 1-shot trained | 1-shot untrained |")
    assert "None-shot" not in report and "- 1-shot: 10 episodes from `t1.json`" in report
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["n_shot"] for r in saved["rows"]] == [1]


def test_one_model_tested_at_two_shot_counts_is_one_model_in_the_table(tmp_path, monkeypatch):
    """By default a learner is trained once and tested at every shot count: the table added its training time up
    as "(2 models)" and said it was trained with the shot count of each column."""
    calls: list = []
    monkeypatch.setattr(results, "_run", fake_results_runs(tmp_path / "out", calls))
    assert _run_results(tmp_path / "out", "--learners", "pixels_cls", "--shots", "1", "5") == 0
    report = (tmp_path / "out" / "results.md").read_text()
    row = next(x for x in _table_lines(report) if x.startswith("| pixels_cls |"))
    assert row.endswith("| 0.0 min |")  # one fit of 1 s, not two
    assert "models)" not in report and "one model per column" not in report
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["train_shots"] for r in saved["rows"]] == ["data config", "data config"]


def test_a_fit_that_wrote_no_checkpoint_fails_that_learner_alone(tmp_path, monkeypatch):
    """A fit that exited 0 without a checkpoint stopped the whole command with a traceback: the learners after it
    never ran and no table was written."""
    calls: list = []
    inner = fake_results_runs(tmp_path / "out", calls)

    def fake_run(cmd, log):
        seconds = inner(cmd, log)
        run = cmd[cmd.index("--trainer.logger.init_args.name") + 1]
        if cmd[3] == "fit" and run == "pixels_cls":
            (tmp_path / "out" / "runs" / run / "version_0" / "checkpoints" / "best.ckpt").unlink()
        return seconds

    monkeypatch.setattr(results, "_run", fake_run)
    assert _run_results(tmp_path / "out", "--learners", "pixels_cls", "histogram_cls", "--shots", "1") == 1
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| histogram_cls | 0.500 ± 0.010 |" in report and "| pixels_cls |" not in report
    assert "- pixels_cls: failed, no result: " in report and "training wrote no checkpoint" in report
    assert [c[3] for c in calls if "pixels_cls" in c[c.index("--trainer.logger.init_args.name") + 1]] == ["fit"]


def test_rerunning_one_learner_with_resume_keeps_the_others_rows(tmp_path, monkeypatch):
    """``--resume`` only chooses which runs to reuse: a rerun of one learner with it was taken for another table,
    and the other learners' rows were dropped."""
    calls: list = []
    monkeypatch.setattr(results, "_run", fake_results_runs(tmp_path / "out", calls))
    base = ["--shots", "1", "--cls-epochs", "1"]
    assert _run_results(tmp_path / "out", *base, "--learners", "pixels_cls") == 0
    assert _run_results(tmp_path / "out", *base, "--learners", "histogram_cls", "--resume") == 0
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| pixels_cls |" in report and "| histogram_cls |" in report
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(r["learner"] for r in saved["rows"]) == ["histogram_cls", "pixels_cls"]


def test_the_markdown_names_the_test_episode_files_and_its_tables_are_well_formed(tmp_path, monkeypatch):
    """The episodes line under a table named ``None`` (the validation file, absent from a test report) instead of
    the test episode file each column was scored on; and a separator row one cell short of the header broke the
    markdown table (rendered as text)."""
    calls: list = []
    monkeypatch.setattr(results, "_run", fake_results_runs(tmp_path / "out", calls, context={"n_way": 2}))
    assert _run_results(tmp_path / "out", "--learners", "pixels_cls", "protonet_seg", "--shots", "1", "5") == 0
    report = (tmp_path / "out" / "results.md").read_text()
    assert "- 1-shot: 10 episodes from `t1.json` (sha256 s1…)" in report
    assert "- 5-shot: 10 episodes from `t5.json` (sha256 s5…)" in report
    assert "`None`" not in report
    lines = report.splitlines()
    headers = [i for i, x in enumerate(lines) if x.startswith("| learner |")]
    assert len(headers) == 2  # classification and segmentation
    for i in headers:
        header, separator, row = lines[i], lines[i + 1], lines[i + 2]
        assert set(separator) == {"|", "-"}
        assert separator.count("|") == header.count("|") == row.count("|")
