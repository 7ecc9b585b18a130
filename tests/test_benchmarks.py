"""The benchmarks' pure helpers (fast), and one smoke run of ``python -m benchmarks.run --quick`` (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.common import PeakMemory, fmt, markdown_table, summarize, time_calls

REPO = Path(__file__).resolve().parents[1]


def test_markdown_table_aligns_numbers_right_and_text_left():
    table = markdown_table(["name", "ms"], [["maml", 12.3456], ["protonet|seg", None]])
    lines = table.splitlines()
    assert lines[0] == "| name          |   ms |"
    assert lines[1] == "|---------------|-----:|"
    assert lines[2] == "| maml          | 12.3 |"
    assert lines[3] == "| protonet\\|seg |  n/a |"
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        markdown_table(["a", "b"], [["only one"]])


def test_fmt_keeps_three_significant_digits():
    assert [fmt(1234.5), fmt(0.012345), fmt(2.0), fmt(0.0), fmt(3e-7), fmt(True), fmt("x")] == [
        "1234", "0.0123", "2.00", "0", "3.00e-07", "yes", "x"]


def test_time_calls_warms_up_then_times_and_summarize_reports_the_median():
    calls = []
    times = time_calls(lambda: calls.append(1), repeat=5, warmup=2)
    assert len(calls) == 7 and len(times) == 5 and all(t >= 0 for t in times)
    s = summarize([0.001, 0.003, 0.002, 0.010])
    assert s["median_ms"] == pytest.approx(2.5) and s["min_ms"] == pytest.approx(1.0) and s["n"] == 4
    with pytest.raises(ValueError):
        time_calls(lambda: None, repeat=0)


def test_peak_memory_sees_a_temporary_allocation():
    with PeakMemory("cpu") as mem:
        x = torch.ones(16 * 2**20 // 4)  # 16 MiB, touched
        del x
    assert mem.peak_mib is not None and mem.method
    if mem.method.startswith("peak RSS"):  # Linux with /proc/self/clear_refs: exact enough to check
        assert 12 <= mem.peak_mib <= 64


@pytest.mark.slow
def test_benchmarks_run_quick_writes_every_table(demo_root, tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--data-dir", str(demo_root), "--out", str(out), "--threads", "1",
         "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    md = (out / "benchmarks.md").read_text()
    for title in ("Meta-training step, classification", "Meta-training step, segmentation", "MAML peak memory vs inner steps",
                  "Second-order MAML: imaging_meta vs higher", "Data path: episodes per second",
                  "Data path: episode assembly vs a training step", "ANIL against MAML: one meta-training step"):
        assert title in md
    assert "- machine: " in md and "- device: cpu" in md
    result = json.loads((out / "benchmarks.json").read_text())
    keys = {s["key"] for s in result["sections"]}
    assert {"steps_cls", "steps_seg", "maml_vs_higher", "data_throughput", "data_assembly", "anil"} <= keys
    configs = {p.stem for p in (REPO / "configs" / "model").glob("*.yaml")}
    rows = {r[0] for s in result["sections"] if s["key"].startswith("steps_") for r in s["rows"]}
    assert configs <= rows
    assert all(not s["failures"] for s in result["sections"])
    assert result["machine"]["threads"] == 1 and result["machine"]["torch"] == torch.__version__


def _boom():
    raise RuntimeError("case broke")


def test_try_case_records_a_failure_and_goes_on(capsys):
    from benchmarks.common import BenchOptions, try_case

    opts = BenchOptions(isolate=False)
    failures = []
    assert try_case(_boom, {}, opts, "tiny 8x8", failures, "steps") is None
    assert failures == ["tiny 8x8: RuntimeError: case broke"]
    assert "[steps] tiny 8x8: FAILED RuntimeError: case broke" in capsys.readouterr().err
    assert try_case(dict, {"a": 1}, opts, "ok", failures, "steps") == {"a": 1} and len(failures) == 1


def test_anil_vs_maml_times_every_row_in_the_same_rounds():
    from benchmarks.anil_vs_maml import ROWS, measure

    m = measure(size=8, repeat=2, warmup=0)
    assert m["size"] == 8 and set(m["wall"]) == set(m["cpu"]) == set(ROWS)
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in m["wall"].values())


def test_two_pass_queries_times_the_three_forms_and_restores_the_default():
    """Each form runs what it names (the first convolution's batch sizes and the norm calls of one ANIL and one
    ProtoNet step), and the default is restored after each."""
    from torch.overrides import TorchFunctionMode

    import imaging_meta.learners.base as base
    import imaging_meta.learners.gradient.anil as anil
    import imaging_meta.learners.support_norms as support_norms
    import imaging_meta.learners.task_network as task_network
    from benchmarks.common import MODEL_CONFIGS, build_from_config, classification_episode
    from benchmarks.two_pass_queries import _FORMS, measure

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.first_conv, self.norms = [], 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.conv2d and args[0].shape[1] == 1:
                self.first_conv.append(args[0].shape[0])
            if func is torch.nn.functional.batch_norm:
                self.norms += 1
            return func(*args, **(kwargs or {}))

    defaults = (base.module_norm_layers, task_network.support_norm_layers, anil.forward_in_two_passes,
                support_norms.folded_norms)
    episode = classification_episode(1, 3, 1, 2, 16, device="cpu")  # one task: 3 support images, 6 queries
    for name in ("protonet_cls", "anil_cls"):
        learner, _, _ = build_from_config(MODEL_CONFIGS / f"{name}.yaml", {"n_way": 3, "in_channels": 1}, "cpu")
        learner.train()
        seen = {}
        for form, context in _FORMS.items():
            with context(), Calls() as calls:
                learner.loss(episode)
            seen[form] = (calls.first_conv, calls.norms)
            assert (base.module_norm_layers, task_network.support_norm_layers, anil.forward_in_two_passes,
                    support_norms.folded_norms) == defaults
        assert seen["one"][0] == [9], (name, seen)  # support and queries together
        assert seen["unfolded"][0] == seen["two"][0] == [3, 6], (name, seen)
        assert seen["two"][1] == 4 and seen["unfolded"][1] == 8, (name, seen)  # 4 blocks: the support's norms only
    for name in ("protonet_cls", "anil_cls"):
        (row,) = measure(16, [name], repeat=1, warmup=0)
        assert row[:2] == ["16x16", name] and min(row[2:5]) > 0
        assert row[5] == row[4] / row[2] and row[6] == row[4] / row[3]


def test_real_segmentation_compare_pairs_two_runs_by_support_query_and_structure(tmp_path):
    """`benchmarks.real_segmentation --compare`: method A of one run minus method B of another, over the pairs
    both scored (two pairs of one structure stay two), under one protocol; paired rows average a structure's
    pairs as the table does; the split pairs swap roles under ``reverse``."""
    from benchmarks.real_segmentation import abdomen_pairs, compare, paired_lines

    def rec(method, dice, support, protocol="whole_scan"):
        return {"protocol": protocol, "method": method, "dice": dice, "site": "lesions", "structure": "tumour",
                "support": support, "query": "q"}

    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps([rec("new", 0.5, "s1"), rec("new", 0.3, "s2"), rec("new", 0.9, "s3", "oracle_extent")]))
    b.write_text(json.dumps([rec("old", 0.2, "s1"), rec("old", 0.3, "s2"), rec("old", 0.1, "s4")]))
    line = compare(str(a), "new", str(b), "old")
    assert "2 pairs: +0.150 " in line and "better 1, worse 0" in line
    assert line.endswith(f"; left out, scored in one run only: 1 of {b}")  # s4: named, not dropped silently
    with pytest.raises(SystemExit, match="no structure scored"):
        compare(str(a), "nope", str(b), "old")
    recs = [rec("trained", 0.5, "s1"), rec("trained", 0.3, "s2"), rec("copy support mask", 0.0, "s1"),
            rec("copy support mask", 0.2, "s2")]
    assert paired_lines(recs, [("lesions", "tumour")])[0].startswith("- trained − copy support mask: +0.300 ")
    (tmp_path / "f").mkdir()
    (tmp_path / "r").mkdir()
    forward = abdomen_pairs(tmp_path / "f")
    backward = abdomen_pairs(tmp_path / "r", reverse=True)
    assert [(s.name, Path(s.image).name, Path(q.image).name) for s, q in forward] == [
        (q.name, Path(q.image).name, Path(s.image).name) for s, q in backward]
    assert Path(forward[0][0].image).name.endswith("_upper.nii.gz")


def test_real_segmentation_counts_two_query_scans_of_one_file_name_as_two(tmp_path):
    """A review (2026-12-07): the "all" row grouped records by the query's file name, and two sets' queries are
    both ``ct.nii.gz`` (the MSD spleen of spleen-x, the abdominal CT of cross-modality): two scans counted as one."""
    from benchmarks.real_segmentation import summarise

    def rec(patient, query, dice):
        return {"protocol": "whole_scan", "method": "trained", "dice": dice, "site": patient, "structure": "spleen",
                "support": "s", "query": f"/data/{patient}/{query}", "patient": patient}

    recs = [rec("msd", "ct.nii.gz", 0.5), rec("x", "crop.nii.gz", 0.4), rec("ct", "ct.nii.gz", 0.3),
            rec("mr", "mr.nii.gz", 0.2)]
    assert "CI over the 4 scanned patients or scans" in summarise(recs)


def test_real_segmentation_counts_the_halves_crops_and_whole_of_one_scan_as_one_draw():
    """A review: the "all" row keyed query scans by patient and file name, so the MSD spleen's lower half (set
    ``spleen``) and the whole of it (``spleen-x``), and the abdominal CT's lower half and its spleen crop, were
    each two independent draws of the interval; a sarcoma patient's CT and MR are one patient."""
    from benchmarks.real_segmentation import query_scan, summarise

    def rec(site, patient, query):
        return {"protocol": "whole_scan", "method": "trained", "dice": 0.5, "site": site, "structure": "spleen",
                "support": "s", "query": query, "patient": patient}

    same = [[rec("spleen", "one", "spleen_ct_lower.nii.gz"), rec("spleen-x", "msd", "ct.nii.gz")],
            [rec("abdomen-ct", "one", "ct_lower.nii.gz"), rec("parts-ct", "one", "ct_lower.nii.gz"),
             rec("spleen-x", "abdomen", "abdomen_spleen_crop.nii.gz"), rec("ct-to-mr", "ct", "ct.nii.gz")],
            [rec("sarcoma-ct", "sts1", "sts1_ct.nii.gz"), rec("sarcoma-mr", "sts1", "sts1_mr.nii.gz")]]
    for group in same:
        assert len({query_scan(r) for r in group}) == 1, group
    assert len({query_scan(g[0]) for g in same} | {query_scan(rec("abdomen-mr", "one", "mr_lower.nii.gz"))}) == 4
    assert "CI over the 3 scanned patients or scans" in summarise([r for g in same for r in g])


