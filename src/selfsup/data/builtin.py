"""The built-in data sets: Fashion-MNIST / MNIST idx files, the shipped ``embedded`` sample, CIFAR / STL-10 through torchvision.

Nothing is downloaded: files are looked for in ``data_dir``, ``$SELFSUP_DATA`` and :data:`SYSTEM_DATA_DIRS`;
when none is found, :class:`DataNotFoundError` lists where it looked and how to get the data.
"""

from __future__ import annotations

import gzip
import math
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from selfsup.data.containers import (
    DATASET_NAMES, FASHION_MNIST_CLASSES, InMemoryDataset, MNIST_CLASSES, STL10_CLASSES, MEAN_STD,
)
from selfsup.errors import DataNotFoundError


DATASET_SPLITS = {name: ("train", "test") for name in DATASET_NAMES}
DATASET_SPLITS["stl10"] = ("train", "test", "unlabeled", "train+unlabeled")

# Folders searched after data_dir and $SELFSUP_DATA. A module constant so tests can empty it.
SYSTEM_DATA_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

def fashion_mnist_available(data_dir: str | os.PathLike | None = None) -> bool:
    """Whether both Fashion-MNIST splits can be found (without reading them); see :func:`load_dataset`."""
    return all(_find_idx_files("fashion-mnist", split, data_dir)[0] is not None for split in ("train", "test"))


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST / MNIST: idx files read with gzip + numpy
# --------------------------------------------------------------------------------------------------

_IDX_SUBFOLDERS = {
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
    "mnist": ("mnist", "MNIST/raw", "MNIST"),
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_GET_DATA_HINT = {
    "fashion-mnist": (
        "apt-get install -y dataset-fashion-mnist (installs to /usr/share/datasets/fashion-mnist); or, on a "
        "machine with internet, python -c \"import torchvision; torchvision.datasets.FashionMNIST('ROOT', "
        "download=True)\" and pass data_dir=ROOT (--data-dir ROOT) or set SELFSUP_DATA=ROOT; or use the "
        "shipped 'embedded' subset"
    ),
    "mnist": (
        "on a machine with internet, python -c \"import torchvision; torchvision.datasets.MNIST('ROOT', "
        "download=True)\", copy ROOT here and pass data_dir=ROOT (--data-dir ROOT) or set SELFSUP_DATA=ROOT"
    ),
    "cifar10": (
        "on a machine with internet, python -c \"import torchvision; torchvision.datasets.CIFAR10('ROOT', "
        "download=True)\" (creates ROOT/cifar-10-batches-py), copy ROOT here and pass data_dir=ROOT "
        "(--data-dir ROOT) or set SELFSUP_DATA=ROOT"
    ),
    "cifar100": (
        "on a machine with internet, python -c \"import torchvision; torchvision.datasets.CIFAR100('ROOT', "
        "download=True)\" (creates ROOT/cifar-100-python), copy ROOT here and pass data_dir=ROOT "
        "(--data-dir ROOT) or set SELFSUP_DATA=ROOT"
    ),
    "stl10": (
        "on a machine with internet, python -c \"import torchvision; torchvision.datasets.STL10('ROOT', "
        "download=True)\" (creates ROOT/stl10_binary, 2.6 GB), copy ROOT here and pass data_dir=ROOT "
        "(--data-dir ROOT) or set SELFSUP_DATA=ROOT"
    ),
}


def _search_roots(data_dir: str | os.PathLike | None) -> list[Path]:
    roots = [Path(data_dir).expanduser()] if data_dir is not None else []
    roots += [Path(p).expanduser() for p in os.environ.get("SELFSUP_DATA", "").split(os.pathsep) if p]
    return roots


def _not_found(name: str, split: str, data_dir, tried: list[str], expected: str) -> DataNotFoundError:
    where = "\n  ".join(tried) if tried else "(nowhere)"
    unset = "" if _search_roots(data_dir) else " No data_dir was given and $SELFSUP_DATA is unset."
    return DataNotFoundError(
        f"{name} ({split} split) not found.{unset} Looked for {expected} in:\n  {where}\n"
        f"To get it: {_GET_DATA_HINT[name]}."
    )


def _idx_candidates(name: str, split: str) -> list[tuple[str, str]]:
    prefix = _IDX_PREFIX[split]
    pairs = []
    for sep in ("-", "."):  # torchvision's names use "-"; some mirrors ship "train-images.idx3-ubyte"
        for ext in (".gz", ""):
            pairs.append((f"{prefix}-images{sep}idx3-ubyte{ext}", f"{prefix}-labels{sep}idx1-ubyte{ext}"))
    return pairs


def _find_idx_files(name: str, split: str, data_dir) -> tuple[tuple[Path, Path] | None, list[str]]:
    """The (images, labels) idx files of ``split``, and the folders searched, in order."""
    folders = []
    for root in _search_roots(data_dir):
        # Named sub-folders before the root itself, so a root holding both MNIST and Fashion-MNIST
        # in sub-folders never serves one for the other.
        folders += [root / sub for sub in _IDX_SUBFOLDERS[name]] + [root / "raw", root]
    folders += list(SYSTEM_DATA_DIRS.get(name, ()))
    tried = []
    for folder in folders:
        tried.append(str(folder))
        for images_name, labels_name in _idx_candidates(name, split):
            if (folder / images_name).is_file() and (folder / labels_name).is_file():
                return (folder / images_name, folder / labels_name), tried
    return None, tried


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped when the name ends in .gz): 0x0000, dtype 0x08 (uint8), ndim, big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file (bad header)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != math.prod(shape):
        raise ValueError(f"{path} is truncated or corrupt: header says {shape}, found {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_idx_dataset(name: str, split: str, data_dir) -> InMemoryDataset:
    found, tried = _find_idx_files(name, split, data_dir)
    if found is None:
        expected = " and ".join(_idx_candidates(name, split)[0]) + " (or uncompressed)"
        raise _not_found(name, split, data_dir, tried, expected)
    images_path, labels_path = found
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_path} {images.shape} and {labels_path} {labels.shape} do not match")
    mean, std = MEAN_STD[name]
    return InMemoryDataset(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES,
        name=name,
        mean=mean,
        std=std,
    )


