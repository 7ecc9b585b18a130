"""`imaging-meta evaluate` and `compare`: metrics against hand-computed values, reproducibility to the last
digit, the split guard, the report files, on checkpoints written by a real (tiny) fit."""

import csv
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image

from datamodules.classification import ClassificationDataModule
from datamodules.segmentation import SegmentationDataModule
from imaging_meta.checkpoint_io import CheckpointError
from imaging_meta.commands.cli import cli_main
from imaging_meta.commands.evaluate import evaluate
from imaging_meta.evaluation.metrics import (
    balanced_accuracy,
    calibration_bins,
    expected_calibration_error,
    hausdorff95_mm,
    macro_auc,
)
from imaging_meta.evaluation.reports import compare_runs
from imaging_meta.evaluation.statistics import ece_bootstrap, evaluation_summary, summarize
from imaging_meta.learners.metric.protonet import PrototypicalNetwork
from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter
from imaging_meta.module import EpisodicModule
from imaging_meta.tasks import CLASSIFICATION
from tests.helpers import SMALL_DATA, write_folder


# ------------------------------------------------------------------------------------------ metrics
def test_hd95_in_millimetres_and_empty_masks():
    a = torch.zeros(3, 20, 20, dtype=torch.bool)
    b = torch.zeros(3, 20, 20, dtype=torch.bool)
    a[0, 5:10, 5:10] = True
    b[0, 6:11, 5:10] = True  # shifted one row: every boundary point is 0 or 1 row away
    a[1, 5:10, 5:10] = True  # prediction, empty truth
    hd = hausdorff95_mm(a, b, spacing=(4.5, 2.0))
    assert hd[0].item() == pytest.approx(4.5)  # one row = 4.5 mm, not one column (2 mm)
    assert hd[1].item() == pytest.approx(math.hypot(20 * 4.5, 20 * 2.0))  # the image diagonal
    assert hd[2].item() == 0.0  # both empty