def test_real_classification_keeps_two_checkpoints_of_one_run_apart(tmp_path, monkeypatch):
    """A review (2026-12-07): methods were named after the run folder, so version_0 and version_1 (or best and last)
    of one run were one method, and only the last checkpoint given was scored."""
    import benchmarks.real_classification as rc

    monkeypatch.setattr(rc, "load_learner", lambda p, device: (torch.nn.Linear(2, 2), {}))
    monkeypatch.setattr(rc, "loader_settings", lambda extra, learner: {})
    monkeypatch.setattr("imaging_meta.learners.descriptors.task_adaptive.TaskAdaptiveClassifier",
                        lambda learner, **kw: torch.nn.Identity())
    paths = [f"runs/protonet_cls/version_{v}/checkpoints/best.ckpt" for v in (0, 1)]
    names = list(rc.checkpoint_learners(paths, 0))
    assert len(names) == 4 and "protonet_cls" in names and "runs/protonet_cls/version_1/checkpoints/best" in names
    with pytest.raises(ValueError, match="given twice"):
        rc.checkpoint_learners([paths[0], paths[0]], 0)


def test_real_classification_reads_the_descriptor_rows_as_the_default_weighs_them(monkeypatch):
    """A review (2026-12-07): the standalone descriptor rows read 64 x 64 images, where the task-adaptive default
    (and the data configs, `make results`' checkpoints) read 32 x 32; the gradient histogram is another descriptor
    at another resolution (brain lesions, one shot: 0.528 against 0.675)."""
    import benchmarks.real_classification as rc

    seen = {}

    def run_set(name, methods, shots, args):
        seen.update(methods)
        return []

    monkeypatch.setattr(rc, "run_set", run_set)
    monkeypatch.setattr(rc, "markdown", lambda rows: "")
    assert rc.main(["--sets", "organs_ct"]) == 0
    config = rc.load_yaml(rc.DATA_CONFIGS / "folder_classification.yaml")["data"]["init_args"]["source"]["init_args"]
    assert config["image_size"] == [32, 32]
    assert {"pixels", "gradient", "orientation"} <= set(seen)
    for name in ("pixels", "histogram", "gradient", "orientation"):
        assert seen[name][1]["image_size"] == [32, 32] and seen[name][1]["channels"] == 3


