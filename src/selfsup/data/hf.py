"""Hugging Face ``datasets`` saved with ``save_to_disk``: ``--dataset hf:PATH``.

``PATH`` holds a ``DatasetDict`` (splits ``train`` and ``test``, or ``validation`` as the test split)
or a single ``Dataset`` (the training split only). The image column is the one ``Image`` feature (or
a column named ``image`` / ``img``), the label column the one ``ClassLabel`` feature (or ``label`` /
``labels``); ``--set hf.image_column=...`` and ``--set hf.label_column=...`` name them when that is
ambiguous. Without a label column the data set is unlabeled (pre-training only).

:class:`HFImageDataset` is index-addressable like the streamed image folder: ``ds[i]`` decodes one
row to a ``uint8`` ``(C, load_size, load_size)`` tensor (shorter side resized, centre square kept,
as for image files), so the same views, data order, resume and evaluation apply. ``load_dataset``
decodes small ones (<= 20,000 images at <= 64 px) once into an in-memory data set, like image folders.
Reads the folder with pyarrow alone (``pip install 'selfsup[datasets]'``), so the `datasets` package is
needed only to write it; imported only for ``hf:`` names. Nothing is downloaded.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfsup.data.containers import (
    MEAN_STD, DEFAULT_IMAGEFOLDER_SIZE, IN_MEMORY_MAX_IMAGES, IN_MEMORY_MAX_SIZE, InMemoryDataset, default_load_size,
)
from selfsup.data.image_checks import convert_image
from selfsup.errors import DataNotFoundError, DataError, NoTestSplitError

__all__ = ["HF_PREFIX", "HFImageDataset"]

HF_PREFIX = "hf:"
_GRAY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16")


def _open(path: Path, split: str) -> tuple:
    """``(pyarrow table, features dict)`` of one split of a ``save_to_disk`` folder (memory-mapped, not copied)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError("--dataset hf:PATH needs pyarrow; pip install 'selfsup[datasets]'") from None
    if not path.is_dir():
        raise DataNotFoundError(f"hf:{path}: no such folder; save the data set with dataset.save_to_disk({str(path)!r})")
    folder = path
    if (path / "dataset_dict.json").is_file():  # a DatasetDict: one sub-folder per split
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        names = {"train": ("train",), "test": ("test", "validation", "valid", "val")}.get(split, (split,))
        found = [n for n in names if n in splits]
        if not found:
            error = NoTestSplitError if split == "test" else ValueError
            raise error(f"hf:{path} has splits {', '.join(splits)}, none of them {' or '.join(names)}")
        folder = path / found[0]
    elif split != "train":
        raise (NoTestSplitError if split == "test" else ValueError)(f"hf:{path} is a single Dataset, the training split; save a DatasetDict with 'train' and "
                         "'test' splits for a held-out split")
    try:
        state = json.loads((folder / "state.json").read_text())
        info = json.loads((folder / "dataset_info.json").read_text())
        tables = [pa.ipc.open_stream(pa.memory_map(str(folder / f["filename"]))).read_all() for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        raise DataError(f"hf:{path}: {folder} is not a data set written by save_to_disk ({type(e).__name__}: {e})") from None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0], info.get("features") or {}


def _pick(columns: list[str], features: dict, given: str | None, feature_type: str, names: tuple[str, ...], what: str,
          path: Path) -> str | None:
    if given is not None:
        if given not in columns:
            raise DataError(f"hf:{path}: no column {given!r} (hf.{what}_column); columns: {', '.join(columns)}")
        return given
    typed = [c for c in columns if (features.get(c) or {}).get("_type") == feature_type]
    if len(typed) == 1:
        return typed[0]
    named = [c for c in names if c in columns]
    if named:
        return named[0]
    if what == "label":
        return None
    raise DataError(f"hf:{path}: cannot tell which column holds the images (columns: {', '.join(columns)}); "
                    "name it with --set hf.image_column=NAME")


def _as_pil(value, path: Path, column: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:  # an Image feature: encoded bytes
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):  # an Image feature that refers to a file
        return Image.open(value["path"])
    try:
        return Image.fromarray(np.asarray(value, dtype=np.uint8))
    except (TypeError, ValueError):
        raise DataError(f"hf:{path}: column {column!r} holds {type(value).__name__}, not images; "
                        "name the image column with --set hf.image_column=NAME") from None


