"""Data sets as uint8 tensors, ready for device-side augmentation.

Every loader returns images as ``uint8`` tensors of shape ``(C, H, W)`` with integer labels, and
carries the per-channel ``mean``/``std`` (on the ``[0, 1]`` scale) that the augmentation pipeline
normalises with. Small data sets (MNIST, Fashion-MNIST, CIFAR, STL-10, small image folders) are
held whole in memory as an :class:`InMemoryDataset`, so augmentation can run on the accelerator
over a whole batch; large image folders are streamed from disk by :class:`ImageFolderDataset`.

Nothing is ever downloaded here. Data is looked for in ``data_dir``, then in each folder of
``$SELFSUP_DATA`` (``os.pathsep``-separated), and for Fashion-MNIST also where Debian's
``dataset-fashion-mnist`` package installs it. When nothing is found, :class:`DataNotFoundError`
says where it looked and how to get the data. ``"embedded"`` is a class-balanced 12,000-image
subset of Fashion-MNIST shipped inside the package, so examples and tests always have real data.
"""

from __future__ import annotations

import gzip
import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from selfsup.data.image_checks import DECODE_ERRORS, ImageReport, check_policy, convert_image
from selfsup.errors import BadImageError, DataError
from selfsup.data.image_checks import decode_with_policy, describe_bad, scan_images
from selfsup.data.store import STORE_PREFIX, StoreDataset, open_store
from selfsup.errors import DataNotFoundError  # noqa: F401 (re-exported: defined here before)

__all__ = [
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "DataNotFoundError",
    "DataError",
    "InMemoryDataset",
    "ImageFolderDataset",
    "load_dataset",
    "label_subset",
    "read_label_list",
    "fashion_mnist_available",
    "default_load_size",
]

DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "stl10", "embedded")  # plus "imagefolder:PATH", "store:PATH"
IMAGEFOLDER_PREFIX = "imagefolder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
MNIST_CLASSES = [str(d) for d in range(10)]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]

# Per-channel statistics on the [0, 1] scale. STL-10 and RGB image folders use the ImageNet values,
# as is usual for photos; gray image folders use 0.5 / 0.25 (no data set to take them from).
_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "gray": ((0.5,), (0.25,)),
}
_MEAN_STD["embedded"] = _MEAN_STD["fashion-mnist"]
_MEAN_STD["stl10"] = _MEAN_STD["imagenet"]

_SPLITS = {name: ("train", "test") for name in DATASET_NAMES}
_SPLITS["stl10"] = ("train", "test", "unlabeled", "train+unlabeled")

# Folders searched after data_dir and $SELFSUP_DATA. A module constant so tests can empty it.
SYSTEM_DATA_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

IN_MEMORY_MAX_IMAGES = 20_000
IN_MEMORY_MAX_SIZE = 64
DEFAULT_IMAGEFOLDER_SIZE = 224


# --------------------------------------------------------------------------------------------------
# Data set containers
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class InMemoryDataset:
    """A whole data set as one uint8 tensor.

    ``images`` is ``(N, C, H, W)`` uint8 and contiguous; ``labels`` is ``(N,)`` int64, or ``None``
    for unlabeled data (STL-10 ``unlabeled``, flat image folders). ``-1`` marks an unlabeled sample
    inside a labeled set (STL-10 ``train+unlabeled``). ``mean``/``std`` are per channel on ``[0, 1]``.
    ``name`` is the name given to :func:`load_dataset`, so ``load_dataset(ds.name, split)`` reloads it.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str]
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"images must be an (N, C, H, W) uint8 tensor, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        self.images = self.images.contiguous()
        if self.labels is not None:
            self.labels = torch.as_tensor(self.labels, dtype=torch.int64).reshape(-1)
            if len(self.labels) != len(self.images):
                raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.classes = list(self.classes)
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))
        if len(self.mean) != self.num_channels or len(self.std) != self.num_channels:
            raise ValueError(f"mean/std need {self.num_channels} values, got {self.mean} / {self.std}")

    @property
    def num_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        """Side of the stored images (the larger side if they are not square)."""
        return max(self.images.shape[2], self.images.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """``(image (C, H, W) uint8, label)``; the label is ``-1`` when unlabeled, as in ImageFolderDataset."""
        label = -1 if self.labels is None else int(self.labels[index])
        return self.images[index], label

    def subset(self, indices: torch.Tensor) -> InMemoryDataset:
        """The samples at ``indices`` (e.g. from :func:`label_subset`), same classes and statistics."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return InMemoryDataset(
            images=self.images[indices].contiguous(),
            labels=None if self.labels is None else self.labels[indices],
            classes=self.classes,
            name=self.name,
            mean=self.mean,
            std=self.std,
        )