def assert_default_with_two_shots(variant, default) -> None:
    """A one-shot variant of `benchmarks.one_shot_weighting` answers as the default task-adaptive classifier
    exactly when every class has two support images (it differs at one shot only)."""
    from tests.imaging_meta.test_descriptors import task_episode

    ep = task_episode("pixels", n_shot=2)
    torch.testing.assert_close(variant.predict(ep), default.predict(ep))


def test_one_shot_weighting_fits_on_augmented_views_at_one_shot_only():
    """`benchmarks.one_shot_weighting`: with K >= 2 the variant is the default classifier exactly; at K = 1 its
    weights come from the views (not equal), and its answers are probabilities."""
    from benchmarks.one_shot_weighting import AugmentedOneShot
    from imaging_meta.learners.descriptors.task_adaptive import TaskAdaptiveClassifier
    from tests.imaging_meta.test_descriptors import stub_embedding, task_episode

    embedding = stub_embedding()
    variant, default = AugmentedOneShot(embedding, prior=0.05, copies=3).eval(), TaskAdaptiveClassifier(embedding, prior=0.05).eval()
    with torch.no_grad():
        assert_default_with_two_shots(variant, default)
        assert variant.weights == []
        one = task_episode("pixels", n_shot=1)
        probs = variant.predict(one)
    assert probs.shape == default.predict(one).shape
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert len(variant.weights) == 2 and all(abs(sum(w) - 1) < 1e-5 for w in variant.weights)
    assert any(abs(w - 1 / 3) > 1e-3 for row in variant.weights for w in row)


