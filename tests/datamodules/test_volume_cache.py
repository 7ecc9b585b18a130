"""The disk cache of preprocessed volumes follows the files: a label map edited in place (a corrected label, left
and right swapped) is preprocessed again, not read from a stale cache file; and label ids above int16 survive.

Found by a review (2026-12-05): the cache folder was keyed by the preprocessing alone and MONAI hashed only the
paths, so `fit` with `cache: disk` (the folder config's setting) trained on the old labels, exit 0."""

from __future__ import annotations

import os
import re
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import PersistentDataset

from datamodules.segmentation import hash_with_file_stamps, memory_cache
from datamodules.transforms.volume import CastLabeld, volume_transforms


def _write(path, data, affine=np.diag([2.0, 2.0, 3.0, 1.0])):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def test_an_edited_label_map_is_preprocessed_again(tmp_path):
    rng = np.random.default_rng(0)
    image = _write(tmp_path / "ct.nii.gz", rng.integers(-200, 200, (16, 16, 4)).astype(np.int16))
    lab = np.zeros((16, 16, 4), np.uint8)
    lab[2:6, 2:6] = 2  # "right kidney" on the left
    lab[10:14, 10:14] = 3
    label = _write(tmp_path / "ct_label.nii.gz", lab)
    item = {"image": image, "label": label, "modality": "CT", "case_id": "c0"}
    tf = volume_transforms((2.0, 2.0), (16, 16))

    def cached():
        ds = PersistentDataset([item], tf, cache_dir=tmp_path / "cache", hash_func=hash_with_file_stamps)
        return torch.as_tensor(ds[0]["label"])[0]

    first = cached()
    assert int(first[4, 4, 0]) == 2 and int(first[12, 12, 0]) == 3
    assert torch.equal(cached(), first)  # unchanged files: read from the cache
    files = list((tmp_path / "cache").iterdir())
    swapped = lab.copy()
    swapped[lab == 2], swapped[lab == 3] = 3, 2
    _write(tmp_path / "ct_label.nii.gz", swapped)
    st = os.stat(label)
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a later edit, even within one second
    second = cached()
    assert int(second[4, 4, 0]) == 3 and int(second[12, 12, 0]) == 2
    assert len(list((tmp_path / "cache").iterdir())) == len(files) + 1


def test_the_hash_changes_with_a_file_and_not_without():
    item = {"image": __file__, "modality": "CT", "case_id": "c"}
    assert hash_with_file_stamps(item) == hash_with_file_stamps(dict(item))
    assert hash_with_file_stamps(item) != hash_with_file_stamps({**item, "image": os.path.dirname(__file__) + "/__init__.py"})


def test_label_ids_above_int16_keep_their_values():
    lbl = torch.tensor([[0.0, 1.0, 65537.0, 40000.0]])
    out = CastLabeld(["label"])({"label": lbl})["label"]
    assert out.dtype == torch.int32 and out.tolist() == [[0, 1, 65537, 40000]]
    assert CastLabeld(["label"])({"label": torch.tensor([0.0, 300.0])})["label"].dtype == torch.int16
    assert CastLabeld(["label"])({"label": torch.tensor([0.0, 200.0])})["label"].dtype == torch.uint8


def test_the_memory_cache_raises_a_files_error_after_its_threads_finish_and_caches_the_rest():
    """An error in one cache-filling thread used to reach the user while the other threads still ran, and the
    process then aborted (exit 134, "terminate called without an active exception"); it is now raised in the main
    thread, unchanged, once the pool is done. Items that load are still cached: the transform runs once each."""
    from types import SimpleNamespace

    import pytest
    from monai.transforms import Transform

    from datamodules.segmentation import SegmentationDataModule

    calls: list[int] = []

    class Load(Transform):
        def __call__(self, item):
            calls.append(item["x"])
            if item["x"] == 3:
                raise ValueError("scan3.nii.gz: image is constant")
            return {"x": item["x"] * 10}

    owner = SimpleNamespace(hparams=SimpleNamespace(cache="memory"))
    with pytest.raises(ValueError, match=r"^scan3\.nii\.gz: image is constant$"):
        SegmentationDataModule._cached(owner, [{"x": i} for i in range(6)], Load(), "volumes-x")
    calls.clear()
    ds = SegmentationDataModule._cached(owner, [{"x": i} for i in range(4) if i != 3], Load(), "volumes-x")
    assert [ds[i]["x"] for i in range(3)] + [ds[0]["x"]] == [0, 10, 20, 0]
    assert sorted(calls) == [0, 1, 2]  # filled once, read from memory after