def default_load_size(image_size: int) -> int:
    """Side at which streamed images are stored: ``image_size * 256 / 224`` (~1.15x), rounded; 256 for 224."""
    return int(round(image_size * 256 / 224))


class ImageFolderDataset(torch.utils.data.Dataset):
    """A folder of images, streamed from disk.

    Two layouts: ImageNet style ``root/<class>/.../img.jpg`` (labeled; classes are the sorted
    sub-folder names, searched recursively) or a flat folder of images with no class sub-folders
    (``labels`` is ``None`` and items carry label ``-1``). JPEG, PNG, WebP and BMP files of mixed
    sizes and modes are accepted; other files and hidden entries are ignored.

    ``dataset[i]`` is ``(uint8 tensor (C, load_size, load_size), label)``. Decoding uses PIL: EXIF
    rotation applied, converted to RGB (or L when ``num_channels == 1``; alpha is dropped), the
    *shorter* side resized to ``load_size`` and the centre square kept. ``load_size`` defaults to
    :func:`default_load_size` (256 for ``image_size`` 224, the usual "resize 256, crop 224" ratio):
    the random-resized-crop that later runs on the device then sees most of each photo, while the
    decoded tensors stay small enough to batch. JPEGs are decoded at reduced scale when they are
    much larger than ``load_size`` (PIL ``draft``), which keeps big photos cheap.

    ``image_size`` is the size to train at; ``load_size`` the side of the returned tensors.
    ``num_channels=None`` looks at up to 16 files' headers: 1 if all are grayscale, else 3.
    ``classes`` fixes the class list (pass the training folder's classes when loading its
    validation folder, so indices agree); by default it is the sorted sub-folder names.
    ``mean``/``std`` are the ImageNet constants for RGB and 0.5 / 0.25 for gray. A validation folder
    must be arranged in class sub-folders too for its labels to be known (ImageNet's flat ``val/``
    loads as unlabeled).

    Every file is checked when the data set is built (header and last bytes, see
    :mod:`selfsup.data.image_checks`): ``on_bad_image="error"`` raises :class:`BadImageError` naming
    corrupt, truncated, zero-byte and non-image files; ``"skip"`` leaves them out and records them
    in ``image_report``. A file that fails later is replaced by the next one that decodes (``"skip"``)
    and listed by :meth:`failed_files`. ``scan=False`` skips the check.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = DEFAULT_IMAGEFOLDER_SIZE,
        load_size: int | None = None,
        num_channels: int | None = None,
        classes: Sequence[str] | None = None,
        name: str | None = None,
        on_bad_image: str = "error",
        scan: bool = True,
    ) -> None:
        self.root = Path(root)
        files, labels, self.classes = _scan_image_folder(self.root, classes)
        # Bad files are found (and refused, or left out) before any training: see selfsup.data.image_checks.
        self.on_bad_image = check_policy(on_bad_image)
        self.image_report: ImageReport | None = None
        if scan:
            keep, self.image_report = scan_images(files, on_bad_image, int(image_size), self.root)
            files = [f for f, k in zip(files, keep) if k]
            labels = None if labels is None else [lab for lab, k in zip(labels, keep) if k]
        # One numpy byte-string array rather than a list of Path objects: DataLoader workers would
        # otherwise copy the whole list page by page as reference counts change (ImageNet: GBs).
        self._paths = np.array([os.fsencode(f) for f in files])
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.int64)
        self.image_size = int(image_size)
        self.load_size = int(load_size) if load_size is not None else default_load_size(self.image_size)
        if self.image_size < 1 or self.load_size < self.image_size:
            raise ValueError(f"need 1 <= image_size <= load_size, got {self.image_size} and {self.load_size}")
        self.num_channels = _detect_channels(files) if num_channels is None else int(num_channels)
        if self.num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {self.num_channels}")
        self.mean, self.std = _MEAN_STD["gray" if self.num_channels == 1 else "imagenet"]
        self.name = name if name is not None else IMAGEFOLDER_PREFIX + str(root)
        # Files that fail to decode during training, flagged from DataLoader workers (shared memory).
        self.failed = torch.zeros(len(self._paths), dtype=torch.bool).share_memory_()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def failed_files(self) -> list[str]:
        """Files that passed the scan but failed to decode since the data set was built."""
        return [os.fsdecode(self._paths[i]) for i in torch.nonzero(self.failed).flatten().tolist()]

    @property
    def files(self) -> list[Path]:
        """The image paths, in dataset order (built on each access)."""
        return [Path(os.fsdecode(p)) for p in self._paths]

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A file that fails here (damage the scan cannot see) is replaced by the next one that decodes
        # with on_bad_image="skip", deterministically, and flagged; "error" raises naming it.
        image, index = decode_with_policy(
            lambda i: _decode_image(Path(os.fsdecode(self._paths[i])), self.load_size, self.num_channels),
            index, len(self._paths), self.on_bad_image, lambda i: os.fsdecode(self._paths[i]), self.failed)
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    in_memory: bool | None = None,
    *,
    num_channels: int | None = None,
    on_bad_image: str = "error",
    image_column: str | None = None,
    label_column: str | None = None,
) -> InMemoryDataset | ImageFolderDataset:
    """Load a data set by name; see :data:`DATASET_NAMES`, ``"imagefolder:PATH"`` or ``"hf:PATH"``.

    ``hf:PATH``: a Hugging Face data set saved with ``save_to_disk`` (:mod:`selfsup.data.hf`);
    ``image_column`` / ``label_column`` name its columns when they cannot be told by feature type.

    ``split`` is ``"train"`` or ``"test"``; STL-10 also has ``"unlabeled"`` (labels ``None``) and
    ``"train+unlabeled"`` (labels ``-1`` for the unlabeled part). The built-in sets are always in
    memory at their native resolution, ignoring ``image_size`` and ``in_memory`` (the device-side
    random-resized-crop produces the training size).

    Image folders: ``PATH`` with a ``train/`` sub-folder is split: ``"train"`` reads ``PATH/train``
    and ``"test"`` reads ``PATH/val`` (or ``PATH/test``) with the training folder's class indices;
    any other ``PATH`` is the training split and has no ``"test"``. ``image_size`` defaults to 224.
    With ``in_memory=True`` (the default when the split holds <= 20000 images and ``image_size``
    <= 64) every image is decoded once, shorter side resized to ``image_size`` and centre-cropped,
    into an :class:`InMemoryDataset`; otherwise an :class:`ImageFolderDataset` streams them.
    ``num_channels`` (image folders only) forces 1 or 3 channels instead of detecting them.

    ``"store:PATH"`` is a folder written by ``selfsup prepare`` (:mod:`selfsup.data.store`): streamed by
    index at its stored size, read whole with ``in_memory=True``; splits ``"train"`` and ``"test"``.

    ``on_bad_image`` (image folders only): ``"error"`` refuses a folder with corrupt, truncated,
    zero-byte or non-image files, naming them; ``"skip"`` leaves them out and records them in the
    data set's ``image_report`` (see :mod:`selfsup.data.image_checks`, which decides every case).

    Raises :class:`DataNotFoundError` when the files are not found, ``ValueError`` for an unknown
    name or split, :class:`DataError` (a ``ValueError``) for an empty folder, a class folder
    without images or bad image files.
    """
    if name.startswith(IMAGEFOLDER_PREFIX):
        return _load_image_folder(name, split, image_size, in_memory, num_channels, on_bad_image)
    if name.startswith(STORE_PREFIX):  # made by `selfsup prepare`; see selfsup.data.store
        return _load_store(name, split, image_size, in_memory)
    if name.startswith("hf:"):
        from selfsup.data.hf import load_hf_dataset  # optional extra (datasets): imported only for hf: names

        return load_hf_dataset(name, split, image_size, in_memory, image_column, label_column)
    key = canonical_dataset_name(name)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)} or imagefolder:PATH")
    if split not in _SPLITS[key]:
        raise ValueError(f"data set {key!r} has no split {split!r}; choose one of {', '.join(_SPLITS[key])}")
    if key == "embedded":
        return _load_embedded(split)
    if key in ("fashion-mnist", "mnist"):
        return _load_idx_dataset(key, split, data_dir)
    return _load_torchvision_dataset(key, split, data_dir)


def canonical_dataset_name(name: str) -> str:
    """The built-in name ``name`` stands for (``"CIFAR_10"`` -> ``"cifar10"``); unknown names come back normalised."""
    key = name.strip().lower().replace("_", "-")
    return {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100", "stl-10": "stl10"}.get(
        key, key
    )


LABEL_BALANCES = ("equal", "proportional")


def label_subset(labels: torch.Tensor, fraction: float, seed: int, num_classes: int | None = None,
                 balance: str = "equal") -> torch.Tensor:
    """Sorted indices of a class-balanced, seeded subset of ``round(fraction * N)`` labeled samples.

    For semi-supervised evaluation with 1% / 10% of the labels (SimCLR sec. 6; SimCLRv2). The
    papers' ImageNet lists (Zhai et al., S4L) hold an *equal* number of images per class (12-13 at 1%,
    128-129 at 10%): ``balance="equal"`` (default) gives every class ``round(fraction * N) // C``
    images and a seeded choice of classes one more, or, when a class is too small for that, as many
    as the smallest class holds for every class (with a warning). ``balance="proportional"`` keeps
    ``round(fraction * count_c)`` (at least 1) per class instead. Drawn from a seed, not read from the
    papers' lists (for those, see ``selfsup finetune --label-subset FILE``). Deterministic for a seed,
    and nested: with one seed, the subset for a smaller fraction is contained in the subset for a
    larger one. Samples labeled ``-1`` are never chosen; classes (``range(num_classes)``, default
    ``max(label) + 1``) with no samples are skipped.
    """
    fraction = float(fraction)
    if not (0.0 < fraction <= 1.0):  # also rejects NaN
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if balance not in LABEL_BALANCES:
        raise ValueError(f"label balance must be one of {', '.join(LABEL_BALANCES)}, got {balance!r}")
    labels = torch.as_tensor(labels).reshape(-1).to(torch.int64).cpu()
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
    generator = torch.Generator().manual_seed(int(seed))
    classes = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if members.numel() == 0:
            continue
        # One permutation per class, drawn whatever the fraction: this is what makes subsets nested.
        order = torch.randperm(members.numel(), generator=generator)
        classes.append(members[order])
    if not classes:
        return torch.empty(0, dtype=torch.int64)
    if balance == "proportional":
        keep = [max(1, round(fraction * m.numel())) for m in classes]
    else:
        total = max(len(classes), round(fraction * sum(m.numel() for m in classes)))
        base, extra = divmod(total, len(classes))
        plus_one = set(torch.randperm(len(classes), generator=generator)[:extra].tolist())
        keep = [base + (i in plus_one) for i in range(len(classes))]
        smallest = min(m.numel() for m in classes)
        if max(keep) > smallest:
            warnings.warn(f"label subset: equal counts of {base}-{base + (extra > 0)} images per class need more than the "
                          f"smallest class holds ({smallest}); every class gets {smallest} "
                          f"({smallest * len(classes)} labeled images instead of {total}). "
                          "Use balance='proportional' (selfsup finetune --label-balance proportional) to keep the class shares")
            keep = [smallest] * len(classes)
    return torch.sort(torch.cat([m[:k] for m, k in zip(classes, keep)])).values


def read_label_list(path: str | os.PathLike, files: Sequence[str | os.PathLike]) -> torch.Tensor:
    """Sorted indices of the files named in ``path``: the official 1% / 10% ImageNet list format.

    One file name per line (``n01440764_10026.JPEG``; blank lines and ``#`` comments ignored), matched
    against the base names of ``files`` (an image folder's training files, in data-set order).
    """
    names = [line.strip() for line in Path(path).read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    index: dict[str, int] = {}
    for i, f in enumerate(files):
        index.setdefault(Path(f).name, i)
    missing = [n for n in names if Path(n).name not in index]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of {len(names)} listed files are not in the training folder "
                         f"(first: {', '.join(missing[:3])})")
    if not names:
        raise ValueError(f"{path} lists no file names (expected one per line)")
    return torch.tensor(sorted({index[Path(n).name] for n in names}), dtype=torch.int64)


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


def _load_idx_dataset(name: str, split: str, data_dir) -> InMemoryDataset:
    found, tried = _find_idx_files(name, split, data_dir)
    if found is None:
        expected = " and ".join(_idx_candidates(name, split)[0]) + " (or uncompressed)"
        raise _not_found(name, split, data_dir, tried, expected)
    images_path, labels_path = found
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_path} {images.shape} and {labels_path} {labels.shape} do not match")
    mean, std = _MEAN_STD[name]
    return InMemoryDataset(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES,
        name=name,
        mean=mean,
        std=std,
    )


def _load_embedded(split: str) -> InMemoryDataset:
    resource = resources.files("selfsup") / "assets" / "fashion_mnist_sample.npz"
    with resources.as_file(resource) as path, np.load(path) as npz:
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    mean, std = _MEAN_STD["embedded"]
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


def _load_torchvision_dataset(name: str, split: str, data_dir) -> InMemoryDataset:
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
    mean, std = _MEAN_STD[name]
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


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, in a deterministic (sorted) order; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if _is_image(f)]
    return found


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _scan_image_folder(
    folder: Path, classes: Sequence[str] | None = None
) -> tuple[list[Path], list[int] | None, list[str]]:
    """``(files, labels or None, classes)`` for a class-per-sub-folder or a flat folder of images."""
    if not folder.is_dir():
        raise DataNotFoundError(f"image folder {folder} does not exist or is not a folder")
    direct = sorted(folder / e.name for e in os.scandir(folder) if e.is_file() and _is_image(e.name))
    per_class = {sub: _images_under(folder / sub) for sub in _class_folders(folder)}
    if direct:
        with_images = [sub for sub, files in per_class.items() if files]
        if with_images:
            raise DataError(
                f"image folder {folder} mixes images directly inside it ({len(direct)}) with class sub-folders "
                f"that hold images ({', '.join(with_images[:5])}); use either root/<class>/img.jpg (labeled) "
                "or a flat folder of images (unlabeled)"
            )
        return direct, None, []
    if not per_class:
        raise DataError(
            f"image folder {folder} is empty: no images ({', '.join(IMAGE_EXTENSIONS)}) and no class sub-folders"
        )
    for sub, files in per_class.items():
        if not files:
            raise DataError(
                f"class folder {folder / sub} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "remove it or add images"
            )
    classes = list(per_class) if classes is None else list(classes)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [sub for sub in per_class if sub not in index]
    if unknown:
        raise DataError(f"class folders {unknown} in {folder} are not among the training classes")
    files, labels = [], []
    for sub, sub_files in per_class.items():
        files += sub_files
        labels += [index[sub]] * len(sub_files)
    return files, labels, classes


def _detect_channels(files: Sequence[Path], max_probe: int = 16) -> int:
    """1 if every probed file (evenly spread, header only) is grayscale, else 3."""
    step = max(1, len(files) // max_probe)
    for path in list(files)[::step][:max_probe]:
        try:
            with Image.open(path) as img:
                if img.mode not in ("1", "L", "LA", "La", "I", "F") and not img.mode.startswith("I;16"):
                    return 3
        except OSError as err:
            raise OSError(f"could not read image {path}: {err}") from err
    return 1


def _decode_image(path: Path, size: int, num_channels: int) -> torch.Tensor:
    """(C, size, size) uint8: shorter side resized to ``size``, centre square kept (one resize call)."""
    mode = "L" if num_channels == 1 else "RGB"
    try:
        with Image.open(path) as img:
            img.draft(mode, (size, size))  # JPEG only: DCT-scaled decode, both sides stay >= size
            img = ImageOps.exif_transpose(img)
            img = convert_image(img, mode)  # transparency over white, 16-bit scaled, palette/CMYK converted
            w, h = img.size
            side = min(w, h)
            if (w, h) != (size, size):
                box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
                img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
            array = np.array(img, dtype=np.uint8)
    except DECODE_ERRORS as err:
        raise OSError(f"could not decode image {path}: {err}") from err
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def _resolve_split_folder(path: Path, split: str) -> tuple[Path, Path | None]:
    """(folder of ``split``, the training folder whose classes it must use, or None)."""
    if split not in ("train", "test"):
        raise ValueError(f"image folders have splits 'train' and 'test', not {split!r}")
    if (path / "train").is_dir():
        if split == "train":
            return path / "train", None
        for held_out in ("val", "test"):
            if (path / held_out).is_dir():
                return path / held_out, path / "train"
        raise DataNotFoundError(f"{path} has train/ but neither val/ nor test/, so there is no 'test' split")
    if split == "train":
        return path, None
    raise ValueError(
        f"{path} has no train/ sub-folder, so all of it is the training split and there is no 'test' split; "
        "arrange it as PATH/train/<class>/... and PATH/val/<class>/... for a held-out split"
    )


def _load_image_folder(
    name: str, split: str, image_size: int | None, in_memory: bool | None, num_channels: int | None,
    on_bad_image: str = "error",
) -> InMemoryDataset | ImageFolderDataset:
    raw = name[len(IMAGEFOLDER_PREFIX) :]
    if not raw:
        raise ValueError("imagefolder needs a path: imagefolder:PATH")
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"image folder {str(path)!r} (from {name!r}) does not exist or is not a folder")
    folder, train_folder = _resolve_split_folder(path, split)
    classes = None
    if train_folder is not None and not any(_is_image(e.name) for e in os.scandir(train_folder) if e.is_file()):
        classes = _class_folders(train_folder)
    size = DEFAULT_IMAGEFOLDER_SIZE if image_size is None else int(image_size)
    dataset = ImageFolderDataset(folder, image_size=size, num_channels=num_channels, classes=classes, name=name,
                                 on_bad_image=on_bad_image)
    if in_memory is None:
        in_memory = len(dataset) <= IN_MEMORY_MAX_IMAGES and size <= IN_MEMORY_MAX_SIZE
    if not in_memory:
        return dataset
    return _decode_all(dataset, size)


def _load_store(name: str, split: str, image_size: int | None, in_memory: bool | None) -> InMemoryDataset | StoreDataset:
    """A prepared store, streamed by index; ``in_memory=True`` reads it whole (at its stored size)."""
    store = open_store(name, split, image_size)
    if not in_memory:
        return store
    images = torch.stack([store[i][0] for i in range(len(store))])
    return InMemoryDataset(images=images, labels=store.labels, classes=store.classes, name=store.name,
                           mean=store.mean, std=store.std)


def _decode_all(dataset: ImageFolderDataset, size: int) -> InMemoryDataset:
    """Decode every image once at ``size`` (PIL releases the GIL while decoding, so threads help)."""
    workers = min(8, os.cpu_count() or 1)

    def decode(path: Path) -> torch.Tensor | str:
        try:
            return _decode_image(path, size, dataset.num_channels)
        except OSError as err:  # passed the scan but does not decode: handled like a bad image
            return str(err)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(decode, dataset.files))
    failed = [(str(f), d) for f, d in zip(dataset.files, decoded) if isinstance(d, str)]
    report = dataset.image_report
    if failed:
        if dataset.on_bad_image == "error":
            raise BadImageError(f"{len(failed)} of {len(decoded)} files in {dataset.root} cannot be decoded: "
                                f"{describe_bad(failed)}. Fix or remove them, or pass --on-bad-image skip")
        if report is not None:
            report.bad += failed
    keep = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
    if not keep:
        raise DataError(f"no usable images in {dataset.root}: none of {len(decoded)} files decodes")
    dataset_out = InMemoryDataset(
        images=torch.stack([decoded[i] for i in keep]),
        labels=None if dataset.labels is None else dataset.labels[keep],
        classes=dataset.classes,
        name=dataset.name,
        mean=dataset.mean,
        std=dataset.std,
    )
    dataset_out.image_report = report  # what the scan found (reported by the training loop)
    dataset_out.files = [dataset.files[i] for i in keep]  # file names, for official label lists (--label-subset FILE)
    return dataset_out
