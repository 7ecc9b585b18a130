"""`classify(..., explain=True)` and `imaging_meta.commands.explain`: nearest support items and occlusion saliency."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from imaging_meta.commands.classify import classify, explain_dir
from imaging_meta.commands.cli import cli_main
from imaging_meta.commands.explain import (
    default_patch,
    nearest_supports,
    occlusion_saliency,
    save_explanation_panel,
)
from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner, SimilarityMeasure
from imaging_meta.learners.gradient.maml import MAML
from imaging_meta.learners.metric.matching import MatchingNetwork
from imaging_meta.learners.metric.protonet import PrototypicalNetwork
from imaging_meta.learners.metric.siamese import SiameseNetwork
from tests.helpers import cls_args, write_png
from tests.imaging_meta.fewshot import lesion_patterns

REGION = (slice(8, 16), slice(8, 16))  # rows, columns the stub looks at, in a 24 x 24 image


class RegionLearner(Learner):
    """Two classes; p(class 1) is a steep function of the mean intensity of ``region`` (rows, columns; `REGION`
    unless given) of the query only."""

    task = "classification"
    region = REGION

    def predict(self, episode: Episode) -> torch.Tensor:
        ep = episode.unsqueeze()
        self.calls.append(ep.n_tasks * ep.query_images.shape[1])  # the images classified in this call
        mean = ep.query_images[..., self.region[0], self.region[1]].mean((-3, -2, -1))  # (T, Q)
        p = torch.sigmoid(10 * (mean - 0.5) + self.position_bias * torch.arange(mean.shape[1]))  # by query place
        return torch.stack([1 - p, p], -1)


def region_learner(position_bias: float = 0.0, region: tuple[slice, slice] = REGION) -> RegionLearner:
    learner = RegionLearner()
    learner.calls, learner.position_bias, learner.region = [], position_bias, region
    return learner


def region_episode() -> Episode:
    query = torch.zeros(1, 1, 24, 24)
    query[..., REGION[0], REGION[1]] = 1.0
    return Episode(support_images=torch.rand(4, 1, 24, 24), support_labels=torch.tensor([0, 0, 1, 1]),
                   query_images=query, query_labels=torch.zeros(1, dtype=torch.long), classes=["a", "b"])


def region_mask() -> torch.Tensor:
    mask = torch.zeros(24, 24, dtype=torch.bool)
    mask[REGION] = True
    return mask


def test_occlusion_saliency_lies_exactly_in_the_region_the_model_reads():
    learner = region_learner()
    # patches aligned with the region: every region pixel is salient, every other pixel exactly 0
    occ = occlusion_saliency(learner, region_episode(), patch_size=4, stride=4, batch_size=64)
    assert occ.target == 1 and occ.n_occlusions == 36 and occ.saliency.shape == (24, 24)
    inside, outside = occ.saliency[region_mask()], occ.saliency[~region_mask()]
    assert float(inside.min()) > 0.05 and float(outside.abs().max()) == 0.0
    assert learner.calls == [38]  # the unoccluded query (twice: the place check) + 36 copies, one predict call
    # overlapping patches blur the map by up to a patch: highest in the region, 0 beyond one patch from it
    learner.calls.clear()
    occ = occlusion_saliency(learner, region_episode(), patch_size=6, stride=3, batch_size=16)
    far = torch.ones(24, 24, dtype=torch.bool)
    far[2:22, 2:22] = False  # more than 6 px from the region
    sal = occ.saliency
    assert bool(region_mask()[sal == sal.max()].all()) and float(sal[region_mask()].min()) > 0
    assert float(sal[region_mask()].mean()) > 2 * float(sal[~region_mask()].max())
    assert float(sal[far].abs().max()) == 0.0
    assert max(learner.calls) <= 16 and sum(learner.calls) == 1 + 1 + occ.n_occlusions  # + the place check


def test_occlusion_falls_back_to_one_episode_per_call_when_the_other_queries_matter():
    learner = region_learner(position_bias=0.5)
    with pytest.warns(UserWarning, match="depends on the other queries"):
        occ = occlusion_saliency(learner, region_episode(), patch_size=4, stride=4)
    assert learner.calls[0] == 38 and set(learner.calls[1:]) == {1}  # the check, then one image per call
    assert float(occ.saliency[~region_mask()].abs().max()) == 0.0 and float(occ.saliency[region_mask()].min()) > 0.05
    with pytest.raises(ValueError, match="one query at a time"):
        occlusion_saliency(learner, Episode(**{**region_episode().__dict__, "query_images": torch.zeros(2, 1, 24, 24),
                                               "query_labels": torch.zeros(2, dtype=torch.long)}))


def test_default_patch_suits_28_to_84_pixel_images():
    assert default_patch(28, 28) == (4, 2) and default_patch(84, 84) == (12, 6)


def small_episode(n_way: int = 3, n_shot: int = 2, size: int = 12, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(support_images=torch.rand(n_way * n_shot, 1, size, size, generator=g),
                   support_labels=torch.arange(n_way).repeat_interleave(n_shot),
                   query_images=torch.rand(1, 1, size, size, generator=g), query_labels=torch.zeros(1, dtype=torch.long),
                   classes=[f"c{i}" for i in range(n_way)])


def test_protonet_nearest_supports_are_the_brute_force_euclidean_ranking():
    torch.manual_seed(0)
    learner = PrototypicalNetwork(backbone_kwargs={"width": 4}).eval()
    learner.encoder = nn.Flatten()  # a known embedding: the pixels themselves
    ep = small_episode()
    near = nearest_supports(learner, ep, k=4)
    brute = [float(((ep.query_images[0] - s) ** 2).sum().sqrt()) for s in ep.support_images]
    order = sorted(range(len(brute)), key=brute.__getitem__)
    assert near.measure == "protonet_euclidean" and near.value_name == "distance" and not near.larger_is_nearer
    assert near.indices[0].tolist() == order[:4]
    assert np.allclose(near.values[0].tolist(), [brute[i] for i in order[:4]], atol=1e-5)
    # k larger than the support set: all of it
    assert nearest_supports(learner, ep, k=50).indices.shape == (1, 6)


def test_each_learner_family_names_its_measure():
    torch.manual_seed(0)
    ep = small_episode()
    matching = MatchingNetwork(backbone_kwargs={"width": 4}).eval()
    near = nearest_supports(matching, ep, k=6)
    assert near.measure == "matching_attention" and near.larger_is_nearer
    assert abs(float(near.values.sum()) - 1) < 1e-5 and (near.values[0, :-1] >= near.values[0, 1:]).all()
    assert nearest_supports(SiameseNetwork(backbone_kwargs={"width": 4}).eval(), ep).measure == "siamese_euclidean"
    maml = MAML(n_way=3, backbone_kwargs={"width": 4}).eval()
    near = nearest_supports(maml, ep)
    assert near.measure == "encoder_euclidean" and "MAML.net.body" in near.description
    assert nearest_supports(region_learner(), ep).measure == "pixel_euclidean"
    # MAML adapts by gradient inside predict: occlusion works under the no_grad it runs in
    occ = occlusion_saliency(maml, ep, patch_size=6, stride=6)
    assert occ.n_occlusions == 4 and torch.isfinite(occ.saliency).all()


class PooledLearner(RegionLearner):
    """A learner explain.py has never heard of, with an encoder of its own under a name of its choosing."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.position_bias = [], 0.0
        self.trunk = nn.Sequential(nn.Flatten())

    def encoder_name(self) -> str:
        return "trunk"