def test_auc_balanced_accuracy_and_calibration_golden():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 1, 1])
    # class 0 scores: positives 0.9, 0.6; negatives 0.3, 0.6 -> pairs: (>, >), (=, >) -> (1 + 1 + 0.5 + 1) / 4
    assert macro_auc(probs, labels, 2) == pytest.approx(0.875)
    assert balanced_accuracy(probs, labels, 2) == pytest.approx((1.0 + 0.5) / 2)
    imbalanced = torch.tensor([0, 0, 0, 1])
    assert balanced_accuracy(probs, imbalanced, 2) == pytest.approx((2 / 3 + 0.0) / 2)
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55])
    correct = torch.tensor([1.0, 1.0, 1.0, 0.0])
    bins = calibration_bins(conf, correct, n_bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    # bin 5: |0.5 - 0.55| ; bin 9: |1.0 - 0.95| -> 0.5 * 0.05 + 0.5 * 0.05
    assert expected_calibration_error(conf, correct, n_bins=10) == pytest.approx(0.05)


def _cls_records(n_episodes=30, seed=0):
    g = np.random.default_rng(seed)
    recs = []
    for ep in range(n_episodes):
        for j in range(6):
            label = j % 3
            p = g.dirichlet(np.ones(3))
            classes = ["a", "b", f"c{ep % 2}"]
            recs.append({"method": "trained", "episode": ep, "shot": 1, "classes": classes, "class": classes[label],
                         "label": label, "probs": p.tolist(), "acc": float(int(p.argmax()) == label),
                         "site": "s1" if ep % 3 else "s2", "query_id": f"q{j}"})
    return recs


def test_ece_bootstrap_is_seeded_and_brackets_the_pooled_value():
    recs = _cls_records()
    a, b = ece_bootstrap(recs, seed=3), ece_bootstrap(recs, seed=3)
    assert a == b
    conf = torch.tensor([max(r["probs"]) for r in recs])
    correct = torch.tensor([float(int(np.argmax(r["probs"])) == r["label"]) for r in recs])
    assert a["mean"] == pytest.approx(expected_calibration_error(conf, correct))
    assert a["ci_low"] <= a["mean"] <= a["ci_high"] and a["n_episodes"] == 30


def test_per_class_cells_average_within_episode_then_over_episodes():
    recs = [{"method": "m", "episode": 0, "class": "x", "site": "s", "acc": 1.0},
            {"method": "m", "episode": 0, "class": "x", "site": "s", "acc": 0.0},
            {"method": "m", "episode": 0, "class": "y", "site": "s", "acc": 1.0},
            {"method": "m", "episode": 1, "class": "y", "site": "s", "acc": 0.0}]
    s = summarize(recs, "acc", ("class",))["m"]
    assert s["all"]["mean"] == pytest.approx((2 / 3 + 0.0) / 2) and s["all"]["n_episodes"] == 2
    assert s["class"]["x"]["mean"] == 0.5 and s["class"]["x"]["n_episodes"] == 1  # only episode 0 has class x
    assert math.isnan(s["class"]["x"]["ci95"])  # one episode: no spread, never a false "± 0.000"
    assert s["class"]["y"]["mean"] == pytest.approx(0.5) and s["class"]["y"]["n_episodes"] == 2


def test_classification_summary_breaks_down_by_class_site_and_shot():
    recs = _cls_records() + [dict(r, shot=5) for r in _cls_records(seed=1)]
    s = evaluation_summary(CLASSIFICATION, recs)
    assert set(s) == {"1", "5"}
    for k in ("1", "5"):
        assert set(s[k]) == {"acc", "balanced_acc", "auc", "ece", "calibration", "differences"}
        acc = s[k]["acc"]["trained"]
        assert set(acc["class"]) == {"a", "b", "c0", "c1"} and acc["class"]["c0"]["n_episodes"] == 15
        assert set(acc["site"]) == {"s1", "s2"}
        assert set(s[k]["auc"]["trained"]["class"]) == {"a", "b", "c0", "c1"}
        assert 0 <= s[k]["auc"]["trained"]["all"]["mean"] <= 1
        assert sum(b["count"] for b in s[k]["calibration"]["trained"]) == 180


# ------------------------------------------------------------------------------------------ end to end
def _fit_and_save(module, dm, path: Path) -> Path:
    trainer = Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                      inference_mode=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def seg_checkpoint(demo_root, demo_index, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg_eval")
    torch.manual_seed(0)
    learner = PrototypicalSegmenter(backbone="unet", backbone_kwargs={"out_channels": 8, "features": [4, 4, 8, 8, 16, 4]})
    dm = SegmentationDataModule(root=str(demo_root), index_path=str(demo_index[1]), cache_dir=str(tmp / "cache"),
                                **SMALL_DATA)
    return _fit_and_save(EpisodicModule(learner), dm, tmp / "seg.ckpt"), tmp


def test_segmentation_evaluate_is_reproducible_to_the_last_digit(seg_checkpoint, tmp_path, monkeypatch):
    import imaging_meta.commands.evaluate as evaluate_module

    ckpt, tmp = seg_checkpoint
    kw = dict(shots=[1, 2], episodes=5, seed=7, cache_dir=str(tmp / "cache"), n_panel=2)
    summary_seeds = []
    summarise = evaluate_module.evaluation_summary
    monkeypatch.setattr(evaluate_module, "evaluation_summary",
                        lambda *a, **k: summary_seeds.append(k.get("seed")) or summarise(*a, **k))
    js, md = evaluate(ckpt, tmp_path / "a", **kw)
    monkeypatch.undo()
    assert summary_seeds == [7]  # the bootstrap runs with the seed the report names (a mutation review)
    # the same command in a fresh process, with another hash seed: every file is byte for byte the same
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "imaging_meta", "evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b"),
                    "--name", "a", "--shots", "1", "2", "--episodes", "5", "--seed", "7", "--cache-dir", kw["cache_dir"],
                    "--panel", "2"], check=True, env=env, capture_output=True)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert {"results.json", "results.md", "records.csv", "episodes-1shot.json", "best_worst.png"} <= set(files)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    doc = json.loads(js.read_text())
    ctx, summ = doc["context"], doc["summary"]
    assert ctx["protocol"] == "cross_organ" and ctx["shots"] == [1, 2] and ctx["seed"] == 7
    assert len(ctx["checkpoint_sha256"]) == 64 and ctx["versions"]["torch"] == torch.__version__
    assert ctx["git_commit"] and ctx["episode_files"]["2"]["n_episodes"] == 5
    assert ctx["fit_commits"] == [ctx["git_commit"]] and f"trained at commit `{ctx['git_commit']}`" in md.read_text()
    assert ctx["preprocessing"]["spacing"] and ctx["preprocessing"]["slice_size"]  # what `compare` checks too
    for k in ("1", "2"):
        for metric in ("dice", "hd95"):
            per = summ[k][metric]
            assert set(per) == {"trained", "untrained encoder", "copy support mask"}
            assert set(per["trained"]["organ"]) and set(per["trained"]["organ"]) <= {"spleen", "kidney_left"}
            assert per["trained"]["site"]
    assert 0 <= summ["1"]["dice"]["trained"]["all"]["mean"] <= 1 and summ["1"]["hd95"]["trained"]["all"]["mean"] >= 0
    # the default interval resamples the test patients, whom the datamodule names in each episode
    assert ctx["interval"]["name"] == "patient-bootstrap" and ctx["interval"]["resamples"] == 2000
    assert ctx["interval"]["seed"] == 7
    # 5 episodes in batches of 4: each keeps its own id across batches (a collision merged two into one mean)
    assert summ["1"]["dice"]["trained"]["all"]["n_episodes"] == 5
    import csv

    with open(tmp_path / "a" / "records.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {int(r["episode"]) for r in rows if r["shot"] == "1"} == set(range(5))
    assert 1 <= summ["1"]["dice"]["trained"]["all"]["n_patients"] <= ctx["data"]["patients"]["test"]
    assert set(summ["1"]["differences"]["dice"]) == {"untrained encoder", "copy support mask"}
    text = md.read_text()
    assert "Cite as:" in text and ctx["episode_files"]["1"]["sha256"] in text and "HD95 (mm)" in text
    cited = text.split("Cite as:")[1].split("\n")[0]  # the citation's own line
    assert "trained − copy support mask" in cited and "trained − untrained encoder" in cited  # every baseline
    assert "bootstrap of patients" in text and "| trained − copy support mask |" in text
    assert "unofficial" not in text
    # episodes drawn from MedMNIST files whose MD5 is not the published one: the same episode list and sha256, so
    # the report and its citation say so
    from imaging_meta.evaluation.reports import _evaluation_markdown
    from imaging_meta.tasks import get_task

    ctx["episode_files"]["1"]["unofficial_files"] = ["bloodmnist"]
    again = _evaluation_markdown(ctx, summ, get_task(ctx["task"]), doc["figures"])
    assert "prepared with files whose MD5 is not the published one: bloodmnist" in again
    assert "on unofficial files bloodmnist" in again.split("Cite as:")[1]
    # the interval note names the patients each shot's bootstrap resampled, not the first shot's data count
    n = {k: summ[k]["dice"]["trained"]["all"]["n_patients"] for k in ("1", "2")}
    expected = str(n["1"]) if n["1"] == n["2"] else f"{n['1']} at 1-shot, {n['2']} at 2-shot"
    assert f"bootstrap of the test patients ({expected} here)" in text
    for png in doc["figures"].values():
        assert Image.open(tmp_path / "a" / png).size[0] > 100
    assert {"per_organ.png", "per_site.png", "dice_vs_shots.png", "best_worst.png"} <= set(doc["figures"].values())
    # the episode file pins the test episodes: another seed draws others
    js_c, _ = evaluate(ckpt, tmp_path / "c", **{**kw, "seed": 8, "shots": [1]})
    assert json.loads(js_c.read_text())["context"]["episode_files"]["1"]["sha256"] != ctx["episode_files"]["1"]["sha256"]
    table = compare_runs([tmp_path / "a", tmp_path / "c"])
    assert table.count("| a |") == 2 and "| c |" in table
    assert "segmentation, cross_organ, 1-shot: 2 different episode files" in table
    # `compare evaluation/*/` also matches make evaluate's training logs (runs/): named under the table, not an error
    (tmp_path / "runs").mkdir()
    assert compare_runs([tmp_path / "a", tmp_path / "runs"]).endswith(f"not evaluation runs (no results.json), left "
                                                                      f"out: {tmp_path / 'runs'}\n")
    with pytest.raises(FileNotFoundError, match=r"runs: no results.json; run `imaging-meta evaluate --out"):
        compare_runs([tmp_path / "runs"])
    with pytest.raises(FileNotFoundError, match=r"typo: no such folder"):
        compare_runs([tmp_path / "a", tmp_path / "typo"])


def test_evaluate_refuses_a_data_config_that_changes_the_split(seg_checkpoint, tmp_path):
    ckpt, tmp = seg_checkpoint
    cfg = tmp_path / "data.yaml"
    cfg.write_text("data:\n  class_path: datamodules.segmentation.SegmentationDataModule\n  init_args:\n"
                   "    root: somewhere\n    protocol: in_domain\n    split_seed: 3\n")
    with pytest.raises(ValueError, match=r"data\.yaml: this data config changes the split.*protocol: trained 'cross_organ', "
                                         r"given 'in_domain'.*split_seed"):
        evaluate(ckpt, tmp_path / "out", data_config=cfg)
    # the rebuilt split is checked against the digest stored at fit (other ids from another salt, other data...)
    tampered = torch.load(ckpt, weights_only=True)
    assert len(tampered["imaging_meta"]["split_digest"]) == 16
    tampered["imaging_meta"]["split_digest"] = "0" * 16
    torch.save(tampered, tmp_path / "tampered.ckpt")
    with pytest.raises(ValueError, match=r"tampered\.ckpt: the data rebuilt for evaluation is not split as in training.*salt"):
        evaluate(tmp_path / "tampered.ckpt", tmp_path / "out", shots=[1], episodes=2, cache_dir=str(tmp / "cache"))
    assert not (tmp_path / "out" / "results.json").exists()
    minimal = tmp_path / "minimal.yaml"
    minimal.write_text("data:\n  class_path: datamodules.segmentation.SegmentationDataModule\n  init_args:\n"
                       "    root: somewhere\n")  # fields left out take their defaults: test_organs None
    with pytest.raises(ValueError, match=r"test_organs: trained \['spleen', 'kidney_left'\], given None"):
        evaluate(ckpt, tmp_path / "out", data_config=minimal)
    # the slices an organ counts on decide which validation organ a split chooses, when one cannot be shown
    import yaml

    from imaging_meta.commands.evaluate import data_config_from_checkpoint

    content = torch.load(ckpt, weights_only=True)
    trained = data_config_from_checkpoint(content, ckpt)
    # a class path read from a checkpoint, the datamodule's or one nested in its settings, is imported only from the
    # datamodules package (importing runs code); a user's own datamodule is built from the --data-config they give
    from imaging_meta.commands.evaluate import checkpoint_data

    for data in ({**trained, "class_path": "antigravity.Fly"},
                 {**trained, "init_args": {**trained["init_args"], "source": {"class_path": "antigravity.Fly"}}}):
        content["imaging_meta"]["data"] = data
        read = data_config_from_checkpoint(content, ckpt)  # read, not imported
        with pytest.raises(CheckpointError, match=r"its data names 'antigravity\.Fly', outside the datamodules"):
            checkpoint_data(read, ckpt)
    assert "antigravity" not in sys.modules
    assert checkpoint_data(trained, ckpt) == trained
    fewer = tmp_path / "fewer.yaml"
    fewer.write_text(yaml.safe_dump({"data": {**trained, "init_args": {**trained["init_args"], "min_organ_pixels": 999}}}))
    with pytest.raises(ValueError, match=r"fewer\.yaml: this data config changes the split.*min_organ_pixels: trained"):
        evaluate(ckpt, tmp_path / "out", data_config=fewer)


def test_evaluate_refuses_data_whose_label_maps_name_the_structures_otherwise(seg_checkpoint, tmp_path):
    """The checkpoint keeps which label value is which structure; data that names them otherwise is refused before
    anything is scored (a renamed structure kept the split digest: a review)."""
    ckpt, tmp = seg_checkpoint
    content = torch.load(ckpt, weights_only=True)
    extra = content["imaging_meta"]
    assert len(extra["structure_digest"]) == 16 and "spleen" in extra["structure_values"]
    spleen = extra["structure_values"]["spleen"]
    extra["structure_digest"], extra["structure_values"]["spleen"] = "0" * 16, [v + 100 for v in spleen]
    torch.save(content, tmp_path / "renamed.ckpt")
    with pytest.raises(ValueError, match=rf"renamed\.ckpt: the label maps .* name their structures unlike the training "
                                         rf"data \(spleen: label values \[{spleen[0] + 100}.*\] in training, \[{spleen[0]}"):
        evaluate(tmp_path / "renamed.ckpt", tmp_path / "out", shots=[1], episodes=2, cache_dir=str(tmp / "cache"))
    assert not (tmp_path / "out" / "results.json").exists()
    # another salt or other scans change the case ids both digests are keyed by: the split's message, which names
    # the salt, comes first (the structures' was given, with the wrong advice: a review)
    extra["split_digest"] = "0" * 16
    torch.save(content, tmp_path / "both.ckpt")
    with pytest.raises(ValueError, match=r"both\.ckpt: the data rebuilt for evaluation is not split as in training.*salt"):
        evaluate(tmp_path / "both.ckpt", tmp_path / "out", shots=[1], episodes=2, cache_dir=str(tmp / "cache"))


def test_evaluate_says_and_records_preprocessing_unlike_the_checkpoints(seg_checkpoint, tmp_path, caplog):
    """A --data-config that keeps the split but changes the CT window ran silently: Dice 0.669 -> 0.570 in a review,
    and a report that read like the model's own."""
    import yaml

    from imaging_meta.commands.evaluate import data_config_from_checkpoint

    ckpt, tmp = seg_checkpoint
    trained = data_config_from_checkpoint(torch.load(ckpt, weights_only=True), ckpt)
    window = tmp_path / "window.yaml"
    window.write_text(yaml.safe_dump({"data": {**trained, "init_args": {**trained["init_args"], "ct_window": [-100, 300]}}}))
    with caplog.at_level("WARNING", logger="imaging_meta.commands.evaluate"):
        js, md = evaluate(ckpt, tmp_path / "out", data_config=window, shots=[1], episodes=2, cache_dir=str(tmp / "cache"))
    assert re.search(r"preprocessed unlike the checkpoint's: ct_window \[-250\.0, 250\.0\] in the checkpoint, "
                     r"\[-100\.0, 300\.0\] here", caplog.text)
    changed = json.loads(Path(js).read_text())["context"]["preprocessing_not_the_checkpoints"]
    assert changed == {"ct_window": {"checkpoint": [-250.0, 250.0], "tested": [-100.0, 300.0]}}
    text = Path(md).read_text()
    assert "preprocessing_not_the_checkpoints**: ct_window" in text and "preprocessed unlike the checkpoint's (ct_window)" in text


def test_classification_evaluate_cli_writes_metrics_and_reliability(tmp_path, capsys, caplog):
    root = write_folder(tmp_path / "data", n_classes=6, per_class=6, dicom_class=False)
    source = {"class_path": "datamodules.sources.image_folder.ImageFolder", "init_args": {"root": str(root), "image_size": [16, 16]}}
    dm = ClassificationDataModule(source=source, cache_dir=str(tmp_path / "cache"), n_way=2, n_shot=1, n_query=2,
                                  val_classes_count=2, test_classes_count=2, episodes_per_epoch=4, val_episodes=2,
                                  test_episodes=4, batch_size=2)
    torch.manual_seed(0)
    ckpt = _fit_and_save(EpisodicModule(PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 8})), dm,
                         tmp_path / "cls.ckpt")
    out = tmp_path / "run"
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out), "--shots", "1", "2", "--episodes", "6",
                     "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "Cite as:" in capsys.readouterr().out
    text = (out / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: empty calibration bins are null
    doc = json.loads(text)
    s = doc["summary"]["2"]
    assert set(s) == {"acc", "balanced_acc", "auc", "ece", "calibration", "differences"}
    assert set(s["acc"]["trained"]["class"]) == set(doc["context"]["data"]["classes"]["test"])
    # raw pixels and what `classify` gives by default are scored on the same episodes, paired with trained
    assert {"raw pixels", "trained, task-adaptive", "untrained encoder"} <= set(s["acc"])
    assert {"raw pixels", "trained, task-adaptive"} <= set(json.dumps(s["differences"]).replace('"', "\n").split("\n"))
    # how they were made: the task-adaptive row's spaces (the embedding is the checkpoint's, in learner_config)
    refs = doc["context"]["reference_methods"]
    assert refs["trained, task-adaptive"]["init_args"]["spaces"][:5] == [
        "embedding", "pixels", "histogram", "gradient", "orientation"]
    assert "embedding" not in refs["trained, task-adaptive"]["init_args"]
    assert refs["raw pixels"]["init_args"]["features"] == "pixels"
    rows = list(csv.DictReader(io.StringIO((out / "records.csv").read_text())))
    adaptive = [r for r in rows if r["method"] == "trained, task-adaptive"]
    assert adaptive and all(r["choice_space"] in ("weighted", "fusion") for r in adaptive)
    assert set(json.loads(adaptive[0]["choice_weights"])) == {"embedding", "pixels", "histogram", "gradient", "orientation"}
    assert all(r["choice_space"] == "" for r in rows if r["method"] == "trained")
    assert "reliability.png" in doc["figures"].values() and (out / "reliability.png").is_file()
    assert "accuracy per class" in " ".join(doc["figures"])
    assert cli_main(["compare", str(out), str(out), "--out", str(tmp_path / "cmp.md")]) == 0
    assert "balanced_acc:" in (tmp_path / "cmp.md").read_text()
    before = (out / "results.md").read_bytes()
    with pytest.raises(ValueError, match=r"results\.md: this input would be overwritten"):
        cli_main(["compare", str(out), "--out", str(out / "results.md")])
    assert (out / "results.md").read_bytes() == before
    with pytest.raises(ValueError, match=r"whole-scan protocols segment scans; .*cls\.ckpt is a classification checkpoint"):
        evaluate(ckpt, tmp_path / "scans", shots=[1], episodes=2, cache_dir=str(tmp_path / "cache"),
                 scan_protocols=["whole_scan"])
    assert not (tmp_path / "scans").exists()  # refused before anything was written
    # a number of shots the test classes cannot give (5 + 2 queries > 6 images) is skipped, the others scored
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.evaluate"):
        js, _ = evaluate(ckpt, tmp_path / "skip", shots=[1, 5], episodes=2, cache_dir=str(tmp_path / "cache"), n_panel=0)
    assert set(json.loads(js.read_text())["summary"]) == {"1"}
    assert "usable class" in json.loads(js.read_text())["context"]["skipped_shots"]["5"]
    assert any("5-shot skipped" in r.message and "usable class" in r.message for r in caplog.records)


@pytest.mark.parametrize("protocol", ["in_domain", "cross_organ", "cross_site"])
def test_protocol_configs_layer_over_the_demo_data_config(protocol, tmp_path):
    from imaging_meta.commands.cli import lightning_cli

    configs = Path(__file__).resolve().parents[2] / "configs"
    cli = lightning_cli(["--config", str(configs / "trainer/cpu.yaml"), "--config", str(configs / "data/demo_segmentation.yaml"),
                         "--config", str(configs / f"protocol/{protocol}.yaml"), "--config", str(configs / "model/protonet_seg.yaml"),
                         "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
    h = cli.datamodule.hparams
    assert h.protocol == protocol and h.n_shot == 1 and h.root == "data/demo"
    assert (h.test_organs is not None) == (protocol == "cross_organ") and bool(h.test_sites) == (protocol == "cross_site")


@pytest.mark.parametrize("protocol", ["in_domain", "cross_organ", "cross_site"])
def test_a_protocol_config_leaves_no_hold_out_it_does_not_read(protocol):
    """A review (2026-12-07): in_domain.yaml and cross_site.yaml left a data config's val_organs (the Synapse and
    CHAOS recipes set one), and cross_organ.yaml a test_sites, which the protocol does not read and make_split now
    warns about on every run. Each protocol config, layered over every data config, leaves none."""
    import yaml

    configs = Path(__file__).resolve().parents[2] / "configs"
    reads = {"cross_organ": {"test_organs", "val_organs"}, "cross_site": {"test_sites"}, "in_domain": set()}
    layer = yaml.safe_load((configs / f"protocol/{protocol}.yaml").read_text())["data"]["init_args"]
    for data in sorted((configs / "data").glob("*.yaml")):
        args = yaml.safe_load(data.read_text())["data"].get("init_args", {})
        if "segmentation" not in yaml.safe_load(data.read_text())["data"]["class_path"]:
            continue
        merged = {**args, **layer}
        ignored = {k for k in ("test_organs", "val_organs", "test_sites") if merged.get(k) and k not in reads[protocol]}
        assert not ignored, (data.name, ignored)


def test_split_guard_compares_a_renamed_classification_protocol_under_its_current_name():
    from imaging_meta.commands.evaluate import check_same_split

    cls = "datamodules.classification.ClassificationDataModule"
    old = {"class_path": cls, "init_args": {"protocol": "cross_site", "n_way": 3}}
    check_same_split(old, {"class_path": cls, "init_args": {"protocol": "support_query_sites_differ", "n_way": 3}}, "x.yaml")
    with pytest.raises(ValueError, match=r"x\.yaml: this data config changes the split .*protocol"):
        check_same_split(old, {"class_path": cls, "init_args": {"protocol": "standard", "n_way": 3}}, "x.yaml")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_agree_with_torchmetrics(seed):
    """Our exact balanced accuracy, macro AUC and ECE against torchmetrics on data where every class is present."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_auroc,
        multiclass_calibration_error,
    )

    from imaging_meta.evaluation.metrics import balanced_accuracy, expected_calibration_error, macro_auc

    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(4), torch.randint(0, 4, (96,), generator=g)])
    probs = (torch.randn(100, 4, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, 4)).softmax(-1)
    assert balanced_accuracy(probs, labels, 4) == pytest.approx(float(multiclass_accuracy(probs, labels, 4, average="macro")), abs=1e-6)
    assert macro_auc(probs, labels, 4) == pytest.approx(float(multiclass_auroc(probs, labels, 4, average="macro", thresholds=None)), abs=1e-6)
    conf, pred = probs.max(-1)
    ece = expected_calibration_error(conf, pred == labels, 15)
    assert ece == pytest.approx(float(multiclass_calibration_error(probs, labels, 4, n_bins=15, norm="l1")), abs=1e-5)


def test_provenance_reads_the_commit_of_our_own_source_only(tmp_path):
    from imaging_meta.evaluation.provenance import is_source_checkout, provenance

    repo = Path(__file__).resolve().parents[2]
    assert is_source_checkout(repo)
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"  # an installed package inside someone's repo
    site.mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "someone-else"\n')
    assert not is_source_checkout(site) and not is_source_checkout(tmp_path)
    assert provenance()["git_commit"] not in ("", "installed package (no source checkout)")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"seed": -1}, r"--seed must be >= 0 and below 2\*\*64, got -1"),
    ({"seed": 2**64}, r"--seed must be >= 0 and below 2\*\*64, got 18446744073709551616"),
    ({"scan_protocols": ["whole_scan"], "scan_pairs": 0}, r"--scan-pairs must be >= 1, got 0"),
    ({"scan_protocols": ["whole_scan"], "adapt_steps": -2}, r"--adapt-steps must be >= 0, got -2"),
    ({"shots": [0]}, r"shots must be positive integers"),
    ({"episodes": 0}, r"episodes must be >= 1"),
    ({"log_dir": "OUT/tb"}, r"--log-dir .* lies in --out"),
])
def test_evaluate_checks_its_options_before_reading_the_checkpoint(tmp_path, kwargs, match):
    """A review found --scan-pairs 0 blaming the data and --seed -1 failing in numpy, both after every episode was
    scored and the episode files were copied over an earlier run's."""
    if kwargs.get("log_dir") == "OUT/tb":
        kwargs = {**kwargs, "log_dir": str(tmp_path / "out" / "tb")}
    with pytest.raises(ValueError, match=match):
        evaluate(tmp_path / "never-read.ckpt", tmp_path / "out", **{"shots": [1], "episodes": 2, **kwargs})
    assert not (tmp_path / "out").exists()


def test_evaluate_never_writes_over_another_commands_report_and_clears_its_own_earlier_files(tmp_path):
    from imaging_meta.commands.evaluate import _remove_earlier_evaluation, check_evaluation_folder

    run = tmp_path / "version_0"  # a training run: `imaging-meta test`'s report
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"context": {}, "summary": {}, "differences": {}}))
    with pytest.raises(ValueError, match=r"holds a results\.json that imaging-meta evaluate did not write"):
        evaluate(tmp_path / "never-read.ckpt", run, shots=[1], episodes=2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--cache-dir cannot be created under it"):
        evaluate(tmp_path / "never-read.ckpt", tmp_path / "new", shots=[1], episodes=2, cache_dir=str(tmp_path / "file" / "c"))
    old = tmp_path / "eval"  # an earlier evaluation with whole-scan protocols and a reliability diagram
    old.mkdir()
    doc = {"context": {"episode_files": {"5": {"file": "episodes-5shot.json"}}}, "summary": {},
           "figures": {"reliability": "reliability.png"}}
    for name in ("results.md", "records.csv", "scans.json", "scans.md", "reliability.png", "episodes-1shot.json",
                 "episodes-5shot.json", "notes.txt"):
        (old / name).write_text("x")
    (old / "results.json").write_text(json.dumps(doc))
    earlier = check_evaluation_folder(old)
    assert earlier == doc
    _remove_earlier_evaluation(old, earlier, keep={"episodes-1shot.json"})
    assert sorted(p.name for p in old.iterdir()) == ["episodes-1shot.json", "notes.txt"]


def test_evaluate_rebuilds_the_split_with_the_training_runs_validation_patients():
    """evaluate draws no validation episodes; the validation organ a segmentation split chooses depends on how many
    validation patients must show it and on whether training validated, which followed val_episodes, so evaluate
    could choose another organ than training did and refuse the checkpoint's split. It now passes the training
    run's count when training validated (read from the checkpoint's data config, not a --data-config)."""
    from imaging_meta.commands.evaluate import _training_split_settings

    seg = "datamodules.segmentation.SegmentationDataModule"

    def settings(init_args: dict, built: str = seg) -> dict:
        return _training_split_settings({"class_path": seg, "init_args": init_args}, built)

    assert settings({"n_query": 2}) == {"val_patients": 3}
    assert settings({}) == {"val_patients": 2}  # n_query 1
    assert settings({"n_query": 2, "val_episodes": 0}) == {"val_patients": None}  # not validated: a --data-config
    assert settings({"val_patients": 5}) == {"val_patients": 5}  # may not set one
    assert settings({}, "datamodules.classification.ClassificationDataModule") == {}


def test_an_interrupted_evaluation_leaves_the_earlier_report_whole(seg_checkpoint, tmp_path, monkeypatch):
    """The episode files were copied in before scoring and the earlier report removed before the new one was
    written: an interrupted run left the earlier report beside another run's episodes, or without its files (a
    review). Nothing of the earlier run changes until the new report is written."""
    from imaging_meta.commands import evaluate as command
    from imaging_meta.evaluation import reports

    ckpt, tmp = seg_checkpoint
    kw = dict(shots=[1], episodes=4, seed=7, cache_dir=str(tmp / "cache"), n_panel=1)
    js, _ = evaluate(ckpt, tmp_path / "run", **kw)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert "source" not in json.dumps(json.loads(js.read_text())["context"]["episode_files"])
    for where, target in ((command, "run_shot"), (reports, "json_safe")):  # while scoring; while writing the report
        def stop(*args, **kwargs):
            raise KeyboardInterrupt
        with monkeypatch.context() as m:
            m.setattr(where, target, stop)
            with pytest.raises(KeyboardInterrupt):
                evaluate(ckpt, tmp_path / "run", **{**kw, "seed": 8})
        after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if not p.name.endswith(".partial")}
        assert after.keys() >= before.keys() - {"best_worst.png"}
        assert {n: after[n] for n in ("results.json", "records.csv", "episodes-1shot.json")} == {
            n: before[n] for n in ("results.json", "records.csv", "episodes-1shot.json")}
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".partial")]


