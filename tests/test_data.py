"""Tests for selfsup.data.datasets on small generated fixtures; nothing is downloaded."""

from __future__ import annotations

import gzip
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import selfsup.data as data  # the package re-exports the constants
from selfsup.data import builtin  # home of SYSTEM_DATA_DIRS (patched below)
from selfsup.data.datasets import load_dataset
from selfsup.errors import DataNotFoundError
from selfsup.data.folders import ImageFolderDataset
from selfsup.data.containers import InMemoryDataset, default_load_size
from selfsup.data.builtin import fashion_mnist_available
from selfsup.data.labels import label_subset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """Only the fixtures' folders are searched: no $SELFSUP_DATA, no /usr/share/datasets."""
    monkeypatch.delenv("SELFSUP_DATA", raising=False)
    monkeypatch.setattr(builtin, "SYSTEM_DATA_DIRS", {})


def assert_images(ds: InMemoryDataset, n: int, c: int, h: int) -> None:
    assert ds.images.shape == (n, c, h, h)
    assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
    assert (len(ds), ds.num_channels, ds.image_size) == (n, c, h)


# ---------------------------------------------------------------------------------------------- idx


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_idx_set(folder: Path, compress: bool, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize(
    ("name", "subfolder", "compress"),
    [
        ("fashion-mnist", "fashion-mnist", True),
        ("fashion-mnist", "FashionMNIST/raw", False),  # torchvision's layout, uncompressed
        ("mnist", "mnist", False),
        ("mnist", "MNIST/raw", True),
    ],
)
def test_idx_datasets_both_layouts(tmp_path, name, subfolder, compress):
    arrays = make_idx_set(tmp_path / subfolder, compress)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset(name, split, data_dir=tmp_path)
        images, labels = arrays[prefix]
        assert_images(ds, len(images), 1, 28)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
        assert ds.num_classes == 10 and ds.name == name
    expected = {"fashion-mnist": ((0.2860,), (0.3530,)), "mnist": ((0.1307,), (0.3081,))}[name]
    assert (ds.mean, ds.std) == expected
    if name == "fashion-mnist":
        assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_idx_found_through_env_and_in_root_itself(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "plain", compress=False, n_train=7)
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path / "plain"))
    assert len(load_dataset("fashion-mnist")) == 7
    assert fashion_mnist_available()


def test_data_dir_searched_before_env(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "a" / "mnist", compress=True, n_train=3)
    make_idx_set(tmp_path / "b" / "mnist", compress=True, n_train=4)
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path / "b"))
    assert len(load_dataset("mnist", data_dir=tmp_path / "a")) == 3
    assert len(load_dataset("mnist")) == 4


def test_idx_not_found_lists_places_searched(tmp_path, monkeypatch):
    system = tmp_path / "system"
    monkeypatch.setattr(builtin, "SYSTEM_DATA_DIRS", {"fashion-mnist": (system,)})
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path / "given")
    message = str(info.value)
    for place in ("given/fashion-mnist", "given/FashionMNIST/raw", "env/fashion-mnist", str(system)):
        assert place in message
    assert "apt-get install -y dataset-fashion-mnist" in message and "download=True" in message
    assert isinstance(info.value, FileNotFoundError)
    assert not fashion_mnist_available(tmp_path / "given")


def test_mnist_not_found_without_any_root():
    with pytest.raises(DataNotFoundError, match=r"SELFSUP_DATA is unset[\s\S]*MNIST\('ROOT', download=True\)"):
        load_dataset("mnist", "test")