class ScoringLearner(RegionLearner):
    """A learner with a rule of its own: the support items' mean intensity, larger is nearer."""

    tasks_independent = False

    @property
    def similarity_measure(self) -> SimilarityMeasure:
        return SimilarityMeasure("mean_intensity", "the support item's mean intensity", "similarity", True)

    def support_similarity(self, episode: Episode) -> torch.Tensor:
        ep = episode.unsqueeze()
        return ep.support_images.flatten(2).mean(-1).unsqueeze(1).expand(-1, ep.query_images.shape[1], -1)


def test_a_new_learner_explains_through_its_own_methods():
    ep = small_episode()
    near = nearest_supports(PooledLearner(), ep, k=6)
    brute = [float(((ep.query_images[0] - s) ** 2).sum().sqrt()) for s in ep.support_images]
    assert near.measure == "encoder_euclidean" and "PooledLearner.trunk" in near.description
    assert np.allclose(near.values[0].tolist(), sorted(brute), atol=1e-5)
    learner = ScoringLearner()
    learner.calls, learner.position_bias = [], 0.0
    near = nearest_supports(learner, ep, k=2)
    means = ep.support_images.flatten(1).mean(-1)
    assert near.measure == "mean_intensity" and near.larger_is_nearer
    assert near.indices[0].tolist() == means.argsort(descending=True)[:2].tolist()
    # a learner whose predictions depend on a task's place in a batch of tasks: the copies are the queries of one
    # task (the unoccluded query twice, for the check, and the 4 copies)
    occ = occlusion_saliency(learner, region_episode(), patch_size=12, stride=12)
    assert occ.n_occlusions == 4 and learner.calls == [6]