def test_a_run_stopped_among_the_scan_pairs_keeps_its_episode_report_and_no_earlier_scans_table(
        seg_checkpoint, tmp_path, monkeypatch):
    """A review: the slow whole-scan pairs were scored before the episode report was written, so a run stopped
    among them lost its episode results; and scans.md was written only at the end, so the earlier run's table stayed
    beside the new scans.json. Now the episode report comes first, and both scan files grow after each pair."""
    from imaging_meta.commands import evaluate_scans

    ckpt, tmp = seg_checkpoint
    kw = dict(shots=[1], episodes=4, seed=7, cache_dir=str(tmp / "cache"), n_panel=0)
    out = tmp_path / "run"
    evaluate(ckpt, out, **kw)
    (out / "scans.md").write_text("the earlier run's table\n")
    (out / "scans.json").write_text("[]\n")
    calls = []

    def score(learner, preprocessing, support, query, protocol, **kwargs):
        calls.append(query)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [{"protocol": protocol, "method": "trained", "dice": 0.25, "hd95": 1.0, "structure": "spleen"}]

    monkeypatch.setattr(evaluate_scans, "score_pair", score)
    with pytest.raises(KeyboardInterrupt):
        evaluate(ckpt, out, **{**kw, "seed": 8}, scan_protocols=["whole_scan"], scan_pairs=2, scan_pairing="any",
                 log_dir=tmp_path / "tb")
    # TensorBoard gets the episode report although the scan pairs stopped (it got nothing before)
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    context = json.loads((out / "results.json").read_text())["context"]
    assert context["seed"] == 8  # the new episode report, which says how its scan rows are made
    assert context["scan_protocols"] == {"protocols": ["whole_scan"], "pairs": 2, "pairing": "any",
                                         "scale": "checkpoint", "adapt_steps": 0}
    assert len(json.loads((out / "scans.json").read_text())) == 1
    table = (out / "scans.md").read_text()
    assert "earlier run" not in table and "1 (support, query) volume pairs" in table and "| trained | 0.250" in table


