"""Every learner config trains and tests from its YAML through `cli_main` (shrunk: tiny nets, a few episodes),
and `imaging-meta classify` runs a trained classification checkpoint on a folder of PNG and DICOM images."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from imaging_meta.commands.cli import cli_main
from tests.helpers import CONFIGS, SMALL_DATA, cls_args, data_args, small_backbone_args, write_png
from tests.imaging_meta.fewshot import lesion_patterns

CLS_MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*_cls.yaml"))
SEG_MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*_seg.yaml") if p.stem != "protonet_seg")  # test_cli has it


@pytest.mark.parametrize("model", CLS_MODELS)
def test_classification_learner_fits_and_tests_from_its_config(model, tmp_path, capsys):
    args = ["fit", *cls_args(tmp_path, model), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--test_after_fit", "true"]
    cli = cli_main(args)
    assert cli.model.learner.task == "classification"
    run_dir = Path(cli.trainer.log_dir)
    res = json.loads((run_dir / "results.json").read_text())
    trained = res["summary"]["trained"]["all"]
    assert res["context"]["metric"] == "acc" and 0.0 <= trained["mean"] <= 1.0 and trained["n_episodes"] == 4
    # where the numbers came from, as evaluate records it (fit's report had none of it; a review, 2026-12-06)
    assert res["context"]["versions"]["torch"] and res["context"]["git_commit"] and res["context"]["torch_threads"] >= 1
    assert res["context"]["device"] == "cpu"  # where it ran (the trainer's accelerator: auto takes a GPU if there is one)
    assert "untrained encoder" in res["summary"]
    md = (run_dir / "results.md").read_text()
    assert "accuracy" in md and "chance: 0.200" in md
    assert res["context"]["precision"] == "32-true" and "\n- precision: 32-true\n" in md  # cpu.yaml's (a review)
    ckpt = next((run_dir / "checkpoints").glob("*.ckpt"))
    # the source that trained the model, beside the one that tested it (a review, 2026-12-07: neither the
    # checkpoint nor a report said which code trained it)
    assert res["context"]["fit_commits"] == [res["context"]["git_commit"]]
    assert f"trained at commit `{res['context']['git_commit']}`" in md
    test = cli_main(["test", *cls_args(tmp_path, model), "--ckpt_path", str(ckpt), "--data.init_args.n_shot", "2"])
    assert test.model.test_summary["trained"]["all"]["n_episodes"] == 4
    assert test.model.fit_commits == [res["context"]["git_commit"]]


@pytest.mark.parametrize("model", SEG_MODELS)
def test_segmentation_learner_fits_and_tests_from_its_config(model, demo_root, demo_index, tmp_path):
    args = ["fit", "--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(CONFIGS / "data/demo_segmentation.yaml"),
            "--config", str(CONFIGS / f"model/{model}.yaml"),
            *small_backbone_args(model),
            *data_args(demo_root, demo_index[1], tmp_path / "cache"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--test_after_fit", "true"]
    cli = cli_main(args)
    res = json.loads((Path(cli.trainer.log_dir) / "results.json").read_text())
    assert res["context"]["metric"] == "dice" and res["context"]["threshold"] == 0.5
    assert "\n- threshold: 0.5\n" in (Path(cli.trainer.log_dir) / "results.md").read_text()
    assert res["summary"]["trained"]["all"]["n_episodes"] == SMALL_DATA["test_episodes"]
    assert "copy support mask" in res["summary"]


def test_classify_writes_one_row_per_query(tmp_path):
    cli = cli_main(["fit", *cls_args(tmp_path, "protonet_cls"), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    ckpt = next(Path(cli.trainer.log_dir, "checkpoints").glob("last*.ckpt"))
    pats = lesion_patterns(3, 1, 28, 99)[:, 0].numpy()
    rng = np.random.default_rng(1)

    def img(c):
        return np.clip(128 + 40 * (pats[c] + 0.3 * rng.standard_normal((28, 28))), 0, 255).astype(np.uint8)

    support = tmp_path / "support"
    for c, name in enumerate(("cyst", "haemangioma", "metastasis")):
        for k in range(2 + c):  # unequal shots per class are allowed
            write_png(support / name / f"s{k}.png", img(c))
    queries = tmp_path / "queries"
    for c in range(3):
        write_png(queries / f"q{c}.png", img(c))
    out = tmp_path / "preds.csv"
    rc = cli_main(["classify", "--checkpoint", str(ckpt), "--support", str(support), "--query", str(queries),
                   "--query", str(queries / "q0.png"), "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["path"]).name for r in rows] == ["q0.png", "q1.png", "q2.png"]  # q0, given twice, once
    assert set(rows[0]) == {"path", "predicted_class", "p_cyst", "p_haemangioma", "p_metastasis"}
    for r in rows:
        probs = [float(r[f"p_{c}"]) for c in ("cyst", "haemangioma", "metastasis")]
        assert abs(sum(probs) - 1) < 1e-4 and r["predicted_class"] == ("cyst", "haemangioma", "metastasis")[int(np.argmax(probs))]
    # the same query gives the same answer whatever else is classified with it
    alone = tmp_path / "alone.csv"
    assert cli_main(["classify", "--checkpoint", str(ckpt), "--support", str(support), "--query", str(queries / "q0.png"),
                     "--out", str(alone)]) == 0
    assert abs(float(next(csv.DictReader(alone.open()))["p_cyst"]) - float(rows[0]["p_cyst"])) <= 2e-6
    # clear errors: a support folder without class subfolders, a missing query
    with pytest.raises(ValueError, match="one subfolder per class"):
        cli_main(["classify", "--checkpoint", str(ckpt), "--support", str(queries), "--query", str(queries), "--out", str(out)])
    with pytest.raises(ValueError, match="no such query"):
        cli_main(["classify", "--checkpoint", str(ckpt), "--support", str(support), "--query", str(tmp_path / "nope.png"),
                  "--out", str(out)])


def test_classify_refuses_a_support_of_the_wrong_way_for_a_fixed_head(tmp_path):
    cli = cli_main(["fit", *cls_args(tmp_path, "maml_cls"), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                    "--trainer.limit_val_batches", "1"])
    ckpt = next(Path(cli.trainer.log_dir, "checkpoints").glob("last*.ckpt"))
    support = tmp_path / "support"
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        write_png(support / name / "x.png", rng.integers(0, 255, (28, 28), dtype=np.uint8))
    with pytest.raises(ValueError, match="5-way"):
        cli_main(["classify", "--checkpoint", str(ckpt), "--support", str(support), "--query", str(support / "a"),
                  "--out", str(tmp_path / "p.csv")])


def fake_results_runs(out, calls, checkpoint="best.ckpt", context=None, sha_of=None):
    """A stand-in for `imaging_meta.commands.results._run`: each fit writes a checkpoint, each test a results.json
    (scores 0.5; the episode file's sha256 ``s<k>``, or ``sha_of[learner]``); ``calls`` collects the commands."""
    import json

    def fake_run(cmd, log):
        calls.append(cmd)
        run = cmd[cmd.index("--trainer.logger.init_args.name") + 1]
        run_dir = out / "runs" / run / "version_0"
        if cmd[3] == "fit":
            (run_dir / "checkpoints").mkdir(parents=True)
            (run_dir / "checkpoints" / checkpoint).write_text(run)
        else:
            flag = "--data.init_args.n_shot"  # absent: the data config's shots (segmentation's one)
            k = int(cmd[cmd.index(flag) + 1]) if flag in cmd else 1
            stat = {"mean": 0.5, "ci95": 0.01, "n_episodes": 10}
            run_dir.mkdir(parents=True)
            sha = (sha_of or {}).get(run.split("-")[0], f"s{k}")
            (run_dir / "results.json").write_text(json.dumps({
                "context": {"n_shot": k, "episode_files": {"test": f"t{k}.json"}, "episodes_sha256": {"test": sha},
                            **(context or {})},
                "summary": {"trained": {"all": stat}, "untrained encoder": {"all": stat}}}))
        return 1.0

    return fake_run


def test_results_table_combines_runs_and_checks_episode_files():
    from imaging_meta.commands.results import combine

    def row(name, k, mean, sha="abc"):
        stat = {"mean": mean, "ci95": 0.02, "n_episodes": 100}
        return {"learner": name, "task": "classification", "n_shot": k, "fit_seconds": 60.0,
                "context": {"n_way": 5, "episode_files": {"test": "/x/test.json"}, "episodes_sha256": {"test": sha, "val": "v"}},
                "summary": {"trained": {"all": stat}, "untrained encoder": {"all": {**stat, "mean": 0.3}}}}

    table = combine([row("protonet_cls", 1, 0.6), row("protonet_cls", 5, 0.8), row("maml_cls", 1, 0.21), row("maml_cls", 5, 0.7)])
    assert "| protonet_cls | 0.600 ± 0.020 | 0.300 ± 0.020 | 0.800 ± 0.020 |" in table
    assert "0.210 ± 0.020 (not above chance)" in table
    with pytest.raises(ValueError, match="different episode files"):
        combine([row("a", 1, 0.5, "x"), row("b", 1, 0.5, "y")])


def test_results_names_the_commits_its_rows_were_tested_and_trained_at_and_marks_a_mix():
    """A review (2026-12-07): `--resume` reused a model trained at one commit and tested a new column at another;
    the table named no commit, and its rows credited the model to the code that tested it."""
    from imaging_meta.commands.results import _commits

    def row(tested, trained):
        return {"context": {"git_commit": tested, "fit_commits": trained}}

    assert _commits([row("a1", ["a1"]), row("a1", ["a1"])]) == "tested at commit a1; trained at commit a1"
    mixed = _commits([row("a1", ["a1"]), row("b2", ["a1"])])
    assert mixed == "**tested at commit a1, b2 (the rows differ)**; trained at commit a1"
    assert _commits([row("b2", ["a1", "b2"]), row("b2", None)]) == (
        "tested at commit b2; **trained at commit a1 then b2, not recorded (the rows differ)**")


@pytest.mark.parametrize("train_shots", ["data", "matched"])
def test_results_trains_once_or_once_per_shot_count(tmp_path, monkeypatch, train_shots):
    """`--train-shots matched` fits one model per test shot count with that many shots and tests each with its
    own checkpoint; the default fits once and tests that checkpoint at every shot count."""
    import argparse

    from imaging_meta.commands import results

    calls: list = []
    fake_run = fake_results_runs(tmp_path / "out", calls, checkpoint="best-epoch=00.ckpt",
                                 context={"device": "cuda:0 (NVIDIA H100)", "torch_threads": 4})
    monkeypatch.setattr(results, "_run", fake_run)
    p = argparse.ArgumentParser()
    results.add_arguments(p)
    sys_args = ["--out", str(tmp_path / "out"), "--learners", "protonet_cls", "--train-shots", train_shots]
    args = p.parse_args(sys_args)
    assert results.run_results(args) == 0
    # the machine line says where the test runs ran, not this host's environment alone (a review)
    assert "; device cuda:0 (NVIDIA H100), torch threads 4\n" in (tmp_path / "out" / "results.md").read_text()
    fits = [c for c in calls if c[3] == "fit"]
    tests = [c for c in calls if c[3] == "test"]
    shots_of = [c[c.index("--data.init_args.n_shot") + 1] if "--data.init_args.n_shot" in c else None for c in fits]
    ckpts = [Path(c[c.index("--ckpt_path") + 1]).parts[-4] for c in tests]
    # a rerun replaces each run folder (the CLI refuses to write over another run's config or report); --resume
    # keeps the finished ones
    stale = tmp_path / "out" / "runs" / ckpts[0] / "version_0" / "config.yaml"
    stale.write_text("the earlier run's")
    calls.clear()
    assert results.run_results(args) == 0 and not stale.exists() and len(calls) == len(fits) + len(tests)
    calls.clear()
    assert results.run_results(p.parse_args([*sys_args, "--resume"])) == 0 and calls == []
    assert "\n\ntested at commit not recorded; trained at commit not recorded\n\n" in (tmp_path / "out" / "results.md").read_text()
    if train_shots == "matched":
        assert shots_of == ["1", "5"] and ckpts == ["protonet_cls-train1shot", "protonet_cls-train5shot"]
        assert "one model per column" in (tmp_path / "out" / "results.md").read_text()
    else:
        assert shots_of == [None] and ckpts == ["protonet_cls", "protonet_cls"]


def test_results_resume_reruns_what_changed_and_reports_a_failed_learner(tmp_path, monkeypatch):
    """--resume reused a run made with other epochs or an earlier checkpoint (a retrained model shown with the
    old scores), one failed learner left no report at all, and a single-episode row (no interval) crashed the
    table (a review)."""
    import argparse
    import json

    from imaging_meta.commands import results

    calls, broken, fits = [], set(), []

    def fake_run(cmd, log):
        calls.append(cmd)
        run = cmd[cmd.index("--trainer.logger.init_args.name") + 1]
        if run.split("-")[0] in broken:
            raise ChildProcessError(f"`imaging-meta {cmd[3]} ...` failed (exit 1); see {log}")
        run_dir = tmp_path / "out" / "runs" / run / "version_0"
        if cmd[3] == "fit":
            (run_dir / "checkpoints").mkdir(parents=True)
            fits.append(run)
            (run_dir / "checkpoints" / "best.ckpt").write_text(f"{run} {len(fits)}")  # each fit another model
        else:
            k = int(cmd[cmd.index("--data.init_args.n_shot") + 1])
            stat = {"mean": 0.5, "ci95": None, "n_episodes": 1}
            run_dir.mkdir(parents=True)
            (run_dir / "results.json").write_text(json.dumps({
                "context": {"n_shot": k, "n_way": 2, "episode_files": {"test": f"t{k}.json"},
                            "episodes_sha256": {"test": f"s{k}"}},
                "summary": {"trained": {"all": stat}, "untrained encoder": {"all": stat}}}))
        return 1.0

    monkeypatch.setattr(results, "_run", fake_run)
    p = argparse.ArgumentParser()
    results.add_arguments(p)
    base = ["--out", str(tmp_path / "out"), "--learners", "protonet_cls", "--shots", "1"]
    assert results.run_results(p.parse_args(base)) == 0
    calls.clear()
    assert results.run_results(p.parse_args([*base, "--resume"])) == 0 and calls == []
    # other epochs: the fit runs again, and so does the test of its new checkpoint
    assert results.run_results(p.parse_args([*base, "--resume", "--cls-epochs", "9"])) == 0
    assert [c[3] for c in calls] == ["fit", "test"]
    calls.clear()
    (tmp_path / "out" / "runs" / "protonet_cls" / "version_0" / "checkpoints" / "best.ckpt").write_text("retrained")
    assert results.run_results(p.parse_args([*base, "--resume", "--cls-epochs", "9"])) == 0
    assert [c[3] for c in calls] == ["test"]  # the checkpoint changed: tested again
    broken.add("maml_cls")
    args = p.parse_args(["--out", str(tmp_path / "out"), "--learners", "maml_cls", "protonet_cls", "--shots", "1",
                         "--resume", "--cls-epochs", "9"])
    assert results.run_results(args) == 1
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| protonet_cls | 0.500 ± n/a" in report or "| protonet_cls | 0.500" in report
    assert "- maml_cls: failed, no result: `imaging-meta fit ...` failed (exit 1)" in report
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["arguments"]["cls_epochs"] == 9 and saved["arguments"]["resume"] is True  # what made the table


def test_results_keeps_other_learners_rows_and_refuses_what_it_sets_itself(tmp_path, monkeypatch):
    """A review of `results`: rerunning a few learners into a table kept only those rows (the docs' own rerun of
    three learners would have cut the table to three); ``--extra --data.init_args.n_shot 3`` scored every shot
    column 3-shot under its own label; a misspelt config later in the list stopped the command after the others'
    runs, without naming the file; learners on different episode files left no table and no record of which."""
    import argparse
    import json
    import shutil

    from imaging_meta.commands import results

    calls: list = []
    sha_of: dict = {}
    monkeypatch.setattr(results, "_run", fake_results_runs(tmp_path / "out", calls, context={"n_way": 5}, sha_of=sha_of))
    p = argparse.ArgumentParser()
    results.add_arguments(p)
    out = tmp_path / "out"
    base = ["--out", str(out), "--shots", "1", "--cls-epochs", "1"]
    assert results.run_results(p.parse_args([*base, "--learners", "pixels_cls"])) == 0
    assert results.run_results(p.parse_args([*base, "--learners", "histogram_cls"])) == 0
    table = (out / "results.md").read_text()
    assert "| histogram_cls |" in table and "| pixels_cls |" in table
    # another number of epochs is another table: it replaces the earlier one
    assert results.run_results(p.parse_args([*base[:-1], "2", "--learners", "histogram_cls"])) == 0
    assert "| pixels_cls |" not in (out / "results.md").read_text()

    calls.clear()
    for extra in (["--data.init_args.n_shot", "3"], ["--data.n_shot=3"], ["--trainer.max_epochs", "4"]):
        with pytest.raises(ValueError, match="results` sets"):
            results.run_results(p.parse_args([*base, "--learners", "pixels_cls", "--extra", *extra]))
    assert calls == []
    # a segmentation table takes its shots from --extra (results sets none for it), as before
    from imaging_meta.tasks import get_task

    results.check_extra(["--data.init_args.n_shot", "3"], [get_task("segmentation")])
    with pytest.raises(ValueError, match="results` sets"):
        results.check_extra(["--data.n_shot", "3"], [get_task("segmentation"), get_task("classification")])

    configs = tmp_path / "configs"
    shutil.copytree(results.CONFIGS, configs)
    (configs / "model" / "typo_cls.yaml").write_text(
        (configs / "model" / "pixels_cls.yaml").read_text().replace("DescriptorClassifier", "DescriptorClassifer"))
    if "DescriptorClassifer" not in (configs / "model" / "typo_cls.yaml").read_text():
        pytest.skip("pixels_cls.yaml names its learner otherwise")
    with pytest.raises(ValueError, match=r"typo_cls\.yaml: "):
        results.run_results(p.parse_args([*base, "--configs", str(configs), "--learners", "pixels_cls", "typo_cls"]))
    assert calls == []  # refused before any run

    sha_of["histogram_cls"] = "other"
    shutil.rmtree(out)
    with pytest.raises(ValueError, match=r"different episode files \(other: histogram_cls; s1: pixels_cls\)"):
        results.run_results(p.parse_args([*base, "--learners", "pixels_cls", "histogram_cls"]))
    saved = json.loads((out / "results.json").read_text())
    assert {r["learner"] for r in saved["rows"]} == {"pixels_cls", "histogram_cls"} and "error" in saved
    assert "no table" in (out / "results.md").read_text()


def test_compare_names_the_checkpoint_a_test_report_scored(tmp_path):
    """A test of `imaging-meta results` lies in a run folder of its own: compare suggested evaluating a best.ckpt
    beside it that does not exist (a review), where the report names the checkpoint it scored."""
    import json

    from imaging_meta.evaluation.reports import compare_runs

    run = tmp_path / "pixels_cls-test-1shot" / "version_0"
    run.mkdir(parents=True)
    ckpt = tmp_path / "pixels_cls" / "version_0" / "checkpoints" / "best.ckpt"
    (run / "results.json").write_text(json.dumps({"context": {"checkpoint": str(ckpt), "shots": [1]},
                                                  "summary": {}}))
    with pytest.raises(ValueError, match="test report") as e:
        compare_runs([run])
    assert f"--checkpoint {ckpt} --out DIR" in str(e.value)


def test_results_finds_the_shipped_configs_and_names_a_folder_without_any(tmp_path):
    """The default --configs is the package's own (an installed package has no repository configs/ beside it: it
    looked in site-packages/configs and failed on a missing results.json), and a folder without model configs is
    named with the fix."""
    from imaging_meta.commands import results
    from imaging_meta.commands.configs import SHIPPED

    assert results.CONFIGS == SHIPPED and "protonet_cls" in results._learners(results.CONFIGS, None)
    with pytest.raises(ValueError, match=r"no model configs in .*configs --copy"):
        results._learners(tmp_path, None)


def test_results_adds_up_the_training_time_of_one_model_per_column():
    """A review: under --train-shots matched the table showed the last column's meta-training time for a learner
    trained once per column (1.0 min for 10 + 1 min)."""
    from imaging_meta.commands.results import combine

    def summary(mean):
        stat = {"mean": mean, "ci95": 0.01, "n_episodes": 10}
        return {"trained": {"all": stat}, "untrained encoder": {"all": stat}}

    ctx = {"n_way": 5, "episodes": "e.json", "episodes_sha256": "abc"}
    rows = [{"learner": "protonet_cls", "task": "classification", "n_shot": k, "fit_seconds": t, "train_shots": k,
             "context": ctx, "summary": summary(0.5)} for k, t in ((1, 600.0), (5, 60.0))]
    line = next(x for x in combine(rows).splitlines() if x.startswith("| protonet_cls |"))
    assert line.endswith("| 11.0 min (2 models) |")
    once = [{**r, "train_shots": None, "fit_seconds": 600.0} for r in rows]  # one model tested at both shots
    assert next(x for x in combine(once).splitlines() if x.startswith("| protonet_cls |")).endswith("| 10.0 min |")


def test_results_passes_its_trainer_data_configs_and_data_folder_to_every_run(tmp_path, monkeypatch):
    """--trainer, --cls-data, --seg-data and --data-dir reach each fit and test (a review: replaced by their
    defaults, no test noticed)."""
    import argparse

    from imaging_meta.commands import results

    calls: list = []
    monkeypatch.setattr(results, "_run", fake_results_runs(tmp_path / "out", calls))
    p = argparse.ArgumentParser()
    results.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "out"), "--learners", "protonet_cls", "protonet_seg", "--trainer",
                         "default", "--data-dir", str(tmp_path / "cohort"), "--seg-data", "demo_segmentation",
                         "--cls-data", "demo_classification"])
    assert results.run_results(args) == 0
    configs = Path(results.__file__).resolve().parents[1] / "configs"
    for cmd in calls:
        given = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
        assert str(configs / "trainer" / "default.yaml") in given
        seg = any(g.endswith("protonet_seg.yaml") for g in given)
        assert str(configs / "data" / ("demo_segmentation.yaml" if seg else "demo_classification.yaml")) in given
        data_arg = cmd[cmd.index("--data.init_args.root") + 1] if seg else \
            cmd[cmd.index("--data.init_args.source.init_args.csv") + 1]
        assert data_arg == (str(tmp_path / "cohort") if seg else str(tmp_path / "cohort" / "lesions.csv"))
    assert {c[3] for c in calls} == {"fit", "test"}
    calls.clear()  # other data configs than the defaults: each run reads the one named
    monkeypatch.setattr(results, "_run", fake_results_runs(tmp_path / "out2", calls))
    args = p.parse_args(["--out", str(tmp_path / "out2"), "--learners", "protonet_cls", "protonet_seg",
                         "--seg-data", "folder_segmentation", "--cls-data", "folder_classification"])
    assert results.run_results(args) == 0
    for cmd in calls:
        given = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
        seg = any(g.endswith("protonet_seg.yaml") for g in given)
        assert str(configs / "data" / ("folder_segmentation.yaml" if seg else "folder_classification.yaml")) in given