def test_truncated_idx_file_is_reported(tmp_path):
    make_idx_set(tmp_path / "mnist", compress=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST is not installed")
def test_real_fashion_mnist_matches_known_statistics(monkeypatch):
    monkeypatch.undo()  # the real search path, including /usr/share/datasets/fashion-mnist
    test = load_dataset("fashion-mnist", "test")
    assert_images(test, 10_000, 1, 28)
    assert test.labels.bincount().tolist() == [1000] * 10
    pixels = test.images.double() / 255
    assert pixels.mean().item() == pytest.approx(0.2860, abs=0.005)
    assert pixels.std().item() == pytest.approx(0.3530, abs=0.005)


# ----------------------------------------------------------------------------------------- embedded


def test_embedded_sample():
    train, test = load_dataset("embedded", "train"), load_dataset("embedded", "test")
    assert_images(train, 10_000, 1, 28)
    assert_images(test, 2_000, 1, 28)
    assert train.labels.bincount().tolist() == [1000] * 10
    assert test.labels.bincount().tolist() == [200] * 10
    assert train.classes == data.FASHION_MNIST_CLASSES and train.num_classes == 10
    assert (train.mean, train.std) == ((0.2860,), (0.3530,))
    assert train.images.double().div(255).mean().item() == pytest.approx(0.2860, abs=0.01)
    assert not torch.equal(train.images[:2000], test.images)


# ------------------------------------------------------------------------------- CIFAR and STL-10


def write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


@pytest.fixture
def skip_md5(monkeypatch):
    # torchvision verifies every CIFAR / STL-10 file against the md5 of the real release, which the
    # tiny fixtures cannot match; with this patch only the files' presence is required.
    import torchvision.datasets.cifar
    import torchvision.datasets.stl10

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", lambda *args, **kwargs: True)


def cifar_rows(n: int, seed: int) -> np.ndarray:
    """n images in CIFAR's row format: 1024 red, 1024 green, 1024 blue bytes, each row-major 32x32."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def test_cifar10_pickle_batches(tmp_path, skip_md5):
    folder = tmp_path / "cifar-10-batches-py"
    train_rows = []
    for i in range(1, 6):
        rows = cifar_rows(2, seed=i)
        train_rows.append(rows)
        write_pickle(folder / f"data_batch_{i}", {"data": rows, "labels": [i % 10, (i + 1) % 10]})
    write_pickle(folder / "test_batch", {"data": cifar_rows(3, seed=9), "labels": [7, 8, 9]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_pickle(folder / "batches.meta", {"label_names": names})

    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert_images(train, 10, 3, 32)
    assert torch.equal(train.images, torch.from_numpy(np.concatenate(train_rows).reshape(10, 3, 32, 32)))
    assert train.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert train.classes == names
    assert (train.mean, train.std) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert_images(test, 3, 3, 32)
    assert test.labels.tolist() == [7, 8, 9]


def test_cifar100_pickle_files(tmp_path, skip_md5, monkeypatch):
    folder = tmp_path / "cifar100" / "cifar-100-python"  # ROOT/cifar100/ is searched as well
    write_pickle(folder / "train", {"data": cifar_rows(4, 0), "fine_labels": [0, 99, 5, 5], "coarse_labels": [0] * 4})
    write_pickle(folder / "test", {"data": cifar_rows(2, 1), "fine_labels": [1, 2], "coarse_labels": [0] * 2})
    write_pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path))
    train = load_dataset("cifar100")
    assert_images(train, 4, 3, 32)
    assert train.labels.tolist() == [0, 99, 5, 5] and train.num_classes == 100
    assert (train.mean, train.std) == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    assert len(load_dataset("cifar100", "test")) == 2


def test_cifar_not_found_lists_places(tmp_path, skip_md5):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(tmp_path) in str(info.value) and str(tmp_path / "cifar10") in str(info.value)
    assert "CIFAR10('ROOT', download=True)" in str(info.value)


def test_stl10_binary(tmp_path, skip_md5):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    for part, n in (("train", 4), ("unlabeled", 3), ("test", 2)):
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        expected[part] = images
        # STL-10 stores each channel column-major; torchvision transposes it back.
        (folder / f"{part}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 10, 3]))  # 1-based on disk
    (folder / "test_y.bin").write_bytes(bytes([5, 6]))
    (folder / "class_names.txt").write_text("\n".join(data.STL10_CLASSES) + "\n")

    train = load_dataset("stl10", "train", data_dir=tmp_path)
    assert_images(train, 4, 3, 96)
    assert torch.equal(train.images, torch.from_numpy(expected["train"]))
    assert train.labels.tolist() == [0, 1, 9, 2]
    assert train.classes == data.STL10_CLASSES
    assert (train.mean, train.std) == (IMAGENET_MEAN, IMAGENET_STD)
    unlabeled = load_dataset("stl10", "unlabeled", data_dir=tmp_path)
    assert_images(unlabeled, 3, 3, 96)
    assert unlabeled.labels is None and unlabeled.num_classes == 10
    both = load_dataset("stl10", "train+unlabeled", data_dir=tmp_path)
    assert both.labels.tolist() == [0, 1, 9, 2, -1, -1, -1]
    assert load_dataset("stl10", "test", data_dir=tmp_path).labels.tolist() == [4, 5]


# ------------------------------------------------------------------------------------ image folders


def save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def make_class_folder(root: Path) -> None:
    """Two classes, mixed sizes, modes (RGB, L, RGBA, P) and formats (PNG, JPEG), plus clutter."""
    save(root / "cat" / "a.png", Image.new("RGB", (40, 30), (200, 10, 10)))
    save(root / "cat" / "b.jpg", Image.new("L", (20, 50), 128), quality=95)
    save(root / "cat" / "nested" / "c.JPEG", Image.new("RGB", (70, 70), (0, 0, 255)))
    save(root / "dog" / "d.png", Image.new("RGBA", (33, 33), (0, 255, 0, 100)))
    palette = Image.new("P", (64, 16), 1)
    palette.putpalette([0, 0, 0, 255, 255, 0] + [0] * 762)
    save(root / "dog" / "e.png", palette, transparency=0)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()


@pytest.mark.parametrize("image_size", [32, 48])
def test_imagefolder_in_memory(tmp_path, image_size):
    make_class_folder(tmp_path / "pets")
    ds = load_dataset(f"imagefolder:{tmp_path / 'pets'}", image_size=image_size)
    assert isinstance(ds, InMemoryDataset)  # default: few images and a small size
    assert_images(ds, 5, 3, default_load_size(image_size))  # 32 -> 32, 48 -> 55: as streaming decodes them
    streamed = load_dataset(f"imagefolder:{tmp_path / 'pets'}", image_size=image_size, in_memory=False)
    assert all(torch.equal(ds.images[i], streamed[i][0]) for i in range(len(ds)))
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert (ds.mean, ds.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert ds.images[0, :, 10, 10].tolist() == [200, 10, 10]
    assert ds.images[2, :, 10, 10].tolist() == pytest.approx([0, 0, 255], abs=3)  # JPEG
    assert ds.images[4, :, 5, 5].tolist() == [255, 255, 0]  # palette with transparency


def test_imagefolder_streamed(tmp_path):
    make_class_folder(tmp_path / "pets")
    ds = load_dataset(f"imagefolder:{tmp_path / 'pets'}", image_size=40, in_memory=False)
    assert isinstance(ds, ImageFolderDataset)
    assert len(ds) == 5 and ds.num_classes == 2 and ds.num_channels == 3
    assert ds.image_size == 40 and ds.load_size == default_load_size(40) == 46
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert (ds.mean, ds.std) == (IMAGENET_MEAN, IMAGENET_STD)
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 46, 46) and image.dtype == torch.uint8
        assert label == ds.labels[i]
    assert default_load_size(224) == 256 and default_load_size(32) == 32  # small images: not upscaled
    copy = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
    assert copy.files == ds.files and torch.equal(copy[3][0], ds[3][0])
    assert not isinstance(load_dataset(f"imagefolder:{tmp_path / 'pets'}", image_size=96), InMemoryDataset)


def test_imagefolder_resizes_shorter_side_then_centre_crops(tmp_path):
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:40] = (0, 255, 0)
    wide[:, 40:] = (0, 0, 255)
    save(tmp_path / "flat" / "wide.png", Image.fromarray(wide))
    ds = ImageFolderDataset(tmp_path / "flat", image_size=10, load_size=10)
    image, label = ds[0]
    assert label == -1 and image.shape == (3, 10, 10)
    assert image[:, :, 1:-1].tolist() == torch.tensor([0, 255, 0]).view(3, 1, 1).expand(3, 10, 8).tolist()


def test_imagefolder_flat_is_unlabeled(tmp_path):
    for i, size in enumerate([(10, 12), (30, 8), (16, 16)]):
        save(tmp_path / "flat" / f"{i}.png", Image.new("RGB", size, (i, i, i)))
    ds = load_dataset(f"imagefolder:{tmp_path / 'flat'}", image_size=8)
    assert_images(ds, 3, 3, 8)
    assert ds.labels is None and ds.classes == [] and ds.num_classes == 0
    streamed = load_dataset(f"imagefolder:{tmp_path / 'flat'}", image_size=8, in_memory=False)
    assert streamed.labels is None and streamed[1][1] == -1


def test_imagefolder_gray_detected(tmp_path):
    save(tmp_path / "g" / "x" / "a.png", Image.new("L", (12, 12), 7))
    save(tmp_path / "g" / "y" / "b.jpg", Image.new("L", (9, 14), 200))
    ds = load_dataset(f"imagefolder:{tmp_path / 'g'}", image_size=8)
    assert_images(ds, 2, 1, 8)
    assert (ds.mean, ds.std) == ((0.5,), (0.25,))
    forced = load_dataset(f"imagefolder:{tmp_path / 'g'}", image_size=8, num_channels=3)
    assert forced.num_channels == 3 and forced.mean == IMAGENET_MEAN


def test_imagefolder_train_val_layout(tmp_path):
    root = tmp_path / "imnet"
    for cls in ("ant", "bee", "cow"):
        save(root / "train" / cls / "1.png", Image.new("RGB", (9, 9)))
    save(root / "val" / "cow" / "1.png", Image.new("RGB", (9, 9)))  # val lacks two classes
    train = load_dataset(f"imagefolder:{root}", "train", image_size=8)
    val = load_dataset(f"imagefolder:{root}", "test", image_size=8)
    assert train.classes == val.classes == ["ant", "bee", "cow"]
    assert val.labels.tolist() == [2]  # the training folder's index, not 0


def test_imagefolder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*empty"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    save(tmp_path / "c" / "full" / "a.png", Image.new("RGB", (4, 4)))
    (tmp_path / "c" / "hollow").mkdir()
    (tmp_path / "c" / "hollow" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"class folder .*hollow holds no images"):
        load_dataset(f"imagefolder:{tmp_path / 'c'}")
    save(tmp_path / "c" / "loose.png", Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match="mixes images"):
        load_dataset(f"imagefolder:{tmp_path / 'c'}")
    with pytest.raises(ValueError, match="no train/ sub-folder"):
        load_dataset(f"imagefolder:{tmp_path / 'c' / 'full'}", "test")
    with pytest.raises(DataNotFoundError, match="missing"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "c" / "full" / "broken.png").write_bytes(b"not a png")
    # Bad files are refused when the data set is built (tests/test_bad_images.py covers every kind).
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolderDataset(tmp_path / "c" / "full", image_size=4, num_channels=3)
    ds = ImageFolderDataset(tmp_path / "c" / "full", image_size=4, num_channels=3, scan=False)
    with pytest.raises(ValueError, match="broken.png"):
        ds[1]


# ------------------------------------------------------------------------------- names and splits


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="imagefolder:PATH"):
        load_dataset("imagenet21k")
    with pytest.raises(ValueError, match="unlabeled"):
        load_dataset("stl10", "val")
    with pytest.raises(ValueError, match="'train', 'test'|train, test"):
        load_dataset("embedded", "unlabeled")


def test_in_memory_dataset_subset_and_validation():
    ds = load_dataset("embedded", "test")
    part = ds.subset(torch.tensor([0, 5, 7]))
    assert_images(part, 3, 1, 28)
    assert torch.equal(part.images[1], ds.images[5]) and part.labels.tolist() == ds.labels[[0, 5, 7]].tolist()
    assert (part.classes, part.name, part.mean) == (ds.classes, ds.name, ds.mean)
    image, label = ds[5]
    assert torch.equal(image, ds.images[5]) and label == int(ds.labels[5])
    with pytest.raises(ValueError, match="uint8"):
        InMemoryDataset(torch.zeros(2, 1, 4, 4), None, [], "x", (0.5,), (0.25,))
    with pytest.raises(ValueError, match="mean/std"):
        InMemoryDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), None, [], "x", (0.5,), (0.25,))


# ------------------------------------------------------------------------------------- label_subset


def imbalanced_labels(counts=(100, 50, 10, 1, 33)) -> torch.Tensor:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_label_subset_proportional_keeps_class_shares(fraction):
    labels = imbalanced_labels()
    indices = label_subset(labels, fraction, seed=0, balance="proportional")
    assert indices.dtype == torch.int64 and torch.equal(indices, indices.sort().values)
    assert len(indices.unique()) == len(indices)
    counts = labels[indices].bincount(minlength=5).tolist()
    assert counts == [max(1, round(fraction * n)) for n in [100, 50, 10, 1, 33]]


@pytest.mark.parametrize("balance", ["equal", "proportional"])
def test_label_subset_seeds(balance):
    labels = imbalanced_labels(counts=(100, 50, 40, 60, 33))
    assert torch.equal(label_subset(labels, 0.1, 3, balance=balance), label_subset(labels, 0.1, 3, balance=balance))
    assert not torch.equal(label_subset(labels, 0.1, 3, balance=balance), label_subset(labels, 0.1, 4, balance=balance))
    for f1, f2 in [(0.01, 0.1), (0.1, 0.11), (0.1, 0.5), (0.5, 1.0)]:
        small = set(label_subset(labels, f1, 3, balance=balance).tolist())
        large = set(label_subset(labels, f2, 3, balance=balance).tolist())
        assert small <= large  # nested for one seed


def test_label_subset_has_equal_counts_per_class_by_default():
    # ImageNet's 1% list: 12,811 images over 1,000 classes, 12 or 13 each. Here 283 images, 5 classes.
    labels = imbalanced_labels(counts=(100, 50, 40, 60, 33))
    counts = labels[label_subset(labels, 0.1, seed=0)].bincount(minlength=5).tolist()
    assert sum(counts) == round(0.1 * 283) == 28 and sorted(set(counts)) == [5, 6] and counts.count(6) == 3
    counts = labels[label_subset(labels, 0.5, seed=0)].bincount(minlength=5).tolist()
    assert sorted(counts) == [28, 28, 28, 29, 29]  # round(141.5) = 142 = 5 x 28 + 2; the smallest class (33) allows it


def test_label_subset_equal_counts_capped_by_the_smallest_class_says_so():
    labels = imbalanced_labels()  # 100, 50, 10, 1, 33
    with pytest.warns(UserWarning, match="smallest class holds \\(1\\); every class gets 1"):
        counts = labels[label_subset(labels, 0.1, seed=0)].bincount(minlength=5).tolist()
    assert counts == [1, 1, 1, 1, 1]


def test_label_subset_skips_unlabeled_and_empty_classes():
    labels = torch.tensor([-1, 0, 0, 2, 2, 2, 2, -1])
    indices = label_subset(labels, 0.5, seed=0, num_classes=4)
    assert labels[indices].tolist().count(0) == 1 and labels[indices].tolist().count(2) == 2
    assert (labels[indices] >= 0).all()


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, math.nan])
def test_label_subset_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="label fraction"):
        label_subset(torch.arange(10) % 2, fraction, seed=0)