def test_compare_names_a_results_json_it_cannot_read_and_keeps_rows_on_one_line(tmp_path):
    """Hand-edited or foreign results.json files ended as internal errors (null: TypeError; deep nesting:
    RecursionError; a string mean: a format error naming no file), and a newline in a run's name split its row."""
    from imaging_meta.evaluation.reports import md_cell

    assert md_cell("Evil|Maker\n| fake | row |") == "Evil\\|Maker \\| fake \\| row \\|"
    cases = {"null": "null", "deep": "[" * 100000 + "]" * 100000,
             "no_shots": '{"context": {}, "summary": {}, "figures": {}}',
             "text_mean": json.dumps({"figures": {}, "context": {"shots": [1], "task": "segmentation", "protocol": "p", "name": "x",
                                                  "learner": "L", "episode_files": {"1": {"sha256": "ab"}},
                                                  "interval": {"name": "episode-t"}},
                                      "summary": {"1": {"dice": {"trained": {"all": {"mean": "high", "ci95": 0.1}}},
                                                        "hd95": {}}}})}
    for name, text in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(text)
        with pytest.raises(ValueError, match=rf"{name}/results\.json: (not valid JSON|not a results\.json|a results\.json without)"):
            compare_runs([tmp_path / name])
    # a training run's test report (no figures): it said "run imaging-meta evaluate again", and `evaluate --out` of
    # that folder is refused (a review); it now says what to evaluate, and where
    run = tmp_path / "runs" / "seg" / "version_0"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"context": {"shots": [1]}, "summary": {}, "differences": {}}))
    with pytest.raises(ValueError, match=r"version_0/results\.json: a training run's test report .*imaging-meta evaluate "
                                         r"--checkpoint .*version_0/checkpoints/best\.ckpt --out DIR, and compare DIR"):
        compare_runs([run])