def test_transductive_one_shot_weighting_never_reads_the_query_labels():
    """At K >= 2 the variant is the default exactly; at K = 1 its answers do not change with the queries' labels,
    and differ from equal weights."""
    from dataclasses import replace

    from benchmarks.one_shot_weighting import TransductiveOneShot
    from imaging_meta.learners.descriptors.task_adaptive import TaskAdaptiveClassifier
    from tests.imaging_meta.test_descriptors import stub_embedding, task_episode

    embedding = stub_embedding()
    variant, default = TransductiveOneShot(embedding, rounds=2).eval(), TaskAdaptiveClassifier(embedding).eval()
    with torch.no_grad():
        assert_default_with_two_shots(variant, default)
        one = task_episode("pixels", n_shot=1)
        probs = variant.predict(one)
        shuffled = replace(one, query_labels=one.query_labels.flip(-1))
        torch.testing.assert_close(variant.predict(shuffled), probs)
        equal_weights = default.predict(one)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert not torch.allclose(probs, equal_weights)  # the fitted weights are not the equal ones


def test_fixed_one_shot_equal_share_is_the_default_and_other_shares_move_the_answer():
    """`emb<share>`: at K >= 2 the default exactly; at K = 1 an equal share (1/5 of five spaces) is the default's
    equal weights, a share
    of 1 is the embedding's nearest prototype alone (the descriptors get weight 0), and a share outside [0, 1]
    is refused."""
    from benchmarks.one_shot_weighting import FixedOneShot
    from imaging_meta.learners.descriptors.task_adaptive import FUSION, SPACES, TaskAdaptiveClassifier
    from tests.imaging_meta.test_descriptors import stub_embedding, task_episode

    equal = 1 / len([s for s in SPACES if s != FUSION])
    embedding = stub_embedding()
    default = TaskAdaptiveClassifier(embedding).eval()
    with torch.no_grad():
        assert_default_with_two_shots(FixedOneShot(embedding, share=0.9).eval(), default)
        one = task_episode("pixels", n_shot=1)
        torch.testing.assert_close(FixedOneShot(embedding, share=equal).eval().predict(one), default.predict(one))
        alone = FixedOneShot(embedding, share=1.0).eval()
        probs, records = alone._predict(one)
        only_embedding = TaskAdaptiveClassifier(embedding, spaces=["embedding"], default="embedding").eval()
        torch.testing.assert_close(probs.argmax(-1), only_embedding.predict(one).argmax(-1))
        assert not torch.allclose(probs, default.predict(one))
    assert records[0]["weights"]["embedding"] == pytest.approx(1.0)
    assert records[0]["weights"]["pixels"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="share"):
        FixedOneShot(embedding, share=1.5)


def test_classification_calibration_ece_by_hand():
    import numpy as np

    from benchmarks.classification_calibration import ece

    conf = np.full(10, 0.8)
    assert ece(conf, np.array([1.0] * 8 + [0.0] * 2)) == pytest.approx(0.0)
    assert ece(np.ones(4), np.zeros(4)) == pytest.approx(1.0)
    # two bins: 0.95 confidence right half the time (gap 0.45), 0.55 confidence always right (gap 0.45)
    assert ece(np.array([0.95, 0.95, 0.55, 0.55]), np.array([1.0, 0.0, 1.0, 1.0])) == pytest.approx(0.45)


def test_memory_format_times_both_layouts_and_reports_what_a_cpu_picks():
    from benchmarks.memory_format import measure

    rows = measure(32, ["protonet_cls", "maml_cls", "protonet_seg"], repeat=1, warmup=0)
    assert [r[:2] for r in rows] == [["32x32", "protonet_cls"], ["32x32", "maml_cls"], ["32x32", "protonet_seg"]]
    assert all(r[2] > 0 and r[3] > 0 and r[4] == r[3] / r[2] for r in rows)
    assert [r[5] for r in rows] == ["channels-last", "default", "default"]


def test_multi_support_scores_both_calibrations_on_two_support_patients(tmp_path):
    """`benchmarks.multi_support`: each triple's query is a third patient; on synthetic scans whose structure is
    exactly 200 HU, both calibrations and the window find it exactly."""
    import nibabel as nib
    import numpy as np

    from benchmarks.multi_support import ONE, VARIANTS, sarcoma_triples, score_triple
    from imaging_meta.evaluation.scans import Scan
    from imaging_meta.learners.base import Learner

    triples = sarcoma_triples()
    assert len(triples) == 6
    for _, scans in triples:
        assert len({s.patient for s in scans}) == 3 and len({s.modality for s in scans}) == 1

    class Everywhere(Learner):
        def predict(self, episode):
            return torch.full(episode.query_images.shape[:2] + episode.query_images.shape[-2:], 0.99)

    scans = []
    for n, (lo, hi) in enumerate(((2, 7), (1, 6), (3, 6))):
        hu = np.full((16, 16, 10), 40.0, np.float32)
        lab = np.zeros(hu.shape, np.uint8)
        lab[5:9, 5:9, lo : hi + 1] = 1
        hu[lab == 1] = 200.0
        paths = [tmp_path / f"{n}.nii.gz", tmp_path / f"{n}_l.nii.gz"]
        for path, array in zip(paths, (hu, lab), strict=True):
            nib.save(nib.Nifti1Image(array, np.diag([4.5, 4.5, 5.0, 1.0])), str(path))
        scans.append(Scan(str(paths[0]), str(paths[1]), 1, "CT", "organ", "site", f"p{n}"))
    pre = {"spacing": [4.5, 4.5], "slice_size": [16, 16], "ct_window": [-250.0, 250.0], "mr_percentiles": [1.0, 99.0]}
    dice, weights = score_triple(Everywhere(), pre, scans, adapt_steps=0)
    assert set(dice) > {*VARIANTS, ONE} and set(weights) == set(VARIANTS)
    from benchmarks.multi_support import POSITION

    # learner and intensity, and the position prior's weight in its variant
    assert all(len(w) == (3 if name == POSITION else 2) for name, w in weights.items())
    assert all(dice[name] == pytest.approx(1.0) for name in VARIANTS)
    assert dice["intensity window (first support)"] == pytest.approx(1.0)