def test_panel_png_opens(tmp_path):
    from PIL import Image

    ep = small_episode()
    path = save_explanation_panel(tmp_path / "p.png", ep.query_images[0], ep.support_images[:3], ["a", "b", "c"],
                                  torch.randn(12, 12))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]


def test_a_panel_draws_class_names_that_are_not_utf8_or_hold_dollars(tmp_path):
    """A review: a class folder named in Latin-1 (``caf\\xe9``, kept as a surrogate as the CSV keeps it) made
    matplotlib refuse the title after the CSV was written, an internal error; ``$`` would start mathtext."""
    ep = small_episode()
    titles = ["#1 caf\udce9\nd=0.1", "#2 $\\frac{a$\nd=0.2", "#3 b\nd=0.3"]
    path = save_explanation_panel(tmp_path / "p.png", ep.query_images[0], ep.support_images[:3], titles,
                                  torch.randn(12, 12), query_title="query\ncaf\udce9 (p=0.90)",
                                  saliency_title="occlusion: drop in p(caf\udce9)")
    assert path.stat().st_size > 0


# --------------------------------------------------------------------------- end to end
CLASSES = ("cyst", "haemangioma", "metastasis")


def write_folders(root: Path) -> tuple[Path, Path]:
    """A support folder (2-4 PNGs per class) and a query folder (one PNG per class), 28 x 28."""
    pats = lesion_patterns(3, 1, 28, 99)[:, 0].numpy()
    rng = np.random.default_rng(1)

    def img(c):
        return np.clip(128 + 40 * (pats[c] + 0.3 * rng.standard_normal((28, 28))), 0, 255).astype(np.uint8)

    support, queries = root / "support", root / "queries"
    for c, name in enumerate(CLASSES):
        for k in range(2 + c):
            write_png(support / name / f"s{k}.png", img(c))
        write_png(queries / f"q{c}.png", img(c))
    return support, queries