def test_compare_notes_rows_on_one_episode_list_but_other_pixels_or_unofficial_files(tmp_path):
    """The episode list's sha256 does not cover the preprocessing or the data files (a review): two runs on one
    list at other slice sizes were put side by side as paired, and unofficial files were not named."""

    def run(name, preprocessing, unofficial=None):
        episode = {"sha256": "9f688c16ef2a00", **({"unofficial_files": unofficial} if unofficial else {})}
        doc = {"context": {"shots": [1], "task": "segmentation", "protocol": "cross_organ", "name": name, "learner": "L",
                           "episode_files": {"1": episode}, "interval": {"name": "episode-t"},
                           "preprocessing": preprocessing},
               "summary": {"1": {"dice": {"trained": {"all": {"mean": 0.5, "ci95": 0.1}}},
                                 "hd95": {"trained": {"all": {"mean": 9.0, "ci95": 1.0}}}}}, "figures": {}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(doc))
        return tmp_path / name

    a = run("a", {"slice_size": [80, 80], "spacing": [4.5, 4.5]})
    same = run("same", {"spacing": [4.5, 4.5], "slice_size": [80, 80]})
    assert "preprocessings" not in compare_runs([a, same]) and "not the published" not in compare_runs([a, same])
    b = run("b", {"slice_size": [128, 128], "spacing": [4.5, 4.5]}, unofficial=["breastmnist.npz"])
    table = compare_runs([a, b])
    assert "cross_organ, 1-shot, episodes `9f688c16ef2a`: 2 different preprocessings" in table
    assert "- b: episodes drawn from data files that are not the published ones (breastmnist.npz)" in table
    # a shot another run has but this one could not score is a row that says why (it was left out silently)
    doc = json.loads((b / "results.json").read_text())
    doc["context"] |= {"shots": [1, 5], "skipped_shots": {"5": "no test class has 5 + 15 images"}}
    (b / "results.json").write_text(json.dumps(doc))
    assert "| b | cross_organ | L | 5 | not scored: no test class has 5 + 15 images | | |" in compare_runs([a, b])
    # ... also when no listed run scored it: `evaluate` keeps a shot it could not score out of context.shots (a
    # review, 2026-12-07: the row vanished)
    doc["context"] |= {"shots": [1], "skipped_shots": {"30": "1 usable class(es)"}}
    (b / "results.json").write_text(json.dumps(doc))
    assert "| b | cross_organ | L | 30 | not scored: 1 usable class(es) | | |" in compare_runs([b])
    # `compare evaluation/*` also matches the comparison.md that `make evaluate` writes there: a note, not "no such
    # folder" for a file that exists
    (tmp_path / "comparison.md").write_text("old table")
    assert "| a | cross_organ |" in compare_runs([a, tmp_path / "comparison.md"])