def test_confident_one_shot_answers_each_query_in_one_space():
    """`confident`: at K >= 2 the default exactly; at K = 1 each query's probabilities are those of one space (the
    one where its two most probable classes lie furthest apart), never a blend."""
    from benchmarks.one_shot_weighting import ConfidentOneShot
    from imaging_meta.learners.descriptors.task_adaptive import TaskAdaptiveClassifier
    from imaging_meta.learners.descriptors.weighting import SCALE, query_distances
    from tests.imaging_meta.test_descriptors import stub_embedding, task_episode

    embedding = stub_embedding()
    variant, default = ConfidentOneShot(embedding).eval(), TaskAdaptiveClassifier(embedding).eval()
    with torch.no_grad():
        assert_default_with_two_shots(variant, default)
        one = task_episode("checker", n_shot=1)
        probs = variant.predict(one)
        base = variant.base_spaces(variant.task_spaces(one))
        per_space = torch.stack([(-SCALE * query_distances(fs, one.support_labels, fq, 3)).softmax(-1)
                                 for fs, fq in base.values()], 1)  # (T, K, A, N)
    gap = per_space.topk(2, -1).values
    chosen = (gap[..., 0] - gap[..., 1]).argmax(1)  # (T, A)
    expected = per_space.gather(1, chosen[:, None, :, None].expand(-1, 1, -1, 3))[:, 0]
    torch.testing.assert_close(probs, expected)
    assert not torch.allclose(probs, default.predict(one))


def test_block_space_adds_the_encoders_mid_level_features_as_a_space():
    """`block<n>`: one more candidate space from the Conv-4 backbone's n-th block (alone with ``alone``); every
    shot count; a block the backbone does not have is refused."""
    from benchmarks.one_shot_weighting import BlockSpace
    from imaging_meta.learners.metric.protonet import PrototypicalNetwork
    from tests.imaging_meta.test_descriptors import stub_embedding, task_episode

    net = PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 4}).eval()
    ep = task_episode("checker", n_shot=2)
    with torch.no_grad():
        spaces = BlockSpace(net, block=2, pool=2).task_spaces(ep)
        assert {"embedding", "pixels", "histogram", "block2"} <= set(spaces)
        fs, fq, _ = spaces["block2"]
        assert fs.shape[-1] == 4 * 2 * 2 and torch.allclose(fs.norm(dim=-1), torch.ones(fs.shape[:2]))
        alone = BlockSpace(net, block=1, alone=True).eval()
        assert list(alone.base_spaces(alone.task_spaces(ep))) == ["block1"]
        for shots in (1, 2):
            probs = BlockSpace(net, block=2).eval().predict(task_episode("checker", n_shot=shots))
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    with pytest.raises(ValueError, match="block 9: the embedding has no Conv-4 backbone"):
        BlockSpace(net, block=9)
    with pytest.raises(ValueError, match="no Conv-4 backbone"):
        BlockSpace(stub_embedding(), block=1)


def test_absent_structure_volume_and_retry_bookkeeping(tmp_path):
    """`benchmarks.absent_structure`: volumes in ml from the affine, and a retry is recorded from `segment`'s own
    warning, by query name."""
    import logging

    import nibabel as nib
    import numpy as np

    from benchmarks.absent_structure import _Retries, volume_ml

    data = np.zeros((4, 4, 4), np.uint8)
    data[:2, :2, :2] = 3
    data[3, 3, 3] = 1
    path = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 5.0, 1.0])), str(path))
    assert volume_ml(path, 3) == pytest.approx(8 * 20 / 1000)
    assert volume_ml(path) == pytest.approx(9 * 20 / 1000)
    handler = _Retries()
    log = logging.getLogger("test.absent")
    log.addHandler(handler)
    log.warning("%s: the segmenter found nothing, so it was segmented again %s", "a.nii.gz", "without intensity")
    log.warning("%s: the mask is empty: the segmenter found nothing (--keep-empty: not segmented again)", "b.nii.gz")
    assert handler.names == {"a.nii.gz"}
    log.setLevel(logging.INFO)
    log.info("%s: %d foreground voxels -> %s%s", "c d.nii.gz", 12, "out/c d.nii.gz", " (novelty 14.25)")
    log.info("%s: %d foreground voxels -> %s%s", "e.nii.gz", 0, "out/e.nii.gz", "")
    log.warning("%s looks unlike the support scan: in the model's features ...", "c d.nii.gz")
    assert handler.novelty == {"c d.nii.gz": 14.25} and handler.unlike == {"c d.nii.gz"}
    handler.clear()
    assert not (handler.names or handler.novelty or handler.unlike)