def load_embedded(split: str) -> InMemoryDataset:
    resource = resources.files("selfsup") / "assets" / "fashion_mnist_sample.npz"
    with resources.as_file(resource) as path, np.load(path) as npz:
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    mean, std = MEAN_STD["embedded"]
    return InMemoryDataset(
        images=torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=FASHION_MNIST_CLASSES,
        name="embedded",
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 / STL-10 through torchvision (download=False)
# --------------------------------------------------------------------------------------------------

_TORCHVISION_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary"}


def load_torchvision_dataset(name: str, split: str, data_dir) -> InMemoryDataset:
    import torchvision.datasets as tvd  # imported here: only these three sets need it

    tried = []
    for root in _search_roots(data_dir):
        for candidate in (root, root / name):
            tried.append(str(candidate))
            if not (candidate / _TORCHVISION_FOLDER[name]).is_dir():
                continue
            try:
                if name == "stl10":
                    ds = tvd.STL10(str(candidate), split=split, download=False)
                else:
                    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
                    ds = cls(str(candidate), train=split == "train", download=False)
            except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found or corrupted"
                tried[-1] += f"  ({err})"
                continue
            return _from_torchvision(name, split, ds)
    raise _not_found(name, split, data_dir, tried, f"{_TORCHVISION_FOLDER[name]}/ (torchvision's layout)")


def _from_torchvision(name: str, split: str, ds) -> InMemoryDataset:
    mean, std = MEAN_STD[name]
    if name == "stl10":
        images = torch.from_numpy(ds.data).contiguous()  # (N, 3, 96, 96), torchvision already made it CHW
        labels = None if split == "unlabeled" else torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
        classes = list(getattr(ds, "classes", STL10_CLASSES))
    else:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        labels = torch.tensor(ds.targets, dtype=torch.int64)
        classes = list(ds.classes)
    return InMemoryDataset(images=images, labels=labels, classes=classes, name=name, mean=mean, std=std)


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------