def test_compare_names_the_ece_cells_own_interval_under_episode_t(tmp_path):
    """A review (2026-12-07): ECE's interval is a bootstrap of episodes whatever the run's interval (results.md says
    so), but compare put its cell under the run's "episode-t" column. Its cell now names it; under the patient
    bootstrap, which ECE follows, nothing is added."""
    from imaging_meta.tasks import get_task

    metrics = get_task("classification").report_metrics
    boot = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}  # what a bootstrap summary holds; a t-interval: ci95
    for interval in ("episode-t", "patient-bootstrap"):
        cells = {m: boot if m == "ece" or interval == "patient-bootstrap" else {"mean": 0.5, "ci95": 0.1} for m in metrics}
        doc = {"context": {"shots": [1], "task": "classification", "protocol": "standard", "name": interval,
                           "learner": "L", "episode_files": {"1": {"sha256": "ab" * 8}}, "interval": {"name": interval}},
               "summary": {"1": {m: {"trained": {"all": cells[m]}} for m in metrics}}, "figures": {}}
        (tmp_path / interval).mkdir()
        (tmp_path / interval / "results.json").write_text(json.dumps(doc))
    table = compare_runs([tmp_path / "episode-t", tmp_path / "patient-bootstrap"])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ") and "shots" not in line}
    assert "ece: 0.500 [0.400, 0.600] (bootstrap of episodes)" in rows["episode-t"], rows
    assert "(bootstrap of episodes)" not in rows["patient-bootstrap"]
    assert table.count("(bootstrap of episodes)") == 1


