"""Image folders (``imagefolder:PATH``): class sub-folders scanned, bad images checked, streamed or decoded into memory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from selfsup.data.containers import (
    DEFAULT_IMAGEFOLDER_SIZE, IMAGEFOLDER_PREFIX, IMAGE_EXTENSIONS, IN_MEMORY_MAX_IMAGES, IN_MEMORY_MAX_SIZE,
    InMemoryDataset, MEAN_STD, default_load_size,
)
from selfsup.data.image_checks import (
    DECODE_ERRORS, ImageReport, check_policy, convert_image, decode_with_policy, describe_bad, scan_images,
)
from selfsup.errors import BadImageError, DataError, DataNotFoundError, NoTestSplitError


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
        files, labels, self.classes = scan_image_folder(self.root, classes)
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
        self.num_channels = detect_channels(files) if num_channels is None else int(num_channels)
        if self.num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {self.num_channels}")
        self.mean, self.std = MEAN_STD["gray" if self.num_channels == 1 else "imagenet"]
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
            lambda i: decode_image(Path(os.fsdecode(self._paths[i])), self.load_size, self.num_channels),
            index, len(self._paths), self.on_bad_image, lambda i: os.fsdecode(self._paths[i]), self.failed)
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def images_under(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, in a deterministic (sorted) order; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if is_image_file(f)]
    return found


def class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def scan_image_folder(
    folder: Path, classes: Sequence[str] | None = None
) -> tuple[list[Path], list[int] | None, list[str]]:
    """``(files, labels or None, classes)`` for a class-per-sub-folder or a flat folder of images."""
    if not folder.is_dir():
        raise DataNotFoundError(f"image folder {folder} does not exist or is not a folder")
    direct = sorted(folder / e.name for e in os.scandir(folder) if e.is_file() and is_image_file(e.name))
    per_class = {sub: images_under(folder / sub) for sub in class_folders(folder)}
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


def detect_channels(files: Sequence[Path], max_probe: int = 16) -> int:
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


def decode_image(path: Path, size: int | None, num_channels: int) -> torch.Tensor:
    """(C, size, size) uint8: shorter side resized to ``size``, centre square kept (one resize call).

    ``size=None``: the whole image as stored, (C, H, W), only EXIF-rotated and converted to the channels.
    """
    mode = "L" if num_channels == 1 else "RGB"
    try:
        with Image.open(path) as img:
            if size is not None:
                img.draft(mode, (size, size))  # JPEG only: DCT-scaled decode, both sides stay >= size
            img = ImageOps.exif_transpose(img)
            img = convert_image(img, mode)  # transparency over white, 16-bit scaled, palette/CMYK converted
            w, h = img.size
            side = min(w, h)
            if size is not None and (w, h) != (size, size):
                box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
                img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
            array = np.array(img, dtype=np.uint8)
    except DECODE_ERRORS as err:
        raise OSError(f"could not decode image {path}: {err}") from err
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def resolve_split_folder(path: Path, split: str) -> tuple[Path, Path | None]:
    """(folder of ``split``, the training folder whose classes it must use, or None)."""
    if split not in ("train", "test"):
        raise ValueError(f"image folders have splits 'train' and 'test', not {split!r}")
    if (path / "train").is_dir():
        if split == "train":
            return path / "train", None
        for held_out in ("val", "test"):
            if (path / held_out).is_dir():
                return path / held_out, path / "train"
        raise NoTestSplitError(f"{path} has train/ but neither val/ nor test/, so there is no 'test' split")
    if split == "train":
        return path, None
    raise NoTestSplitError(
        f"{path} has no train/ sub-folder, so all of it is the training split and there is no 'test' split; "
        "arrange it as PATH/train/<class>/... and PATH/val/<class>/... for a held-out split"
    )


def load_image_folder(
    name: str, split: str, image_size: int | None, in_memory: bool | None, num_channels: int | None,
    on_bad_image: str = "error",
) -> InMemoryDataset | ImageFolderDataset:
    raw = name[len(IMAGEFOLDER_PREFIX) :]
    if not raw:
        raise ValueError("imagefolder needs a path: imagefolder:PATH")
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"image folder {str(path)!r} (from {name!r}) does not exist or is not a folder")
    folder, train_folder = resolve_split_folder(path, split)
    classes = None
    if train_folder is not None and not any(is_image_file(e.name) for e in os.scandir(train_folder) if e.is_file()):
        classes = class_folders(train_folder)
    size = DEFAULT_IMAGEFOLDER_SIZE if image_size is None else int(image_size)
    dataset = ImageFolderDataset(folder, image_size=size, num_channels=num_channels, classes=classes, name=name,
                                 on_bad_image=on_bad_image)
    if in_memory is None:
        in_memory = len(dataset) <= IN_MEMORY_MAX_IMAGES and size <= IN_MEMORY_MAX_SIZE
    if not in_memory:
        return dataset
    return _decode_all(dataset, dataset.load_size)  # the streamed images, so both read the same


def _decode_all(dataset: ImageFolderDataset, size: int) -> InMemoryDataset:
    """Decode every image once at ``size`` (PIL releases the GIL while decoding, so threads help)."""
    workers = min(8, os.cpu_count() or 1)

    def decode(path: Path) -> torch.Tensor | str:
        try:
            return decode_image(path, size, dataset.num_channels)
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
