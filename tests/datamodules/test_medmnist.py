"""`MedMNIST`: tiny .npz files written here (grey, RGB, 3D) pool into one ItemTable; bad files name file and key."""

from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.sources.medmnist import MedMNIST


def write_npz(path: Path, shape=(28, 28), n_classes=3, per_split=(6, 2, 2), labels_fn=None, **override) -> Path:
    """A MedMNIST-format file: ``{split}_images`` uint8 (n, *shape), ``{split}_labels`` (n, 1) cycling classes."""
    rng = np.random.default_rng(len(path.name))
    arrays = {}
    for s, n in zip(("train", "val", "test"), per_split, strict=True):
        arrays[f"{s}_images"] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % n_classes).reshape(n, 1).astype(np.int64)
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_grey_files_pool_with_prefixed_class_names(tmp_path):
    a = write_npz(tmp_path / "organamnist.npz")
    b = write_npz(tmp_path / "bloodmnist.npz", n_classes=2)
    table = MedMNIST([str(a), str(b)], class_names={"bloodmnist": ["basophil", "eosinophil"]}).build()
    assert table.classes == ["organamnist/0", "organamnist/1", "organamnist/2", "bloodmnist/basophil", "bloodmnist/eosinophil"]
    assert table.images.shape == (20, 1, 28, 28) and len(table) == 20
    assert table.class_counts()["organamnist/0"] == 4 and table.class_counts()["bloodmnist/basophil"] == 5
    assert set(table.sites) == {"organamnist", "bloodmnist"}
    assert table.patients == table.item_ids and len(set(table.item_ids)) == 20  # each image its own patient
    # pixel values: uint8 / 255, in file order train, val, test
    with np.load(a) as f:
        assert torch.allclose(table.images[0, 0], torch.from_numpy(f["train_images"][0] / 255.0).float())
        assert torch.allclose(table.images[6, 0], torch.from_numpy(f["val_images"][0] / 255.0).float())
    assert table.item_ids[6] == "organamnist:val:0"
    only_train = MedMNIST([str(a)], splits=["train"]).build()
    assert len(only_train) == 6


def test_rgb_becomes_grey_or_stays_rgb_and_resizes(tmp_path):
    f = write_npz(tmp_path / "pathmnist.npz", shape=(28, 28, 3))
    grey = MedMNIST([str(f)]).build()
    assert grey.images.shape == (10, 1, 28, 28)
    with np.load(f) as d:
        rgb = d["train_images"][0].astype(np.float64) / 255.0
    assert np.allclose(grey.images[0, 0].numpy(), rgb @ [0.299, 0.587, 0.114], atol=1e-6)
    colour = MedMNIST([str(f)], channels=3, image_size=[32, 32]).build()
    assert colour.images.shape == (10, 3, 32, 32)
    g = write_npz(tmp_path / "dermamnist.npz")
    three = MedMNIST([str(g)], channels=3).build()
    assert torch.equal(three.images[:, 0], three.images[:, 2])


def test_3d_volumes_and_subsampling(tmp_path):
    f = write_npz(tmp_path / "organmnist3d.npz", shape=(28, 28, 28), per_split=(9, 3, 3))
    table = MedMNIST([str(f)], image_size=[16, 16, 16]).build()
    assert table.images.shape == (15, 1, 16, 16, 16)
    small = MedMNIST([str(f)], max_per_class=2, seed=1).build()
    assert small.class_counts() == {"organmnist3d/0": 2, "organmnist3d/1": 2, "organmnist3d/2": 2}
    again = MedMNIST([str(f)], max_per_class=2, seed=1).build()
    other = MedMNIST([str(f)], max_per_class=2, seed=2).build()
    assert again.item_ids == small.item_ids and torch.equal(again.images, small.images)
    assert other.item_ids != small.item_ids