def test_provenance_records_the_thread_count():
    """CPU results are byte-identical at one thread count only (a review, 2026-12-06): it is recorded."""
    import torch

    from imaging_meta.evaluation.provenance import provenance

    p = provenance()
    assert p["torch_threads"] == torch.get_num_threads() and {"versions", "git_commit", "platform"} <= set(p)


def test_provenance_calls_a_new_untracked_module_dirty(tmp_path, monkeypatch):
    """`git diff` saw changed tracked files only: a new module in the package left the commit clean (a review)."""
    import subprocess

    import imaging_meta
    from imaging_meta.evaluation.provenance import provenance

    repo = tmp_path / "src"
    (repo / "imaging_meta").mkdir(parents=True)
    (repo / "pyproject.toml").write_text('[project]\nname = "imaging-meta"\n')
    (repo / "imaging_meta" / "__init__.py").write_text("")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "x"], check=True)
    monkeypatch.setattr(imaging_meta, "__file__", str(repo / "imaging_meta" / "__init__.py"))
    assert not provenance()["git_commit"].endswith("+dirty")
    (repo / "imaging_meta" / "new_module.py").write_text("x = 1\n")
    assert provenance()["git_commit"].endswith("+dirty")


def test_evaluate_takes_the_salt_the_run_was_trained_with_from_its_config(tmp_path, monkeypatch):
    """A review: a run trained with the folder configs' `salt: change-me` could not be evaluated without --salt
    (every split digest differed): evaluate used the project default. The run's config.yaml beside its
    checkpoints folder records the salt; --salt still comes first."""
    from imaging_meta.commands.evaluate import resolve_salt

    monkeypatch.delenv("IMAGING_META_SALT", raising=False)
    run = tmp_path / "runs" / "mine" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "best.ckpt"
    assert resolve_salt(ckpt, None) == "imaging-meta"  # no run config: the default
    (run / "config.yaml").write_text("data:\n  init_args:\n    root: /data\n    salt: change-me\n")
    assert resolve_salt(ckpt, None) == "change-me"
    (run / "config.yaml").write_text("data:\n  init_args:\n    source:\n      init_args:\n        salt: s2\n")
    assert resolve_salt(ckpt, None) == "s2"  # a classification source's own salt
    assert resolve_salt(ckpt, "given") == "given"
    # fit's rule (a review: the environment came first here and last at fit): a salt of the config's own wins
    # over IMAGING_META_SALT, a shipped placeholder yields to it, as the datamodule chose at fit
    monkeypatch.setenv("IMAGING_META_SALT", "env")
    assert resolve_salt(ckpt, None) == "s2"
    (run / "config.yaml").write_text("data:\n  init_args:\n    root: /data\n    salt: change-me\n")
    assert resolve_salt(ckpt, None) == "env"
    from datamodules.segmentation import SegmentationDataModule

    assert SegmentationDataModule(root=str(tmp_path), salt="change-me").salt == "env"
    assert SegmentationDataModule(root=str(tmp_path), salt="s2").salt == "s2"
    monkeypatch.delenv("IMAGING_META_SALT")
    (tmp_path / "proj" / "models").mkdir(parents=True)  # not a run folder: a config.yaml two folders up is not its own
    (tmp_path / "proj" / "config.yaml").write_text("data:\n  init_args:\n    salt: other-run-secret\n")
    assert resolve_salt(tmp_path / "proj" / "models" / "m.ckpt", None) == "imaging-meta"


