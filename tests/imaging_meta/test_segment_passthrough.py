"""`imaging-meta segment`: what a mutation review found unguarded (its options reaching `segment()`: in
test_cli_passthrough). Several supports keep every part of a structure that one of them shows in two; the mask is written
as uint8; another adaptation seed gives another answer; a checkpoint's modality applies to supports that do not
say theirs; a binary label map is not called multi-label; a support slice that shows the structure in one pixel
counts."""

import logging

import nibabel as nib
import numpy as np
import torch

from imaging_meta.commands import segment as command
from imaging_meta.commands.segment import _support_slices, segment
from imaging_meta.volume.segmenter import LEARNER_ONLY
from tests.datamodules.dicom_fixtures import affine_ras, write_nifti
from tests.imaging_meta.test_segment_outputs import (
    PLAIN,
    ct_nifti,
    label_for,
    make_checkpoint,
    phantom,
    ras_grid,
    stand_in,
    support,  # noqa: F401 - a fixture
    threshold_predict,
)


def test_one_support_in_two_parts_keeps_both_parts_beside_a_support_in_one(tmp_path, monkeypatch):
    """The 3D step keeps as many parts as the support that shows the most: with a one-part support listed first
    and a two-part one second, both of the query's blocks stay. The mask is written as uint8."""
    shape, aff = (12, 10, 6), affine_ras()
    supports = []
    for parts in (1, 2):
        sup = np.zeros(shape, np.int16)
        sup[1:5, 1:5, 1:5] = 200
        if parts == 2:
            sup[7:11, 1:5, 1:5] = 200
        img = ct_nifti(sup, aff, tmp_path / f"s{parts}" / "sup.nii.gz")
        supports.append((img, write_nifti((sup > 0).astype(np.uint8), aff, tmp_path / f"s{parts}" / "sup_label.nii.gz")))
    query = np.zeros(shape, np.int16)
    query[1:5, 1:5, 1:5] = 200
    query[8:11, 1:4, 1:4] = 200
    q_img = ct_nifti(query, aff, tmp_path / "q" / "query.nii.gz")
    spacing, size = ras_grid(query.astype(np.float32), aff)
    ckpt = make_checkpoint(tmp_path / "m.ckpt", spacing, size)
    stand_in(monkeypatch, threshold_predict)
    (written,) = segment(ckpt, supports, [q_img], tmp_path / "out", device="cpu", options=LEARNER_ONLY, **PLAIN)
    img = nib.load(str(written))
    assert img.get_data_dtype() == np.uint8
    assert int((np.asarray(img.dataobj) > 0).sum()) == 64 + 27


def test_another_adaptation_seed_gives_another_answer(tmp_path, support):  # noqa: F811
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (2.0, 2.0), (32, 32))
    query = ct_nifti(phantom(seed=5), affine_ras(), tmp_path / "q5.nii.gz")
    maps = []
    for seed in (3, 4):
        out = segment(ckpt, [support], [query], tmp_path / f"s{seed}", device="cpu", adapt_steps=2, adapt_seed=seed,
                      explain=True, scale="checkpoint")
        maps.append(np.asarray(nib.load(out[1]).dataobj))
    assert not np.array_equal(maps[0], maps[1])


def test_a_checkpoints_modality_applies_to_supports_and_queries_that_do_not_say(tmp_path, monkeypatch):
    """A model trained on MR: its supports and queries without a sidecar are MR, with no --modality needed."""
    vol = np.abs(phantom(seed=1)).astype(np.int16)
    image = write_nifti(vol, affine_ras(), tmp_path / "s" / "sup.nii.gz")
    label = write_nifti(label_for(phantom(seed=1)), affine_ras(), tmp_path / "s" / "sup_label.nii.gz")
    query = write_nifti(np.abs(phantom(seed=2)).astype(np.int16), affine_ras(), tmp_path / "q" / "q.nii.gz")
    ckpt_path = make_checkpoint(tmp_path / "m.ckpt", (1.0, 1.0), (12, 10))
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["imaging_meta"]["preprocessing"]["modality"] = "MR"
    torch.save(ckpt, ckpt_path)
    stand_in(monkeypatch, threshold_predict)
    seen: list[str] = []
    original = command.modality_of

    def recorded(path, modality, fallback):
        seen.append(original(path, modality, fallback))
        return seen[-1]

    monkeypatch.setattr(command, "modality_of", recorded)
    (written,) = segment(ckpt_path, [(image, label)], [query], tmp_path / "out", device="cpu", **PLAIN)
    assert written.name == "q.nii.gz" and seen == ["MR", "MR"]


def test_a_binary_support_map_is_not_called_multi_label(tmp_path, monkeypatch, caplog, support):  # noqa: F811
    stand_in(monkeypatch, threshold_predict)
    query = ct_nifti(phantom(seed=2), affine_ras(), tmp_path / "q.nii.gz")
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (1.0, 1.0), (12, 10))
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [support], [query], tmp_path / "out", device="cpu", **PLAIN)
    assert not [r for r in caplog.records if "label values" in r.getMessage()]


def test_a_support_slice_showing_the_structure_in_one_pixel_is_a_support_slice():
    mask = torch.zeros(6, 5, 4)
    mask[2, 3, 1] = 1  # one pixel on slice 1
    mask[1:4, 1:4, 3] = 1
    assert _support_slices(mask, max_slices=12) == [1, 3]
    assert _support_slices(mask, max_slices=12, min_pixels=2) == [3]