def test_real_classification_leaves_out_only_the_episodes_it_cannot_draw():
    """One draw without enough images of a class dropped the whole row (every episode of that shot count)."""
    from benchmarks.real_classification import sample_episodes

    # class 0: a scan with slices 0, 2, 4 (with a 4-slice gap, a support item at 2 leaves no query);
    # class 1: plenty, far apart
    items = [(Path(f"a_z{z:02d}.png"), 0) for z in (0, 2, 4)] + [(Path(f"b_z{z:02d}.png"), 1) for z in range(0, 80, 8)]
    eps = sample_episodes(items, 2, 2, 1, 2, 4, 40, 0)
    assert 0 < len(eps) < 40  # some draws put the support item in the middle: no query 4 slices away
    for _, support, query in eps:
        z = {i: int(items[i][0].stem.split("_z")[1]) for i in (*support, *query) if items[i][1] == 0}
        s0 = [z[i] for i in support if i in z]
        assert all(abs(z[q] - s) >= 4 for q in query if q in z for s in s0)
    assert sample_episodes(items, 2, 2, 1, 2, 4, 40, 0) == eps  # seeded
    assert sample_episodes(items, 2, 2, 5, 2, 4, 10, 0) == []  # class 0 never has 5 items 4 slices apart


def test_resample_cost_compares_the_per_slice_and_trilinear_paths(capsys):
    from benchmarks.resample_cost import main

    assert main(["--shape", "24", "20", "6", "--pre", "8", "8"]) == 0
    out = capsys.readouterr().out
    assert "per slice (bilinear):" in out and "trilinear:" in out
    assert float(out.split("largest difference: ")[1]) < 1e-4


def test_linear_pooling_is_the_mean_of_each_spaces_probabilities_at_one_shot_only():
    """`lin<scale>`: at K >= 2 the default exactly; at K = 1 the mean over the spaces of their softmax
    probabilities, recomputed here from the distances."""
    from benchmarks.one_shot_weighting import LinearPool
    from imaging_meta.learners.descriptors.task_adaptive import TaskAdaptiveClassifier
    from imaging_meta.learners.descriptors.weighting import query_distances
    from tests.imaging_meta.test_descriptors import stub_embedding, task_episode

    embedding = stub_embedding()
    variant, default = LinearPool(embedding, scale=2.0).eval(), TaskAdaptiveClassifier(embedding).eval()
    with torch.no_grad():
        assert_default_with_two_shots(variant, default)
        one = task_episode("pixels", n_shot=1)
        probs = variant.predict(one)
        base = variant.base_spaces(variant.task_spaces(one))
        n_way = int(one.support_labels.max()) + 1
        expected = torch.stack([(-2.0 * query_distances(fs, one.support_labels, fq, n_way)).softmax(-1)
                                for fs, fq in base.values()]).mean(0)
    assert len(base) >= 2
    torch.testing.assert_close(probs, expected)


def test_agreement_recovers_independent_spaces_accuracies_without_labels():
    """`agree<mix>`: for spaces whose errors are independent, the accuracies estimated from their agreement alone
    are the true ones, and the best space gets the largest weight; mix 0 is the default's equal weights; at K >= 2
    the default exactly."""
    from benchmarks.one_shot_weighting import AgreementOneShot
    from imaging_meta.learners.descriptors.task_adaptive import TaskAdaptiveClassifier
    from imaging_meta.learners.descriptors.weighting import ONE_SHOT_SCALE
    from tests.imaging_meta.test_descriptors import stub_embedding

    g = torch.Generator().manual_seed(0)
    truth, accuracy, n_way, count = torch.randint(0, 3, (4000,), generator=g), [0.9, 0.7, 0.5], 3, 4000
    answers = []
    for a in accuracy:  # right with probability a, else one of the other classes at random
        wrong = (truth + torch.randint(1, n_way, (count,), generator=g)) % n_way
        answers.append(torch.where(torch.rand(count, generator=g) < a, truth, wrong))
    distances = 1.0 - torch.nn.functional.one_hot(torch.stack(answers), n_way).float().unsqueeze(0)  # (1, K, A, N)
    embedding = stub_embedding()
    variant = AgreementOneShot(embedding, mix=1.0)
    beta = variant.one_shot_weights(None, dict.fromkeys("abc"), distances, n_way)
    torch.testing.assert_close(torch.tensor(variant.estimates[0]), torch.tensor(accuracy), atol=0.03, rtol=0)
    assert beta[0].argmax() == 0 and abs(float(beta.sum()) - ONE_SHOT_SCALE) < 1e-5
    equal = AgreementOneShot(embedding, mix=0.0).one_shot_weights(None, dict.fromkeys("abc"), distances, n_way)
    torch.testing.assert_close(equal, torch.full((1, 3), ONE_SHOT_SCALE / 3))
    with torch.no_grad():
        assert_default_with_two_shots(variant.eval(), TaskAdaptiveClassifier(embedding).eval())