def test_a_pixdim_that_contradicts_the_sform_does_not_move_the_volume_to_another_grid(tmp_path):
    """sform 3 mm (code 2), pixdim 1 mm, qform code 0: nibabel (and `imaging-meta scan`) place the voxels with the
    sform; MONAI's header correction replaced it by the 1 mm qform, so the loader read anatomy shrunk to a third."""
    from datamodules.transforms.volume import LoadVolumed

    data = np.arange(8 * 8 * 4, dtype=np.int16).reshape(8, 8, 4)
    sform = np.diag([3.0, 3.0, 3.0, 1.0])
    header = nib.Nifti1Image(data, np.eye(4)).header  # pixdim 1 mm
    header.set_qform(None, code=0)
    header["sform_code"] = 2
    header["srow_x"], header["srow_y"], header["srow_z"] = sform[0], sform[1], sform[2]
    path = tmp_path / "pixdim.nii.gz"
    nib.Nifti1Image(data, None, header=header).to_filename(str(path))
    assert np.allclose(nib.load(str(path)).affine, sform) and nib.load(str(path)).header.get_zooms() == (1, 1, 1)
    loaded = LoadVolumed(["image"])({"image": str(path)})["image"]
    assert np.allclose(np.asarray(loaded.affine)[:3, :3], sform[:3, :3])
    assert np.array_equal(np.asarray(loaded), data)


def _cache_item(tmp_path):
    rng = np.random.default_rng(1)
    image = _write(tmp_path / "ct.nii.gz", rng.integers(-200, 200, (16, 12, 5)).astype(np.int16))
    lab = np.zeros((16, 12, 5), np.uint8)
    lab[3:9, 2:7, 1:4] = 2
    label = _write(tmp_path / "ct_label.nii.gz", lab)
    return {"image": image, "label": label, "modality": "CT", "case_id": "c0"}, volume_transforms((2.0, 2.0), (16, 12))


def test_the_slice_cache_reads_back_the_same_volume_one_slice_at_a_time(tmp_path, monkeypatch):
    """`cache: disk` read a whole volume from disk for every slice of an episode (250 ms for a 256 x 256 x 300
    volume, against 10 ms for its slice): the file now holds each slice as one block, memory-mapped on reading."""
    from datamodules.slice_cache import SliceCache

    item, tf = _cache_item(tmp_path)
    plain = PersistentDataset([item], tf, cache_dir=tmp_path / "plain", hash_func=hash_with_file_stamps)[0]
    loads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or load(*a, **k))
    cache = SliceCache([item], tf, cache_dir=tmp_path / "slices", hash_func=hash_with_file_stamps)
    first, second = cache[0], cache[0]  # computed and written, then read back from the file
    assert loads and loads[-1].get("mmap") is True
    for got in (first, second):
        assert set(got) == set(plain)
        for key in ("image", "label"):
            want = torch.as_tensor(plain[key])
            assert got[key].shape == want.shape and torch.equal(torch.as_tensor(got[key]), want)
    c, h, w, d = second["image"].shape
    assert second["image"].stride()[-1] == c * h * w  # each slice is one contiguous block
    assert second["image"][..., 2].is_contiguous()
    (file,) = (tmp_path / "slices").iterdir()
    stored = load(file, weights_only=False)
    assert stored["image"].shape == (d, c, h, w) and stored["image"].is_contiguous()
    second["label"][..., 2] = 99  # a transform that writes into a loaded tensor: a private copy, not the file
    assert int(cache[0]["label"].max()) == 2


def test_the_slice_cache_reads_files_of_the_old_layout(tmp_path):
    """A cache folder filled by MONAI's PersistentDataset (before the slice layout) is read as it is."""
    from datamodules.slice_cache import SliceCache

    item, tf = _cache_item(tmp_path)
    old = PersistentDataset([item], tf, cache_dir=tmp_path / "cache", hash_func=hash_with_file_stamps)[0]
    files = list((tmp_path / "cache").iterdir())
    got = SliceCache([item], tf, cache_dir=tmp_path / "cache", hash_func=hash_with_file_stamps)[0]
    assert list((tmp_path / "cache").iterdir()) == files  # the old file was read, not written again
    for key in ("image", "label"):
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(old[key]))


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_slice_cache_file_is_computed_again_with_a_warning(tmp_path, damage):
    """A cache file cut short made MONAI's read stop the run (RuntimeError: PytorchStreamReader failed)."""
    from datamodules.slice_cache import SliceCache

    item, tf = _cache_item(tmp_path)
    first = SliceCache([item], tf, cache_dir=tmp_path / "c", hash_func=hash_with_file_stamps)[0]
    (file,) = (tmp_path / "c").iterdir()
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"x" * 999}[damage])
    with pytest.warns(UserWarning, match=rf"{re.escape(file.name)}: unreadable cache file .*preprocessing its volume again"):
        again = SliceCache([item], tf, cache_dir=tmp_path / "c", hash_func=hash_with_file_stamps)[0]
    assert torch.equal(torch.as_tensor(again["image"]), torch.as_tensor(first["image"]))
    assert file.read_bytes() != b"" and len(file.read_bytes()) == len(data)  # written again, whole


