"""What TensorBoard shows, read back from the event files: the hparams of a run with their metric columns
(HPARAMS tab), the image panels of classification and segmentation episodes (IMAGES tab) and the figures of
``imaging-meta evaluate`` given a log folder."""

import io
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from imaging_meta.commands.cli import cli_main
from imaging_meta.commands.evaluate import evaluate
from imaging_meta.evaluation import panels
from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter
from imaging_meta.module import HP_METRICS, EpisodicModule, factory_config, flat_hparams
from tests.helpers import cls_args
from tests.imaging_meta.fewshot import segmentation_episode

IMAGES = {"images": 0}  # keep every image event


def _events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance=IMAGES)
    acc.Reload()
    return acc


def _hparams(acc: EventAccumulator) -> tuple[dict, set]:
    """The run's hparams (name -> value) and the tags of its hparam metrics, as the HPARAMS tab reads them."""
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return values, {m.name.tag for m in experiment.metric_infos}


def _last(acc: EventAccumulator, tag: str) -> float:
    return acc.Scalars(tag)[-1].value


def _pixels(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")).astype(int)


def _has_colour(img: np.ndarray, hex_colour: str, tol: int = 40) -> bool:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(img - rgb).max(-1) <= tol).any())


@pytest.fixture(scope="module")
def cls_runs(tmp_path_factory):
    """Two one-epoch classification runs (fit, then test of the best checkpoint) through the real configs:
    second-order MAML and a prototypical network, on tiny MedMNIST-format files. ~5 s together."""
    tmp = tmp_path_factory.mktemp("tb_cls")
    runs = {}
    for model in ("maml_cls", "protonet_cls"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli = cli_main(["fit", *cls_args(tmp, model), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                            "--trainer.limit_val_batches", "1", "--test_after_fit", "true",
                            "--trainer.logger.init_args.name", model])
        runs[model] = Path(cli.trainer.log_dir)
    return runs, tmp


def test_hparams_name_the_learner_optimiser_and_data_and_differ_between_learners(cls_runs):
    runs, _ = cls_runs
    maml, metrics = _hparams(_events(runs["maml_cls"]))
    proto, proto_metrics = _hparams(_events(runs["protonet_cls"]))
    assert metrics == proto_metrics == set(HP_METRICS)  # the HPARAMS tab's metric columns
    # configs/model/maml_cls.yaml: inner_lr 0.1, 3 inner steps, second order; Adam at 0.001
    assert maml["learner/class"] == "MAML" and maml["learner/inner_lr"] == pytest.approx(0.1)
    assert maml["learner/inner_steps"] == 3 and maml["learner/first_order"] == "false"
    assert maml["learner/backbone"] == "conv4" and maml["learner/backbone_kwargs/width"] == 8  # shrunk by cls_args
    assert maml["optimizer/class"] == "Adam" and maml["optimizer/lr"] == pytest.approx(1e-3)
    assert maml["optimizer/betas"] == "[0.9, 0.999]" and "optimizer/foreach" not in maml
    assert maml["lr_scheduler/class"] == "none"
    for run in (maml, proto):  # the data settings, from the datamodule
        assert run["task"] == "classification" and run["data/class"] == "ClassificationDataModule"
        assert (run["data/n_way"], run["data/n_shot"], run["data/n_query"]) == (5, 1, 2)
        assert run["data/protocol"] == "standard" and run["data/image_size"] == "32x32"
        assert run["trainer/max_epochs"] == 1 and run["trainer/max_steps"] == -1  # no step limit given
        assert run["trainer/precision"] == "32-true" and run["seed"] == 42
    assert proto["learner/class"] == "PrototypicalNetwork" and "learner/inner_lr" not in proto
    assert proto["learner/distance"] == "euclidean"
    differ = {k for k in set(maml) | set(proto) if maml.get(k) != proto.get(k)}
    assert {"learner/class", "learner/inner_lr"} <= differ and not any(k.startswith(("data/", "optimizer/")) for k in differ)


def test_the_validation_panel_sits_at_the_step_of_the_validation_scalars(cls_runs):
    """Lightning logs a validation inside fit at global_step - 1; the panel was one step after its scalars."""
    runs, _ = cls_runs
    for run in runs.values():
        acc = _events(run)
        assert [e.step for e in acc.Images("val/panel")] == [e.step for e in acc.Scalars("val/score")]


def test_the_validation_panel_keeps_the_step_of_its_scalars_under_gradient_accumulation(tmp_path):
    """A review (2026-12-07): with accumulate_grad_batches 2 and validation after every batch, a batch that does not
    step the optimiser left global_step - 1 one below the step Lightning logs the scalars at; a panel was filed under
    the validation before its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = cli_main(["fit", *cls_args(tmp_path, "protonet_cls"), "--trainer.max_epochs", "1",
                        "--trainer.accumulate_grad_batches", "2", "--data.init_args.episodes_per_epoch", "8",
                        "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1"])
    acc = _events(cli.trainer.log_dir)
    scalars = [e.step for e in acc.Scalars("val/score")]
    assert scalars == [0, 0, 1, 1] and [e.step for e in acc.Images("val/panel")] == scalars


def test_the_hparam_metrics_are_the_logged_validation_and_test_metrics(cls_runs):
    runs, _ = cls_runs
    for run in runs.values():
        acc = _events(run)
        assert acc.Scalars("hp/test_metric")[0].value == HP_METRICS["hp/test_metric"]  # until measured
        assert _last(acc, "hp/test_metric") == pytest.approx(_last(acc, "test/acc"), abs=1e-6)
        assert _last(acc, "hp/val_metric") == pytest.approx(_last(acc, "val/score"), abs=1e-6)
        assert 0.0 <= _last(acc, "hp/test_metric") <= 1.0
        assert "hp_metric" not in acc.Tags()["scalars"]  # the configs turn Lightning's placeholder off


def test_classification_panel_shows_the_episode_with_right_and_wrong_answers(cls_runs):
    runs, _ = cls_runs
    acc = _events(runs["protonet_cls"])
    # one episode: 5 classes (columns), 1 support row, 2 query rows (n_query=2 per class)
    width = round(panels.CLASS_CELL[0] * 5 * panels.DPI)
    height = round((panels.CLASS_CELL[1] * 3 + 0.2 + 0.16 * panels.TITLE_LINES) * panels.DPI)
    for tag in ("val/panel", "test/panel"):
        events = acc.Images(tag)
        assert len(events) == 1 and (events[0].width, events[0].height) == (width, height)
        img = _pixels(events[0])
        assert img.shape == (height, width, 3)
        # 10 queries framed in green (right) or red (wrong); the test accuracy says how many of each to expect
        assert _has_colour(img, panels.RIGHT) or _has_colour(img, panels.WRONG)


class _Episodes(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return segmentation_episode(n_shot=1, n_query=1, tasks=2, size=32, seed=i)


def test_segmentation_panel_rows_of_support_truth_prediction(tmp_path):
    torch.manual_seed(0)
    learner = PrototypicalSegmenter(backbone="unet", backbone_kwargs={"out_channels": 8, "features": [4, 4, 8, 8, 16, 4]})
    module = EpisodicModule(learner, optimizer=partial(torch.optim.AdamW, lr=2e-3),
                            lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=3), n_log_images=2)
    tb = TensorBoardLogger(str(tmp_path), name="seg", default_hp_metric=True)  # Lightning's own hparams come second
    trainer = Trainer(accelerator="cpu", max_epochs=2, logger=tb, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, inference_mode=False, default_root_dir=tmp_path)
    loader = partial(torch.utils.data.DataLoader, _Episodes(), batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
        trainer.test(module, dataloaders=loader(), verbose=False)
    acc = _events(tb.log_dir)
    params, metrics = _hparams(acc)
    assert params["learner/class"] == "PrototypicalSegmenter" and params["task"] == "segmentation"
    assert params["lr_scheduler/class"] == "StepLR" and params["lr_scheduler/step_size"] == 3
    assert params["optimizer/class"] == "AdamW" and params["optimizer/lr"] == pytest.approx(2e-3)
    assert params["module/weight_averaging"] == "none"  # it changes results: a column of its own
    assert not any(k.startswith("data/") for k in params)  # bare dataloaders: no datamodule to describe
    assert metrics == set(HP_METRICS)
    assert _last(acc, "hp/test_metric") == pytest.approx(_last(acc, "test/dice"), abs=1e-6)
    # a row per episode (n_log_images=2): support + mask, query + truth, prediction, probability
    width, height = round(4 * panels.MASK_CELL[0] * panels.DPI), round(2 * panels.MASK_CELL[1] * panels.DPI)
    val = acc.Images("val/panel")
    assert len(val) == 2, "one panel per validation epoch"
    assert {(e.width, e.height) for e in val + acc.Images("test/panel")} == {(width, height)}
    assert val[0].step < val[1].step
    img = _pixels(val[-1])
    assert _has_colour(img, panels.TRUTH) and _has_colour(img, panels.PREDICTION)  # the masks as coloured overlays


def test_panel_titles_name_missing_metadata():
    assert panels.row_title("liver", "GE | Signa | 3", 0.8123) == "liver · site: GE | Signa | 3 · Dice 0.812"
    assert panels.row_title(None, "", None) == "structure not recorded · site: not recorded · Dice –"
    ep = segmentation_episode(n_shot=1, n_query=1, tasks=1, size=16)
    ep.classes, ep.site = [[]], [""]
    from imaging_meta.tasks import get_task

    img = panels.episode_panel(get_task("segmentation"), ep, ep.query_labels.float(), n=3)
    assert img.shape == (round(panels.MASK_CELL[1] * panels.DPI), round(4 * panels.MASK_CELL[0] * panels.DPI), 3)


def test_factories_and_nested_learner_configs_flatten_to_scalars():
    adam = factory_config(partial(torch.optim.Adam, lr=0.01))
    assert adam["class_path"] == "torch.optim.adam.Adam" and adam["init_args"]["lr"] == 0.01
    assert adam["init_args"]["betas"] == (0.9, 0.999) and "foreach" not in adam["init_args"]
    assert factory_config(torch.optim.SGD)["init_args"]["lr"] == 1e-3  # a bare class: its defaults
    assert factory_config(lambda p: torch.optim.SGD(p, lr=1))["init_args"] == {}
    assert factory_config(None)["class_path"] == "none"
    flat = flat_hparams("learner", {"class_path": "a.b.Wrapper", "init_args": {
        "embedding": {"class_path": "a.b.Inner", "init_args": {"width": 4, "sizes": [1, 2]}}, "lr": None, "on": True}})
    assert flat == {"learner/class": "Wrapper", "learner/embedding/class": "Inner", "learner/embedding/width": 4,
                    "learner/embedding/sizes": "[1, 2]", "learner/lr": "none", "learner/on": "true"}


def test_evaluate_writes_its_figures_as_images_given_a_log_dir(cls_runs, tmp_path):
    runs, tmp = cls_runs
    ckpt = next((runs["protonet_cls"] / "checkpoints").glob("best*.ckpt"))
    kw = dict(shots=[1], episodes=4, cache_dir=str(tmp / "cache"), n_panel=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate(ckpt, tmp_path / "run", log_dir=tmp_path / "tb", **kw)
    # the run folder holds no event file (test_evaluate.py: the same command gives the same bytes)
    assert not [p for p in (tmp_path / "run").rglob("*") if "tfevents" in p.name]
    acc = _events(tmp_path / "tb")
    figures = {p.stem: p for p in (tmp_path / "run").glob("*.png")}
    assert {"best_worst", "reliability"} <= set(figures)
    assert set(acc.Tags()["images"]) == {f"evaluate/{name}" for name in figures}
    step = torch.load(ckpt, weights_only=True)["global_step"]
    for name, path in figures.items():
        (event,) = acc.Images(f"evaluate/{name}")
        with Image.open(path) as im:
            assert (event.width, event.height) == im.size and event.step == step
    assert "evaluate/results/text_summary" in acc.Tags()["tensors"]  # results.md in the TEXT tab


def test_a_classification_panel_of_3d_patches_shows_their_middle_slices():
    """A review: a lesion CSV's 3D patches (C, D, H, W) crashed the test report's panel."""
    from imaging_meta.evaluation.panels import classification_panel

    g = torch.Generator().manual_seed(0)
    support, query = torch.rand(2, 1, 6, 8, 8, generator=g), torch.rand(2, 1, 6, 8, 8, generator=g)
    image = classification_panel(support, torch.tensor([0, 1]), query, torch.tensor([0, 1]), torch.tensor([0, 0]),
                                 ["a", "b"])
    assert image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] > 50


def test_a_classification_panels_title_fits_its_width_and_the_panel_keeps_its_size():
    """On one line at 5 columns the title lost its '5-way 1' and its 'queries' off both edges (a review). Wrapped
    to the width, every line lies inside the figure; a longer title does not change the image's size."""
    from imaging_meta.evaluation import panels

    title = ("5-way 1-shot episode · site: GE MEDICAL SYSTEMS | LightSpeed VCT | inst-773a0b + Philips | Ingenia | "
             "inst-12ab34 · accuracy 0.360 on 25 queries")
    fig = panels._figure(panels.CLASS_CELL[0] * 5, 3.0)
    text = fig.suptitle(panels.wrapped_title(title, 0.92 * fig.get_figwidth()), fontsize=8)
    fig.canvas.draw()
    box, frame = text.get_window_extent(), fig.bbox
    assert box.x0 >= frame.x0 and box.x1 <= frame.x1 and "5-way 1-shot" in text.get_text()
    assert "queries" in text.get_text() and text.get_text().count("\n") < panels.TITLE_LINES
    g = torch.Generator().manual_seed(0)
    s, q = torch.rand(5, 1, 8, 8, generator=g), torch.rand(5, 1, 8, 8, generator=g)
    labels = torch.arange(5)
    short = panels.classification_panel(s, labels, q, labels, labels, list("abcde"), "5-way 1-shot episode")
    long = panels.classification_panel(s, labels, q, labels, labels, list("abcde"), title * 3)
    assert short.shape == long.shape


def test_mask_panels_show_slices_in_the_radiological_convention():
    """A review: the panels put the patient's left (low x of a RAS volume) on the viewer's left, mirrored against
    every viewer. Now the left half of the body is on the right of the picture, anterior (high y) up."""
    image = np.zeros((64, 64), dtype=np.float32)
    image[:16, 40:] = 1.0  # the patient's left (low x), anterior (high y)
    empty = np.zeros_like(image)
    row = dict(support_image=image, support_mask=empty, query_image=image, truth=empty, prediction=empty,
               structure="s", site="x", score=0.5)
    grey = panels.segmentation_panel([row]).astype(float).mean(-1)
    h, w = grey.shape
    cell = grey[int(0.15 * h):int(0.9 * h), int(0.02 * w):int(0.23 * w)]  # the first column's slice
    ch, cw = cell.shape
    top_right = cell[: ch // 3, 2 * cw // 3:].mean()
    assert top_right > cell[: ch // 3, : cw // 3].mean() + 100 and top_right > cell[2 * ch // 3:, 2 * cw // 3:].mean() + 100


def test_the_probability_panel_is_drawn_the_same_way_round_as_the_slices_beside_it():
    """A review: the fourth column (the foreground probability) was drawn with the patient's left on the left,
    mirrored against the three slices beside it."""
    image = np.zeros((64, 64), dtype=np.float32)
    image[:16, 40:] = 1.0  # the patient's left (low x), anterior (high y)
    empty = np.zeros_like(image)
    row = dict(support_image=image, support_mask=empty, query_image=image, truth=empty, prediction=empty,
               probability=image, structure="s", site="x", score=0.5)
    grey = panels.segmentation_panel([row]).astype(float).mean(-1)
    h, w = grey.shape
    for column in range(4):
        cell = grey[int(0.15 * h):int(0.9 * h), int((0.02 + column / 4) * w):int((0.23 + column / 4) * w)]
        ch, cw = cell.shape
        assert cell[: ch // 3, 2 * cw // 3:].mean() > cell[: ch // 3, : cw // 3].mean() + 100, column


def test_the_best_and_worst_episodes_of_3d_patches_show_their_middle_slices(tmp_path):
    """A review: `evaluate` on 3D lesion patches scored every episode, then stopped drawing best_worst.png
    (imshow of a (D, H, W) volume) before it wrote the report."""
    from imaging_meta.episode import Episode, collate_episodes
    from imaging_meta.evaluation.plots import PanelKeeper, best_worst_panel
    from imaging_meta.tasks import CLASSIFICATION

    images = torch.zeros(2, 1, 5, 12, 12)
    images[:, :, 2] = 1.0  # only the middle slice is bright
    ep = Episode(support_images=images, support_labels=torch.tensor([0, 1]), query_images=images,
                 query_labels=torch.tensor([0, 1]), classes=["a", "b"], site="s", support_ids=["s0", "s1"],
                 query_ids=["q0", "q1"])
    keeper = PanelKeeper(CLASSIFICATION, 1, 0.5)
    keeper.offer(collate_episodes([ep, ep]), torch.tensor([[[0.9, 0.1], [0.2, 0.8]]] * 2),
                 [{"episode": e, "acc": 1.0 - e} for e in range(2)], 0)
    best, worst = keeper.best_worst()
    assert best[0]["support_images"].shape == (2, 12, 12) and bool((best[0]["support_images"] == 1).all())
    png = best_worst_panel(best, worst, CLASSIFICATION, tmp_path / "bw.png")
    assert png is not None and (tmp_path / "bw.png").stat().st_size > 0