def test_fisher_borda_and_refined_one_shot_variants_differ_at_one_shot_only():
    """`fisher`, `borda`, `refine`, `refine-emb`: at K >= 2 the default exactly; at K = 1 probabilities that do not
    change with the queries' labels; the Fisher ratio is 0 for a space that puts every query in one class and
    larger for one whose groups of queries are tight and far apart."""
    from dataclasses import replace

    from benchmarks.one_shot_weighting import BordaOneShot, FisherOneShot, RefinedOneShot, query_fisher
    from imaging_meta.learners.descriptors.task_adaptive import EMBEDDING, TaskAdaptiveClassifier
    from tests.imaging_meta.test_descriptors import stub_embedding, task_episode

    embedding = stub_embedding()
    default = TaskAdaptiveClassifier(embedding).eval()
    one = task_episode("pixels", n_shot=1)
    for variant in (FisherOneShot(embedding), BordaOneShot(embedding), RefinedOneShot(embedding),
                    RefinedOneShot(embedding, read=EMBEDDING)):
        with torch.no_grad():
            assert_default_with_two_shots(variant.eval(), default)
            probs = variant.predict(one)
            torch.testing.assert_close(variant.predict(replace(one, query_labels=one.query_labels.flip(-1))), probs)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    tight = torch.tensor([[0.0, 4.0], [0.1, 3.9], [4.0, 0.0], [3.9, 0.1]])  # two tight, far groups
    loose = torch.tensor([[1.0, 2.0], [1.9, 2.0], [2.0, 1.0], [2.0, 1.9]])
    one_class = torch.tensor([[0.0, 1.0], [0.1, 1.0], [0.2, 1.0], [0.3, 1.0]])
    ratio = query_fisher(torch.stack([tight, loose, one_class])[None])[0]
    assert ratio[0] > ratio[1] > 0 and ratio[2] == 0
    with pytest.raises(ValueError, match="read must be"):
        RefinedOneShot(embedding, read="pixels")


def test_scanner_values_variants_keep_the_labels_on_the_body():
    import numpy as np

    from benchmarks import scanner_values as sv

    rng = np.random.default_rng(0)
    v = np.full((40, 30, 6), -1000.0)
    v[5:35, 3:27] = 40 + rng.normal(0, 5, (30, 24, 6))
    lab = np.zeros(v.shape, np.uint8)
    lab[12:20, 10:18, 1:5] = 1
    affine = np.diag([2.0, 3.0, 5.0, 1.0])
    affine[:3, 3] = (-40.0, 10.0, 7.0)
    big, big_lab, a = sv.wide_fov(v, lab, affine, couch=True)
    assert big.shape[:2] == (sv.WIDE, sv.WIDE) and big_lab.sum() == lab.sum()
    world = lambda aff, idx: (aff @ np.append(idx, 1.0))[:3]  # noqa: E731
    first, first_big = np.argwhere(lab)[0], np.argwhere(big_lab)[0]
    np.testing.assert_allclose(world(affine, first), world(a, first_big))  # the structure stays where it was
    assert (big[big_lab > 0] == v[lab > 0]).all()
    assert (big <= -3024).any() and (big >= 200).any()  # the padding and the couch are there
    mr = np.where(v > -500, 100 + rng.normal(0, 5, v.shape), 5.0)
    out = sv.bright(mr, lab, affine)[0]
    changed = out != mr
    assert not (changed & (lab > 0)).any()  # the structure is never touched
    assert 0.01 < changed.sum() / sv._body(mr).sum() < 0.04
    assert (sv.zero_background(mr, lab, affine)[0][mr == 5.0] == 0).all()


def test_the_real_segmentation_interval_of_one_value_is_not_a_zero_width_interval():
    """One pair (`--sets spleen`, a --compare with one common pair) printed [x, x], as if it were certain."""
    from benchmarks.real_segmentation import bootstrap_mean_ci

    assert all(np.isnan(bootstrap_mean_ci(np.array([0.6]))))
    lo, hi = bootstrap_mean_ci(np.array([0.2, 0.4, 0.9]))
    assert 0.2 <= lo < hi <= 0.9