def test_bad_files_name_the_file_and_key(tmp_path):
    cases = {
        "missing_key": (dict(val_labels=None), r"missing_key\.npz: missing key\(s\) \['val_labels'\]"),
        "float_images": (dict(train_images=np.zeros((6, 28, 28), np.float32)), r"float_images\.npz: train_images has dtype float32"),
        "nan_images": (dict(test_images=np.full((2, 28, 28), np.nan)), r"nan_images\.npz: test_images holds NaN"),
        "nan_labels": (dict(val_labels=np.array([[0.0], [np.nan]])), r"nan_labels\.npz: val_labels holds NaN"),
        "bad_shape": (dict(train_images=np.zeros((6, 28), np.uint8)), r"bad_shape\.npz: train_images has shape \(6, 28\)"),
        "wrong_count": (dict(train_labels=np.zeros((5, 1), np.int64)), r"wrong_count\.npz: train_labels has shape \(5, 1\)"),
        "negative": (dict(test_labels=np.array([[0], [-1]])), r"negative\.npz: test_labels holds the negative label -1"),
        "chestmnist": (dict(train_labels=np.zeros((6, 14), np.int64)), r"chestmnist\.npz: train_labels .*multi-label"),
    }
    for name, (override, pattern) in cases.items():
        f = write_npz(tmp_path / f"{name}.npz", **override)
        with pytest.raises(ValueError, match=pattern):
            MedMNIST([str(f)]).build()
    ok = write_npz(tmp_path / "organamnist.npz")
    with pytest.raises(ValueError, match=r"organamnist\.npz: .*_labels holds label 2, out of range of the 2 class_names"):
        MedMNIST([str(ok)], class_names={"organamnist": ["a", "b"]}).build()
    with pytest.raises(ValueError, match="does not exist"):
        MedMNIST([str(tmp_path / "absent.npz")]).build()
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.npz: cannot read it as a \.npz"):
        MedMNIST([str(tmp_path / "junk.npz")]).build()
    # a member whose bytes were damaged after download: numpy's index reads, the member's CRC fails on reading
    damaged = bytearray(write_npz(tmp_path / "damaged.npz").read_bytes())
    start = damaged.index(b"val_images.npy") + 200
    damaged[start:start + 50] = bytes(50)
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"damaged\.npz: cannot read \w+ \(.*download it again"):
        MedMNIST([str(tmp_path / "damaged.npz")]).build()
    big = write_npz(tmp_path / "organamnist_64.npz", shape=(64, 64))
    with pytest.raises(ValueError, match=r"pooled files need one shape: set image_size"):
        MedMNIST([str(ok), str(big)]).build()
    assert MedMNIST([str(ok), str(big)], image_size=[28, 28]).build().images.shape == (20, 1, 28, 28)
    with pytest.raises(ValueError, match="not among the paths' stems"):
        MedMNIST([str(ok)], class_names={"pathmnist": ["x"]})


def test_pixels_are_the_files_bytes_over_255_rows_and_columns_kept(tmp_path):
    """``uint8 / 255`` whatever an image's maximum (the rule checkpoints record), and an RGB image's rows stay rows
    (random bytes reach 255 and look alike either way round: a division by the maximum and a transposed image passed)."""
    rng = np.random.default_rng(0)
    grey = {f"{s}_images": rng.integers(0, 101, size=(3, 28, 28), dtype=np.uint8) for s in ("train", "val", "test")}
    a = write_npz(tmp_path / "dim.npz", per_split=(3, 3, 3), **grey)
    table = MedMNIST([str(a)]).build()
    torch.testing.assert_close(table.images[0, 0], torch.from_numpy(grey["train_images"][0] / 255.0).float())
    rgb = {f"{s}_images": rng.integers(0, 256, size=(3, 28, 28, 3), dtype=np.uint8) for s in ("train", "val", "test")}
    b = write_npz(tmp_path / "colour.npz", per_split=(3, 3, 3), **rgb)
    colour = MedMNIST([str(b)], channels=3).build()
    expected = torch.from_numpy(rgb["train_images"][1].transpose(2, 0, 1) / 255.0).float()
    torch.testing.assert_close(colour.images[1], expected)