def test_a_test_structure_without_a_whole_scan_pair_is_named(tmp_path, monkeypatch, caplog):
    """A review: a test structure that no same-site pair shows (two patients at two sites) was missing from the
    whole-scan tables without a word; and the error for no pair at all named no fix."""
    from types import SimpleNamespace

    from imaging_meta.commands import evaluate_scans

    def scan(patient, site, organs):
        return {"image": f"{patient}.nii.gz", "label": f"{patient}_seg.nii.gz", "modality": "CT", "patient": patient,
                "site": site, "organs": organs, "case_id": f"c-{patient}"}

    scans = [scan("p1", "A", {"kidney": 1}), scan("p2", "A", {"kidney": 1, "gall": 2}), scan("p3", "B", {"gall": 2})]
    dm = SimpleNamespace(test_scans=lambda: scans, preprocessing={})
    monkeypatch.setattr(evaluate_scans, "score_pair", lambda learner, pre, s, q, protocol, **kw: [
        {"protocol": protocol, "method": "trained", "dice": 0.5, "hd95": 1.0, "structure": q.name,
         "site": q.site}])
    with caplog.at_level(logging.WARNING):
        _, md = evaluate_scans.evaluate_scans(None, None, dm, tmp_path, ["whole_scan"], pairs=1, ablations=False)
    assert "left out: gall (no same_site pair" in caplog.text and "--scan-pairing cross_site or any" in caplog.text
    assert "left out: gall" in md.read_text()
    dm.test_scans = lambda: [scans[0], scans[2]]
    with pytest.raises(ValueError, match="--scan-pairing cross_site or any pairs them otherwise"):
        evaluate_scans.evaluate_scans(None, None, dm, tmp_path, ["whole_scan"], pairs=1, ablations=False)


def test_no_whole_scan_pair_is_refused_before_any_episode_is_scored(seg_checkpoint, tmp_path, monkeypatch):
    """A review (2026-12-07): the refusal came after every episode was scored and its report written, the slow part
    on a real cohort; the pairs need the index alone."""
    from imaging_meta.commands import evaluate_scans

    ckpt, tmp = seg_checkpoint
    monkeypatch.setattr(evaluate_scans, "scan_pairs", lambda scans, pairs, seed, pairing: [])
    scored = []
    monkeypatch.setattr("imaging_meta.commands.evaluate.run_shot", lambda *a, **k: scored.append(1) or [])
    with pytest.raises(ValueError, match="no same_site .* pairs them otherwise"):
        evaluate(ckpt, tmp_path / "e", shots=[1], episodes=2, cache_dir=str(tmp / "cache"), n_panel=0,
                 scan_protocols=["whole_scan"], scan_pairs=1)
    assert not scored and not (tmp_path / "e" / "results.json").exists()


def test_too_many_shots_for_the_test_split_names_the_fix_evaluate_allows(seg_checkpoint, tmp_path):
    """A review: with too few test patients for the shots, evaluate passed on the sampler's advice (move patients
    into the split, drop organs), which evaluate refuses since it keeps the training run's split."""
    ckpt, tmp = seg_checkpoint
    with pytest.raises(ValueError, match=r"cannot draw 40-shot episodes.*evaluate fewer shots than 40 with --shots"):
        evaluate(ckpt, tmp_path / "run", shots=[40], episodes=2, seed=7, cache_dir=str(tmp / "cache"), n_panel=0)