def test_a_cache_file_of_torchs_older_format_is_read_not_deleted(tmp_path):
    """torch.load(mmap=True) refuses files in the pre-zip format; they are read whole instead of deleted."""
    from datamodules.slice_cache import SliceCache

    item, tf = _cache_item(tmp_path)
    cache = SliceCache([item], tf, cache_dir=tmp_path / "c", hash_func=hash_with_file_stamps)
    first = cache[0]
    (file,) = (tmp_path / "c").iterdir()
    stored = torch.load(file, weights_only=False)
    torch.save(stored, file, _use_new_zipfile_serialization=False)
    old_bytes = file.read_bytes()
    again = SliceCache([item], tf, cache_dir=tmp_path / "c", hash_func=hash_with_file_stamps)[0]
    assert torch.equal(torch.as_tensor(again["image"]), torch.as_tensor(first["image"]))
    assert file.read_bytes() == old_bytes


def test_a_cache_folder_that_cannot_be_written_is_refused_unless_it_is_complete(tmp_path, monkeypatch):
    """MONAI skips a write it is not permitted without a word, and every episode preprocessed its volume again."""
    from datamodules import slice_cache
    from datamodules.slice_cache import SliceCache

    item, tf = _cache_item(tmp_path)
    cache = SliceCache([item], tf, cache_dir=tmp_path / "c", hash_func=hash_with_file_stamps)
    cache.check_writable()  # writable: nothing to say
    monkeypatch.setattr(slice_cache, "_can_write_in", lambda folder: False)  # another user's folder (tests run as root)
    with pytest.raises(PermissionError, match=r"c: the disk cache folder cannot be written, and 1 of 1 preprocessed "
                                              r"volumes are not in it.*data\.init_args\.cache_dir"):
        cache.check_writable()
    monkeypatch.undo()
    cache[0]  # filled once
    monkeypatch.setattr(slice_cache, "_can_write_in", lambda folder: False)
    cache.check_writable()  # complete: only read, fine on read-only storage
    monkeypatch.undo()
    assert slice_cache._can_write_in(tmp_path / "c") and not list((tmp_path / "c").glob(".write-check-*"))


def test_an_episode_file_already_there_is_not_written_again(tmp_path, monkeypatch):
    """A complete cache on read-only storage was refused: every run rewrote its fixed episode files."""
    from datamodules.sampling import episode_files
    from datamodules.sampling.samplers_segmentation import SegmentationEpisodeSpec

    specs = [SegmentationEpisodeSpec(organ="liver", support=((0, 3),), query=((1, 4),), seed=0)]
    path = episode_files.save_episodes(specs, ["a", "b"], tmp_path / "e.json", {"seed": 0})

    def refuse(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(episode_files, "atomic_open", refuse)
    assert episode_files.save_episodes(specs, ["a", "b"], path, {"seed": 0}) == path  # the same: not written
    with pytest.raises(OSError, match="Read-only"):
        episode_files.save_episodes(specs, ["a", "b"], path, {"seed": 1})  # other content: written (here refused)


def test_the_memory_cache_leaves_the_warning_state_as_it_found_it():
    """Readers enter warnings.catch_warnings in the cache-filling threads (nibabel for a NIfTI with a scale factor),
    which is not thread-safe: an interleaving left an 'error' filter or a dead recording list behind, and every later
    warning of the run was swallowed (a review). The fill restores the state once its threads are done."""

    def leaky(item):
        warnings.catch_warnings(record=True).__enter__()  # an interleaving that never restores
        warnings.simplefilter("error")
        return item

    state = (warnings.showwarning, list(warnings.filters), warnings._showwarnmsg_impl)  # type: ignore[attr-defined]
    ds = memory_cache([{"i": i} for i in range(6)], leaky)
    assert [ds[i]["i"] for i in range(6)] == list(range(6))
    assert (warnings.showwarning, list(warnings.filters), warnings._showwarnmsg_impl) == state  # type: ignore[attr-defined]