def test_the_real_set_bootstrap_can_resample_whole_query_scans():
    """A review: the "all" interval resampled (support, query, structure) records as if independent, though 37
    came from 16 query scans. With groups each scan is one draw: one value per group gives the draws of the
    plain bootstrap, and a scan scored k times like one value gives the plain interval of one value per scan."""
    from benchmarks.real_segmentation import bootstrap_mean_ci

    rng = np.random.default_rng(3)
    v = rng.random(9)
    assert bootstrap_mean_ci(v, groups=list("abcdefghi")) == pytest.approx(bootstrap_mean_ci(v))
    repeated = np.repeat(v, 4)
    assert bootstrap_mean_ci(repeated, groups=np.repeat(np.arange(9), 4).tolist()) == pytest.approx(bootstrap_mean_ci(v))
    assert bootstrap_mean_ci(repeated)[1] - bootstrap_mean_ci(repeated)[0] < bootstrap_mean_ci(v)[1] - bootstrap_mean_ci(v)[0]
    assert np.isnan(bootstrap_mean_ci(v, groups=["one"] * 9)[0])  # one scan: no interval


def test_real_segmentation_initial_weights_scores_the_checkpoints_untrained_learner(monkeypatch, capsys):
    """`--initial-weights`: the trained and adapted rows start from the checkpoint's initial weights (what
    meta-training adds to the whole recipe), and the records say so; a checkpoint without them is refused."""
    import sys

    import benchmarks.real_segmentation as rs

    trained, initial = object(), object()
    seen = []
    monkeypatch.setattr(rs, "restore_untrained", lambda extra: initial if extra.get("keeps") else None)
    from types import SimpleNamespace

    monkeypatch.setattr(rs, "lesion_pairs", lambda: [("s", SimpleNamespace(site="lesions", name="tumour"))])
    monkeypatch.setattr(rs, "summarise", lambda records: "")

    def score_pair(learner, pre, s, q, protocol, **kw):
        seen.append((learner, kw["untrained"]))
        return [{"method": "trained", "dice": 0.5}]

    monkeypatch.setattr(rs, "score_pair", score_pair)
    monkeypatch.setattr(rs, "load_learner", lambda path, device: (trained, {"preprocessing": {}, "keeps": True}))
    argv = ["x", "--checkpoint", "c.ckpt", "--sets", "lesions", "--protocols", "whole_scan", "--no-ablations"]
    monkeypatch.setattr(sys, "argv", [*argv, "--initial-weights", "--out", "/dev/null"])
    monkeypatch.setattr(rs.Path, "write_text", lambda self, text: seen.append(text))
    rs.main()
    assert seen[0] == (initial, initial) and '"weights": "initial"' in seen[1]
    seen.clear()
    monkeypatch.setattr(sys, "argv", argv)
    rs.main()
    assert seen == [(trained, initial)]
    monkeypatch.setattr(rs, "load_learner", lambda path, device: (trained, {"preprocessing": {}}))
    monkeypatch.setattr(sys, "argv", [*argv, "--initial-weights"])
    with pytest.raises(SystemExit):
        rs.main()
    assert "keeps no initial weights" in capsys.readouterr().err


def test_component_rules_pick_what_each_rule_says():
    """`benchmarks.component_rules`: a large, less confident component away from the structure and a small,
    confident one on it; a structure in several parts keeps both under every rule, as `segment` does."""
    from benchmarks.component_rules import RULES, rule_dice

    probs = np.zeros((12, 12, 6), np.float32)
    probs[0:6, 0:6, 0:4] = 0.6  # 144 voxels, not the structure
    probs[8:10, 8:10, 2:4] = 0.95  # 8 voxels, the structure
    truth = probs > 0.9
    got = rule_dice(probs, truth, voxel_mm3=2.0, support_mm3=16.0, parts=1)
    assert set(got) == set(RULES)
    assert got["largest"] == 0.0 and got["log-odds mass"] == 0.0
    for rule in ("mean probability", "max probability", "support volume", "overlap (oracle)"):
        assert got[rule] == 1.0, rule
    both = rule_dice(probs, truth, voxel_mm3=2.0, support_mm3=16.0, parts=2)
    assert all(v == pytest.approx(2 * 8 / (8 + 152)) for v in both.values())


def test_copy_similarity_local_ncc_and_its_correlation_with_the_copys_lead():
    from benchmarks.copy_similarity import correlations, local_ncc

    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 12, 6))
    assert np.allclose(local_ncc(a, 3 * a + 1)[3:-3, 3:-3, 1:-1], 1.0, atol=1e-6)
    assert np.allclose(local_ncc(a, -a)[3:-3, 3:-3, 1:-1], -1.0, atol=1e-6)
    # a similarity that rises with copy - segment gives rho 1; pairs where both score 0 are left out
    rows = [{"copy": c, "segment": 0.5, "ncc_copied_mask": c, "ncc_body": -c} for c in (0.1, 0.4, 0.9, 0.7)]
    rows.append({"copy": 0.0, "segment": 0.0, "ncc_copied_mask": 5.0, "ncc_body": 5.0})
    out = correlations(rows)
    assert out["ncc_copied_mask"]["spearman_rho"] == 1.0 and out["ncc_body"]["spearman_rho"] == -1.0
    assert out["ncc_body"]["pairs"] == 4
