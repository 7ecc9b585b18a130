"""Which files `classify` and `fit` (`ImageFolder`) take from a support or query folder, and how `classify` names
the queries it cannot read: hidden folders and macOS archive metadata are no images and no classes, and every
unreadable query is named with its reason."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.sources.image_folder import ImageFolder
from imaging_meta.commands.classify import classify, query_files, support_folder


def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folders(tmp_path):
    for k, c in enumerate(("a", "b")):
        for i in range(2):
            _png(tmp_path / "support" / c / f"{c}{i}.png", 10 * k + i)
    for i in range(2):
        _png(tmp_path / "queries" / f"q{i}.png", 100 + i)
    return tmp_path / "support", tmp_path / "queries"


def test_files_under_hidden_folders_are_no_images_for_classify_as_for_fit(folders):
    """support/a/.thumbnails/x.png was a support image of class a for classify, while fit ignored it."""
    support, queries = folders
    _png(support / "a" / ".thumbnails" / "a0.png", 7)
    _png(queries / ".cache" / "deep" / "q9.png", 8)
    assert [f.relative_to(support).as_posix() for f, _ in support_folder(support)[1]] == [
        "a/a0.png", "a/a1.png", "b/b0.png", "b/b1.png"]
    assert [f.name for f in query_files([queries])] == ["q0.png", "q1.png"]
    assert len(ImageFolder(str(support)).build()) == 4
    inside = queries / ".cache"  # relative to the folder given: a hidden folder given itself is read
    assert [f.name for f in query_files([inside])] == ["q9.png"]


def test_a_query_given_twice_is_classified_once_with_a_warning(folders, caplog):
    """--query queries --query queries/q0.png wrote the file's row twice, silently."""
    _, queries = folders
    with caplog.at_level(logging.WARNING):
        got = query_files([queries, queries / "q0.png", Path(str(queries) + "/./q1.png")])
    assert [f.name for f in got] == ["q0.png", "q1.png"]
    assert "2 query file(s) given more than once, classified once" in caplog.text


def test_a_macos_archive_folder_is_no_class_for_classify_nor_fit(folders, caplog):
    """Unzipping a macOS archive leaves __MACOSX/ (AppleDouble files named ._*): it stopped classify ("no image in
    this class folder") and fit ("empty class folder")."""
    support, _ = folders
    junk = support / "__MACOSX" / "a" / "._a0.png"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    _png(support / "b" / "__MACOSX" / "b0.png", 9)  # and never an image inside a class
    with caplog.at_level(logging.INFO):
        classes, items = support_folder(support)
        table = ImageFolder(str(support)).build()
    assert classes == ["a", "b"] and len(items) == 4
    assert table.classes == ["a", "b"] and len(table) == 4
    assert "__MACOSX: macOS archive metadata (left by unzipping), not a class folder" in caplog.text


def test_an_image_directly_in_the_support_folder_is_named_as_unused(folders, caplog):
    """support/stray.png belongs to no class: it was left out without a word."""
    support, _ = folders
    _png(support / "stray.png", 11)
    with caplog.at_level(logging.WARNING):
        classes, items = support_folder(support)
    assert classes == ["a", "b"] and len(items) == 4
    assert "1 image(s) directly in the support folder are not used (e.g. stray.png)" in caplog.text