def to_tensor(img: Image.Image, size: int, num_channels: int) -> torch.Tensor:
    """(C, size, size) uint8: shorter side resized to ``size``, centre square kept (as for image files)."""
    img = convert_image(img, "L" if num_channels == 1 else "RGB")
    w, h = img.size
    if (w, h) != (size, size):
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    array = np.array(img, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


class HFImageDataset(torch.utils.data.Dataset):
    """One split of a saved ``datasets`` data set; ``ds[i]`` is ``(uint8 (C, load_size, load_size), label or -1)``.

    ``image_size`` None: the images' own side when the first ones are squares of one size, else 224;
    ``load_size`` defaults to ``image_size`` for native-size images and to ``default_load_size(image_size)``
    otherwise (as image folders). ``mean``/``std``: ImageNet's for RGB, 0.5 / 0.25 for gray.
    """

    def __init__(self, path: str | Path, split: str = "train", image_size: int | None = None,
                 image_column: str | None = None, label_column: str | None = None, name: str | None = None,
                 classes: list[str] | None = None):
        self.path = Path(path).expanduser()
        table, features = _open(self.path, split)
        if table.num_rows == 0:
            raise DataError(f"hf:{self.path} ({split} split) holds no rows")
        self.image_column = _pick(table.column_names, features, image_column, "Image", ("image", "img"), "image", self.path)
        self.label_column = _pick(table.column_names, features, label_column, "ClassLabel", ("label", "labels"), "label",
                                  self.path)
        self._column = table.column(self.image_column)
        probe = [self._image(i) for i in range(min(16, table.num_rows))]
        self.num_channels = 1 if all(im.mode in _GRAY_MODES for im in probe) else 3
        native = {im.size for im in probe}
        native_side = next(iter(native))[0] if len(native) == 1 and next(iter(native))[0] == next(iter(native))[1] else None
        self.image_size = int(image_size or native_side or DEFAULT_IMAGEFOLDER_SIZE)
        self.load_size = self.image_size if native_side == self.image_size else default_load_size(self.image_size)
        self.mean, self.std = MEAN_STD["gray" if self.num_channels == 1 else "imagenet"]
        self.name = name or HF_PREFIX + str(path)
        self.labels, self.classes = None, []
        if self.label_column is not None:
            feature = features.get(self.label_column) or {}
            raw = table.column(self.label_column).to_pylist()
            if classes is not None:
                self.classes = list(classes)
            elif feature.get("names"):
                self.classes = list(feature["names"])
            elif raw and isinstance(raw[0], str):
                self.classes = sorted(set(raw))
            else:
                self.classes = [str(i) for i in range(int(max(raw)) + 1)]
            if raw and isinstance(raw[0], str):
                index = {c: i for i, c in enumerate(self.classes)}
                raw = [index.get(r, -1) for r in raw]
            self.labels = torch.tensor([int(r) for r in raw], dtype=torch.int64)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self._column)

    def _image(self, index: int) -> Image.Image:
        return _as_pil(self._column[int(index)].as_py(), self.path, self.image_column)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self._image(index)
        label = -1 if self.labels is None else int(self.labels[index])
        return to_tensor(img, self.load_size, self.num_channels), label


def load_hf_dataset(name: str, split: str = "train", image_size: int | None = None, in_memory: bool | None = None,
                    image_column: str | None = None, label_column: str | None = None) -> InMemoryDataset | HFImageDataset:
    """``load_dataset`` for ``hf:PATH`` names: small sets decoded once into memory, large ones streamed."""
    path = name[len(HF_PREFIX):]
    if not path:
        raise ValueError("hf needs a path: hf:PATH (a folder written by save_to_disk)")
    classes = None
    if split != "train":  # class indices (and, for native-size images, the size) as in the training split
        train = HFImageDataset(path, "train", image_size, image_column, label_column, name=name)
        classes, image_size = train.classes or None, train.image_size
    ds = HFImageDataset(path, split, image_size, image_column, label_column, name=name, classes=classes)
    if in_memory is None:
        in_memory = len(ds) <= IN_MEMORY_MAX_IMAGES and ds.image_size <= IN_MEMORY_MAX_SIZE
    if not in_memory:
        return ds
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return InMemoryDataset(images=images, labels=ds.labels, classes=ds.classes, name=name, mean=ds.mean, std=ds.std)