@pytest.fixture(scope="module")
def protonet_checkpoint(tmp_path_factory):
    """A ProtoNet checkpoint from `imaging-meta fit`, as the classify tests of test_learner_configs make it."""
    tmp = tmp_path_factory.mktemp("fit")
    cli = cli_main(["fit", *cls_args(tmp, "protonet_cls"), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    return next(Path(cli.trainer.log_dir, "checkpoints").glob("last*.ckpt"))


def check_explanations(out: Path, queries: list[str], size: int) -> None:
    from PIL import Image

    folder = explain_dir(out)
    rows = list(csv.DictReader(out.open()))
    jsons = sorted(folder.glob("*.json"))
    assert len(jsons) == len(rows) == len(queries) and len(list(folder.glob("*.png"))) == len(rows)
    for row, path in zip(rows, jsons, strict=True):
        rec = json.loads(path.read_text())
        assert rec["query"] == row["path"] and rec["predicted_class"] == row["predicted_class"]
        assert all(abs(rec["probabilities"][c] - float(row[f"p_{c}"])) < 1e-5 for c in CLASSES)
        near = rec["nearest_supports"]
        assert len(near["items"]) == 3 and [i["rank"] for i in near["items"]] == [1, 2, 3]
        for item in near["items"]:
            assert Path(item["path"]).is_file() and item["class"] == Path(item["path"]).parent.name
            assert near["value"] in item
        values = [i[near["value"]] for i in near["items"]]
        assert values == sorted(values, reverse=near["nearer_is"] == "larger")
        sal = rec["saliency"]
        assert sal["method"] == "occlusion" and sal["explained_class"] == row["predicted_class"]
        assert (sal["patch_size"], sal["stride"]) == default_patch(size, size) and sal["max_drop"] >= sal["min_drop"]
        flat = max(abs(sal["max_drop"]), abs(sal["min_drop"])) < 1e-4  # a saturated probability: said so
        assert sal["flat"] is flat and ("note" in sal) is flat
        with Image.open(folder / rec["panel"]) as im:
            im.verify()


def test_classify_explain_keeps_the_csv_and_writes_json_and_png_per_query(protonet_checkpoint, tmp_path):
    support, queries = write_folders(tmp_path)
    plain = classify(protonet_checkpoint, support, [queries], tmp_path / "plain.csv", device="cpu")
    out = classify(protonet_checkpoint, support, [queries], tmp_path / "explained.csv", device="cpu", explain=True)
    assert plain.read_text() == out.read_text() and not explain_dir(plain).exists()
    check_explanations(out, ["q0.png", "q1.png", "q2.png"], size=32)  # cls_args trains on 32 x 32
    rec = json.loads(next(explain_dir(out).glob("*.json")).read_text())
    # by default the checkpoint's embedding is weighed against raw pixels and the descriptors per support set
    assert rec["nearest_supports"]["measure"] == "task_adaptive_euclidean"
    assert rec["task_choice"]["space"] in ("weighted", "fusion") and set(rec["task_choice"]["weights"]) == {
        "embedding", "pixels", "histogram", "gradient", "orientation"}
    learned = classify(protonet_checkpoint, support, [queries], tmp_path / "learned.csv", device="cpu", explain=True,
                       space="learned")
    near = json.loads(next(explain_dir(learned).glob("*.json")).read_text())["nearest_supports"]
    assert near["measure"] == "protonet_euclidean" and near["value"] == "distance"
    with pytest.raises(ValueError, match="space must be"):
        classify(protonet_checkpoint, support, [queries], tmp_path / "x.csv", device="cpu", space="pixels")


def test_cli_classify_explain_with_a_maml_checkpoint(tmp_path):
    """MAML adapts with autograd inside predict; its nearest supports use the stated encoder fallback."""
    torch.manual_seed(0)
    learner = MAML(n_way=3, backbone_kwargs={"width": 4}, inner_steps=1)
    ckpt = tmp_path / "maml.ckpt"
    torch.save({"state_dict": {f"learner.{k}": v for k, v in learner.state_dict().items()},
                "imaging_meta": {"learner_config": learner.config, "task": "classification",
                                 "preprocessing": {"image_size": [28, 28], "channels": 1}}}, ckpt)
    support, queries = write_folders(tmp_path)
    out = tmp_path / "preds.csv"
    assert cli_main(["classify", "--checkpoint", str(ckpt), "--support", str(support), "--query", str(queries / "q1.png"),
                     "--out", str(out), "--device", "cpu", "--explain", "--space", "learned"]) == 0
    check_explanations(out, ["q1.png"], size=28)
    rec = json.loads(next(explain_dir(out).glob("*.json")).read_text())
    assert rec["nearest_supports"]["measure"] == "encoder_euclidean" and "before any adaptation" in rec["nearest_supports"]["description"]


def test_classify_says_when_queries_are_far_larger_or_of_another_aspect(protonet_checkpoint, tmp_path, caplog):
    support, queries = write_folders(tmp_path)
    big = np.clip(np.random.default_rng(2).normal(128, 30, (256, 512)), 0, 255).astype(np.uint8)
    write_png(queries / "wide.png", big)
    with caplog.at_level("WARNING", logger="imaging_meta.commands.classify"):
        classify(protonet_checkpoint, support, [queries], tmp_path / "p.csv", device="cpu")
    text = caplog.text
    assert "1 of 13 images are at least 4x the checkpoint's 32 x 32 input (largest 256 x 512" in text
    assert "keeps the checkpoint's preprocessing" in text and "wide.png" in text
    assert "another aspect ratio" in text
    caplog.clear()
    with caplog.at_level("WARNING", logger="imaging_meta.commands.classify"):
        classify(protonet_checkpoint, support, [queries / "q0.png"], tmp_path / "q.csv", device="cpu")
    assert "4x" not in caplog.text and "aspect" not in caplog.text  # 28 x 28 into 32 x 32: nothing to say


def test_classify_finetunes_a_new_head_deterministically(protonet_checkpoint, tmp_path, caplog):
    support, queries = write_folders(tmp_path)
    with caplog.at_level("INFO", logger="imaging_meta.commands.classify"):
        a = classify(protonet_checkpoint, support, [queries], tmp_path / "a.csv", device="cpu", finetune_steps=5,
                     explain=True)
    # the fit is reported (a review: fit_summary was never shown): in the log and in each explanation
    assert re.search(r"fine-tuned on the support: head, 5 steps: support loss [0-9.]+ -> [0-9.]+, support accuracy",
                     caplog.text)
    record = json.loads(next(explain_dir(a).glob("0000_*.json")).read_text())
    assert record["fine_tuning"]["steps"] == 5 and len(record["fine_tuning"]["losses"]) == 6
    b = classify(protonet_checkpoint, support, [queries], tmp_path / "b.csv", device="cpu", finetune_steps=5)
    plain = classify(protonet_checkpoint, support, [queries], tmp_path / "c.csv", device="cpu", space="learned")
    assert a.read_text() == b.read_text() != plain.read_text()
    with pytest.raises(ValueError, match="finetune_steps"):
        classify(protonet_checkpoint, support, [queries], tmp_path / "d.csv", device="cpu", finetune_steps=-1)


def test_classify_keeps_colour_for_the_task_adaptive_classifier(protonet_checkpoint, tmp_path):
    """Support classes that differ only in hue (the same textures; equal mean of the channels and equal luma): the
    default classifier reads the PNGs in colour (descriptors of every channel, the grey-trained embedding per
    channel) and gets every query right; the checkpoint alone reads grey, as it was trained."""
    from imaging_meta.checkpoint_io import load_learner
    from imaging_meta.commands.classify import loader_settings, with_space

    hues = {"pink": np.array([0.5, 0.5, 0.5]), "violet": np.array([0.5, 0.5, 0.5]) + 0.5 * np.array([-0.473, 0.185, 0.288])}
    rng = np.random.default_rng(3)

    def img(name):
        texture = 0.6 + 0.8 * rng.random((28, 28, 1))
        out = np.clip(np.round(200 * texture * hues[name]), 0, 255).astype(np.uint8)
        out[0, 0], out[0, 1] = 0, 255  # the loader's per-image scaling is then the same for every image
        return out

    support, queries = tmp_path / "support", tmp_path / "queries"
    for name in hues:
        for k in range(3):
            write_png(support / name / f"s{k}.png", img(name))
        for k in range(2):
            write_png(queries / f"{name}{k}.png", img(name))
    out = classify(protonet_checkpoint, support, [queries], tmp_path / "colour.csv", device="cpu", explain=True)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and all(Path(r["path"]).stem.rstrip("01") == r["predicted_class"] for r in rows)
    learner, extra = load_learner(protonet_checkpoint, "cpu")
    assert loader_settings(extra, learner)["channels"] == 1
    assert loader_settings(extra, with_space(learner))["channels"] == 3
    # each source's intensity rule: MedMNIST's uint8 / 255 is kept, an image folder's own range is the default
    assert extra["preprocessing"]["intensity"] == "uint8 / 255"  # this fixture is a MedMNIST checkpoint
    assert loader_settings(extra, learner)["intensity"] == "uint8 / 255"
    folder = {**extra, "preprocessing": {k: v for k, v in extra["preprocessing"].items() if k != "intensity"}}
    assert loader_settings(folder, learner)["intensity"] is None
    from PIL import Image

    with Image.open(next(explain_dir(out).glob("*.png"))) as im:
        im.verify()  # the panel shows colour support images


def test_a_colour_copy_of_a_grey_query_gets_its_answer_at_any_image_size(protonet_checkpoint, tmp_path, caplog):
    """A tinted colour copy of a grey query, against a grey support, under the own-range rule: made grey after
    resizing and stretched then, it was not its grey copy (resizing narrows the range: p 0.84 against 0.997 in a
    review, another class for one query); made grey at full size, before resizing, it is."""
    ckpt = torch.load(protonet_checkpoint, map_location="cpu", weights_only=False)
    ckpt["imaging_meta"]["preprocessing"].pop("intensity", None)  # an image folder's checkpoint: each image's own range
    own_range = tmp_path / "own_range.ckpt"
    torch.save(ckpt, own_range)
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:64, 0:64]
    patterns = {"stripes": (xx // 2) % 2 * 1.0, "checks": ((xx // 3 + yy // 3) % 2) * 1.0,
                "blob": np.exp(-((xx - 32) ** 2 + (yy - 32) ** 2) / 60.0)}

    def grey(name):  # fine structure: shrinking to the checkpoint's input narrows its range
        return np.clip(np.round(255 * (0.25 * patterns[name] + 0.75 * rng.random((64, 64)))), 0, 255).astype(np.uint8)

    support, queries = tmp_path / "support", tmp_path / "queries"
    for name in patterns:
        for k in range(3):
            write_png(support / name / f"s{k}.png", grey(name))
    for name in patterns:
        g = grey(name).astype(np.float64)
        write_png(queries / f"{name}_grey.png", g.astype(np.uint8))
        tint = np.stack([g, 0.8 * g + 25, 0.6 * g + 50], -1)  # the same picture, tinted: a colour image
        write_png(queries / f"{name}_tint.png", np.round(tint).astype(np.uint8))
    with caplog.at_level("WARNING", logger="imaging_meta.commands.classify"):
        out = classify(own_range, support, [queries], tmp_path / "out.csv", device="cpu")
    rows = {Path(r["path"]).stem: r for r in csv.DictReader(out.open())}
    for name in patterns:
        a, b = rows[f"{name}_grey"], rows[f"{name}_tint"]
        assert a["predicted_class"] == b["predicted_class"]
        for c in patterns:
            assert float(a[f"p_{c}"]) == pytest.approx(float(b[f"p_{c}"]), abs=0.01)
    assert "compared in grey" in caplog.text


def test_a_network_that_takes_colour_gets_a_colour_query_as_it_is(protonet_checkpoint, tmp_path, monkeypatch):
    """Only the learners that describe a grey task in grey (descriptors, task-adaptive) get a colour query made grey;
    a checkpoint that takes three channels, under --space learned, gets it in colour (a review)."""
    import imaging_meta.commands.classify as module

    ckpt = torch.load(protonet_checkpoint, map_location="cpu", weights_only=False)
    ckpt["imaging_meta"]["learner_config"]["init_args"]["in_channels"] = 3  # the same network, taking RGB
    ckpt["imaging_meta"]["preprocessing"]["channels"] = 3
    for state in (ckpt["state_dict"], ckpt["imaging_meta"].get("untrained_state_dict") or {}):
        for k, v in state.items():
            if k.endswith("layers.0.0.weight") and v.dim() == 4:
                state[k] = v.repeat(1, 3, 1, 1) / 3
    rgb = tmp_path / "rgb.ckpt"
    torch.save(ckpt, rgb)
    support, queries = write_folders(tmp_path)
    tint = np.stack([np.full((28, 28), 40), np.full((28, 28), 120), np.full((28, 28), 200)], -1)
    write_png(queries / "tinted.png", (tint + np.arange(28)[None, :, None]).astype(np.uint8))
    seen = []
    real = module.predict_queries

    def spy(learner, s_images, s_labels, classes, q_images, *a, **k):
        seen.append(q_images)
        return real(learner, s_images, s_labels, classes, q_images, *a, **k)

    monkeypatch.setattr(module, "predict_queries", spy)
    classify(rgb, support, [queries], tmp_path / "learned.csv", device="cpu", space="learned")
    q = torch.cat(seen)
    assert any(not torch.equal(x[0], x[1]) for x in q)  # the tinted query reached the network in colour


def test_classify_warns_when_a_ct_dicom_query_meets_png_supports(protonet_checkpoint, tmp_path, caplog):
    """The same CT picture as a DICOM (HU through ct_window) and as a PNG (its own range) got other inputs and other
    answers, silently."""
    import logging

    from tests.helpers import write_dicom

    support, queries = write_folders(tmp_path)
    hu = (lesion_patterns(3, 1, 28, 99)[0, 0].numpy() * 200.0).astype(np.float64)
    write_dicom(queries / "ct", hu, "q_ct.dcm")
    with caplog.at_level(logging.WARNING):
        classify(protonet_checkpoint, support, [queries], tmp_path / "p.csv", device="cpu")
    assert "CT DICOM images are read in Hounsfield units through ct_window" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        classify(protonet_checkpoint, support, [queries / "q0.png"], tmp_path / "png.csv", device="cpu")
    assert "Hounsfield" not in caplog.text


def test_classify_warns_that_pictures_are_not_scaled_as_lesion_patches_were(protonet_checkpoint, tmp_path, caplog):
    """A review: PNG exports of a lesion CSV's training patches were read stretched over their own range, up to
    0.65 away from the values the model saw, without a word."""
    ckpt = torch.load(protonet_checkpoint, weights_only=False)
    pre = ckpt["imaging_meta"]["preprocessing"]
    ckpt["imaging_meta"]["preprocessing"] = {"format": "lesion_csv", "patch_size": pre["image_size"],
                                             "patch_spacing": [1.0, 1.0], "channels": 1, "coordinates": "LPS",
                                             "ct_window": [-250.0, 250.0], "mr_percentiles": [1.0, 99.0]}
    torch.save(ckpt, tmp_path / "lesions.ckpt")
    support, queries = write_folders(tmp_path)
    with caplog.at_level("WARNING", logger="imaging_meta.commands.classify"):
        classify(tmp_path / "lesions.ckpt", support, [queries], tmp_path / "a.csv", device="cpu")
    assert "trained on lesion patches cut from volumes (CT window [-250.0, 250.0] HU" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="imaging_meta.commands.classify"):
        classify(protonet_checkpoint, support, [queries], tmp_path / "b.csv", device="cpu")
    assert "lesion patches" not in caplog.text
    # CT DICOM images alone are read through the window, as the patches were: no warning (it came on every run)
    from tests.helpers import write_dicom

    patterns = lesion_patterns(3, 2, 28, 7).numpy() * 200.0
    for c in range(3):
        for k in range(2):
            write_dicom(tmp_path / "dcm_support" / f"c{c}", patterns[c, k].astype(np.float64), f"s{k}.dcm")
        write_dicom(tmp_path / "dcm_queries", patterns[c, 0].astype(np.float64), f"q{c}.dcm")
    caplog.clear()
    with caplog.at_level("WARNING", logger="imaging_meta.commands.classify"):
        classify(tmp_path / "lesions.ckpt", tmp_path / "dcm_support", [tmp_path / "dcm_queries"], tmp_path / "c.csv",
                 device="cpu")
    assert "lesion patches" not in caplog.text


class SureLearner(Learner):
    """Two classes; p(class 1) saturates at 1.0 in float32 whatever is occluded (an ample margin), as the default
    classifier's does on a clear-cut query."""

    task = "classification"

    def predict(self, episode: Episode) -> torch.Tensor:
        ep = episode.unsqueeze()
        margin = 40.0 + ep.query_images[..., REGION[0], REGION[1]].mean((-3, -2, -1))  # (T, Q), far past float32's 1
        return torch.stack([torch.sigmoid(-margin), torch.sigmoid(margin)], -1)


def test_a_saturated_probability_gives_a_flat_map_said_so_and_not_stretched_to_full_colour(tmp_path):
    """A review: with p = 1.000 every drop is 0 or rounding noise (about 1e-7), and the panel scaled its colours to
    that noise, so it looked like a real heat map; nothing said the map was empty."""
    from imaging_meta.commands.explain import FLAT_DROP, saliency_range

    occ = occlusion_saliency(SureLearner(), region_episode(), patch_size=4, stride=4)
    assert occ.target == 1 and float(occ.probabilities[1]) == 1.0 and occ.flat
    assert saliency_range(occ.saliency) == FLAT_DROP and saliency_range(torch.full((2, 2), 1e-7)) == FLAT_DROP
    assert saliency_range(torch.tensor([[0.3, -0.5]])) == 0.5  # a real map keeps its own scale
    assert not occlusion_saliency(region_learner(), region_episode(), patch_size=4, stride=4).flat
    assert occ.saturated and occ.max_patch_drop < FLAT_DROP


class FaintLearner(Learner):
    """p(class 1) = 0.6 + 1.5e-4 x the mean of `REGION`: one patch over the region moves p by 1.5e-4."""

    task = "classification"

    def predict(self, episode: Episode) -> torch.Tensor:
        ep = episode.unsqueeze()
        p = 0.6 + 1.5e-4 * ep.query_images[..., REGION[0], REGION[1]].mean((-3, -2, -1))
        return torch.stack([1 - p, p], -1)


def test_flat_is_judged_on_each_patchs_drop_not_on_the_maps_means():
    """A review: with overlapping patches the map's per-pixel means (7.5e-5) were below the bar while covering one
    patch moved p by 1.5e-4, and the map was called flat and its probability (0.6) saturated."""
    from imaging_meta.commands.explain import FLAT_DROP

    occ = occlusion_saliency(FaintLearner(), region_episode(), patch_size=8, stride=4)
    assert float(occ.saliency.abs().max()) < FLAT_DROP <= occ.max_patch_drop
    assert not occ.flat and not occ.saturated