def test_every_unreadable_query_is_named_with_its_reason(folders, tmp_path, caplog, legacy_checkpoints):
    """Only five were named ("and 6 more"): the others were named nowhere."""
    support, queries = folders
    for i in range(8):
        (queries / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (queries / "blank.png").unlink(missing_ok=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(queries / "blank.png")
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as err:
        classify(legacy_checkpoints["protonet_cls"], support, [queries], tmp_path / "pred.csv", device="cpu", batch_size=4)
    message = str(err.value)
    assert message.startswith("9 of 11 queries cannot be read, and are not in ")
    assert message.endswith("; and 4 more, each named with its reason in a warning above") and "\n" not in message
    in_error = {Path(m).name for m in re.findall(r"(\S+\.png): ", message.split(" queries cannot be read, and are not in ")[1])}
    in_warnings = {Path(m).name for m in re.findall(r"cannot be read: (\S+): ", caplog.text)}
    assert len(in_error) == 5 and len(in_warnings) == 4 and not in_error & in_warnings  # each named once
    assert in_error | in_warnings == {f"broken{i}.png" for i in range(8)} | {"blank.png"}
    assert "blank.png: constant image" in message + caplog.text
    assert (tmp_path / "pred.csv").read_text().count("\n") == 3  # the header and the two readable queries


def test_a_fixed_head_of_another_size_names_the_checkpoints_learner(folders, tmp_path):
    """Under the default `--space auto` the learner is wrapped by the task-adaptive classifier: the refusal named
    the wrapper ("the checkpoint's TaskAdaptiveClassifier was meta-trained 3-way"), not the checkpoint's MAML."""
    import torch

    from imaging_meta.learners.gradient.maml import MAML
    from imaging_meta.module import EpisodicModule

    module = EpisodicModule(MAML(n_way=3, backbone_kwargs={"width": 4}), baselines=False)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    ckpt["imaging_meta"]["preprocessing"] = {"image_size": [16, 16], "channels": 1}
    torch.save(ckpt, tmp_path / "maml.ckpt")
    support, queries = folders
    with pytest.raises(ValueError, match=r"2 classes \(a, b\), but the checkpoint's MAML was meta-trained 3-way"):
        classify(tmp_path / "maml.ckpt", support, [queries], tmp_path / "p.csv", device="cpu")


def test_every_support_image_that_cannot_be_read_is_named(folders, tmp_path, legacy_checkpoints):
    """The support stopped at its first broken image; every one is named now."""
    support, queries = folders
    for c in ("a", "b"):
        (support / c / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ValueError, match=r"^2 support image\(s\) cannot be read .*a/zz_bad\.png: .*; .*b/zz_bad\.png: "):
        classify(legacy_checkpoints["protonet_cls"], support, [queries], tmp_path / "p.csv", device="cpu")


def test_a_query_that_is_a_copy_of_a_support_image_is_named(folders, tmp_path, caplog, legacy_checkpoints):
    import shutil

    support, queries = folders
    shutil.copy(support / "a" / "a0.png", queries / "renamed.png")
    with caplog.at_level(logging.WARNING, logger="imaging_meta"):
        classify(legacy_checkpoints["protonet_cls"], support, [queries], tmp_path / "p.csv", device="cpu")
    assert re.search(r"1 query is also a support image, or a byte-for-byte copy of one \(e\.g\. .*renamed\.png\)",
                     caplog.text), caplog.text


@pytest.mark.parametrize("model,space,finetune", [
    ("protonet_cls", "auto", 0), ("maml_cls", "learned", 0), ("matching_cls", "auto", 0), ("mann_cls", "learned", 0),
    ("protonet_cls", "learned", 3), ("protonet_cls", "transductive", 0)])
def test_queries_classified_in_one_episode_get_the_answers_of_one_episode_each(model, space, finetune):
    """`classify` puts its queries in one episode (the support encoded, a learner adapted, a head fine-tuned once
    for them, not once per query): each query's answer is the one it gets alone."""
    import torch

    from imaging_meta.commands.classify import predict_queries, with_space
    from tests.imaging_meta.fewshot import classification_episode
    from tests.imaging_meta.test_non_transductive import build

    learner = build(model, transductive=space == "transductive")
    learner = with_space(learner, "learned" if space == "transductive" else space, finetune)
    ep = classification_episode(n_way=5, n_shot=2, n_query=2, tasks=1, size=16, seed=4)
    s_images, s_labels, q_images = ep.support_images[0], ep.support_labels[0], ep.query_images[0]
    classes = [f"c{i}" for i in range(5)]
    together, choices = predict_queries(learner, s_images, s_labels, classes, q_images)
    alone = torch.cat([predict_queries(learner, s_images, s_labels, classes, q[None], first_index=j)[0]
                       for j, q in enumerate(q_images)])
    assert together.shape == (10, 5) and len(choices) == 10
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    if space == "auto":
        assert all(c == choices[0] and c["space"] for c in choices)  # one support: one choice, for every query


def test_a_grey_querys_answer_does_not_change_when_a_colour_query_is_classified_with_it():
    """A learner that reads colour decides from the support whether a task is grey: with the queries in one
    episode, a colour query made its grey neighbours colour (0.025 in probability, under `classify`'s default).
    Against a grey support, a colour query is described in grey as the loader makes it (`colour.as_grey`)."""
    import torch

    from imaging_meta.commands.classify import predict_queries
    from tests.imaging_meta.test_non_transductive import build

    learner = build("task_adaptive_cls")
    g = torch.Generator().manual_seed(0)
    support = torch.rand(4, 1, 32, 32, generator=g).expand(4, 3, 32, 32).contiguous()  # grey stored as RGB
    labels = torch.tensor([0, 0, 1, 1])
    grey = torch.rand(2, 1, 32, 32, generator=g).expand(2, 3, 32, 32).contiguous()
    colour = torch.rand(1, 3, 32, 32, generator=g)
    alone, alone_choice = predict_queries(learner, support, labels, ["a", "b"], grey)
    mixed, mixed_choice = predict_queries(learner, support, labels, ["a", "b"], torch.cat([grey[:1], colour, grey[1:]]))
    torch.testing.assert_close(mixed[[0, 2]], alone, atol=1e-6, rtol=0)
    assert [c["colour"] for c in mixed_choice] == [False, False, False] and not alone_choice[0]["colour"]
    from imaging_meta.learners.descriptors.colour import as_grey

    grey_copy = as_grey(colour[None])[0].expand(1, 3, 32, 32)
    as_grey_probs, _ = predict_queries(learner, support, labels, ["a", "b"], grey_copy)
    torch.testing.assert_close(mixed[1:2], as_grey_probs, atol=1e-6, rtol=0)


def test_a_support_image_copied_into_another_class_is_warned_about(folders, tmp_path, caplog, legacy_checkpoints):
    """fit warned about a copy across class folders; classify compared queries with the support, not the support
    with itself."""
    import shutil

    support, queries = folders
    shutil.copy(support / "a" / "a0.png", support / "b" / "b_copy.png")
    with caplog.at_level(logging.WARNING):
        classify(legacy_checkpoints["protonet_cls"], support, [queries], tmp_path / "pred.csv", device="cpu")
    assert "1 support image(s) are byte-for-byte copies of an image of another class" in caplog.text
    assert "a0.png = " in caplog.text and "b_copy.png" in caplog.text


def test_the_support_is_encoded_once_for_the_queries_of_a_pass(folders, tmp_path, monkeypatch, legacy_checkpoints):
    """`classify` passed 32 queries at a time with the whole support at every image size, so 1000 queries at
    32 x 32 encoded the support 32 times (a review, 2026-12-06); by default a pass now holds `PASS_PIXELS` worth of
    queries (1568 at 32 x 32), and the CSV is the same as with small passes."""
    import imaging_meta.commands.classify as cl

    support, queries = folders
    for i in range(2, 40):
        _png(queries / f"q{i}.png", 100 + i)
    assert cl.queries_per_pass([32, 32]) == 1568 and cl.queries_per_pass([512, 512]) == 32
    passes = []
    real = cl.predict_queries
    monkeypatch.setattr(cl, "predict_queries", lambda learner, s, *a, **k: passes.append(1) or real(learner, s, *a, **k))
    classify(legacy_checkpoints["protonet_cls"], support, [queries], tmp_path / "one.csv", device="cpu")
    assert len(passes) == 1
    classify(legacy_checkpoints["protonet_cls"], support, [queries], tmp_path / "small.csv", device="cpu", batch_size=7)
    assert len(passes) == 1 + 6
    one, small = ((tmp_path / f).read_text().splitlines() for f in ("one.csv", "small.csv"))
    assert len(one) == len(small) == 41 and one[0] == small[0]
    for a, b in zip(one[1:], small[1:], strict=True):  # the same answers; probabilities to float rounding
        (pa, ya, *qa), (pb, yb, *qb) = a.split(","), b.split(",")
        assert (pa, ya) == (pb, yb) and max(abs(float(x) - float(y)) for x, y in zip(qa, qb, strict=True)) <= 2e-6
