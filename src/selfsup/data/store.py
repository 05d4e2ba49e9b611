"""Prepared image stores: an image folder decoded and resized once, read back by index at training speed.

``selfsup prepare imagefolder:PATH --out STORE`` (see :mod:`selfsup.data.prepare`) writes a store;
``--dataset store:STORE`` reads it here. The store is MosaicML Streaming's MDS format (the
``mosaicml-streaming`` package, ``pip install 'selfsup[store]'``), so the same folder can later be
streamed from object storage by ``streaming.StreamingDataset``; docs/how-to/own-images.md says why this
engine was chosen over LitData and WebDataset. Layout::

    STORE/manifest.json            what was prepared: size, format, classes, counts, bytes, checksums
    STORE/<split>/index.json       the engine's index over every shard of the split (split: train, test)
    STORE/<split>/labels.npy       int64 labels in sample order (-1: unlabeled), so no sample is read for them
    STORE/<split>/part-NNNNN/      shards written by one resumable unit of ``prepare``

Each sample holds ``image`` (bytes: a JPEG, or raw ``uint8`` pixels ``(C, L, L)``), ``label``
(int) and ``name`` (the file's path under the source folder). Only the engine's safe column
encodings are accepted (its ``pkl`` encoding would unpickle; the reader refuses it).

:class:`StoreDataset` is a map-style data set with the same contract as
:class:`selfsup.data.datasets.ImageFolderDataset`: ``dataset[i]`` is ``(uint8 (C, L, L), label)``. The
training order therefore stays :func:`selfsup.training.loop.step_indices` (a function of seed and step), so
exact resume and the per-rank shards under ``torchrun`` are the same as for any other data set.
JPEGs are decoded on the CPU with libjpeg-turbo through ``simplejpeg`` (torchvision 0.29 deprecates
its own CPU codecs); on a CUDA device whole batches can be decoded with nvJPEG instead
(:func:`decode_jpeg_batch`, through ``torchvision.io.decode_jpeg(device="cuda")``).
"""
from __future__ import annotations

import bisect
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

from selfsup.data.containers import default_load_size
from selfsup.errors import DataError, NoTestSplitError

__all__ = ["STORE_PREFIX", "MANIFEST", "StoreDataset", "open_store", "read_manifest", "decode_jpeg_batch",
           "collate_channels_last", "STORE_FORMATS", "SAFE_ENCODINGS"]

STORE_PREFIX = "store:"
MANIFEST = "manifest.json"
STORE_FORMATS = ("jpeg", "raw")
SAFE_ENCODINGS = {"image": "bytes", "label": "int", "name": "str"}  # the only columns a store may have
STORE_VERSION = 1
_INSTALL_HINT = "install the store extra: pip install 'selfsup[store]' (MosaicML Streaming)"


_MDS: tuple | None = None


def mds_engine() -> tuple:
    """``(reader_from_json, MDSWriter)``: the engine's MDS format modules, imported where used.

    Imported without running ``streaming/__init__``, which loads the engine's whole
    ``StreamingDataset`` stack and, where installed, ``transformers`` (seconds and hundreds of MB
    per process, and an ``ImportError`` whenever transformers' pins disagree with the environment).
    Only for that first import are ``streaming`` and ``streaming.base`` stand-in packages; they are
    removed afterwards, so a later ``import streaming`` loads the real package.
    """
    global _MDS
    if _MDS is not None:
        return _MDS
    spec = importlib.util.find_spec("streaming") if "streaming" not in sys.modules else None
    if spec is None and "streaming" not in sys.modules:
        raise DataError(f"stores need mosaicml-streaming, which is not installed; {_INSTALL_HINT}")
    stubs = []
    if spec is not None and spec.submodule_search_locations:
        root = list(spec.submodule_search_locations)[0]
        for name, folder in (("streaming", root), ("streaming.base", os.path.join(root, "base"))):
            stub = types.ModuleType(name)
            stub.__path__ = [folder]
            sys.modules[name] = stub
            stubs.append((name, stub))
    try:
        from streaming.base.format import reader_from_json
        from streaming.base.format.mds.writer import MDSWriter
    except ImportError as err:
        raise DataError(f"reading or writing a store needs mosaicml-streaming ({err}); {_INSTALL_HINT}") from err
    finally:
        for name, stub in stubs:
            if sys.modules.get(name) is stub:
                del sys.modules[name]
    _MDS = (reader_from_json, MDSWriter)
    return _MDS


def read_manifest(root: str | os.PathLike) -> dict:
    """``STORE/manifest.json`` as a dict; a clear error when the folder is not a finished store."""
    root = Path(root).expanduser()
    path = root / MANIFEST
    if not path.is_file():
        started = (root / "prepare.json").is_file()
        hint = ("its prepare did not finish: run the same selfsup prepare command again to resume it" if started else
                "make one with: selfsup prepare imagefolder:PATH --out " + str(root))
        raise DataError(f"{root} is not a prepared image store (no {MANIFEST}); {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is unreadable ({err}); prepare the store again") from err
    if manifest.get("store_version") != STORE_VERSION:
        raise DataError(f"{path} is store version {manifest.get('store_version')}, this selfsup reads "
                        f"version {STORE_VERSION}; prepare the store again")
    return manifest


def collate_channels_last(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader's collate for a store: ``(images (B, C, L, L) uint8, labels (B,))``.

    A decoded JPEG is a ``(C, L, L)`` view of libjpeg's ``(L, L, C)`` pixels. ``default_collate``
    would stack those views into a channels-first batch, a strided transpose that cost as much as
    a third of the decode at 256 px; here the ``(L, L, C)`` pixels are stacked as they are (one
    memcpy each, into shared memory in a worker, as ``default_collate`` does) and the batch is
    returned as its ``(B, C, L, L)`` view: the same values and shape, in channels-last memory.
    Everything downstream indexes or resamples it (the views' ``grid_sample``, ``.to(device)``),
    which gives the same numbers for either layout. Images that are not such views (a raw store's
    channels-first pixels) take ``default_collate`` unchanged.
    """
    from torch.utils.data import default_collate

    images = [item[0] for item in batch]
    first = images[0]
    if all(isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape == first.shape and x.permute(1, 2, 0).is_contiguous()
           for x in images):
        stacked = default_collate([x.permute(1, 2, 0) for x in images]).permute(0, 3, 1, 2)
        return stacked, default_collate([item[1] for item in batch])
    return default_collate(batch)


class StoreDataset(torch.utils.data.Dataset):
    """One split of a prepared store, read by index (see the module docstring).

    ``dataset[i]`` is ``(uint8 tensor (C, L, L), label)`` with ``L`` the store's ``load_size``;
    ``label`` is ``-1`` when the store is unlabeled. Attributes match
    :class:`selfsup.data.datasets.ImageFolderDataset`: ``labels`` (int64 tensor or ``None``), ``classes``,
    ``num_classes``, ``num_channels``, ``image_size`` (the training size it was prepared for),
    ``load_size``, ``mean``/``std``, ``name``, ``image_report`` (``None``: bad images were handled
    and reported by ``prepare``). Shard files are opened per read, so DataLoader workers share nothing.
    """

    collate_fn = staticmethod(collate_channels_last)  # batch_stream's DataLoader uses it

    def __init__(self, root: str | os.PathLike, split: str = "train", name: str | None = None) -> None:
        self.root = Path(root).expanduser()
        manifest = read_manifest(self.root)
        if split not in manifest["splits"]:
            raise (NoTestSplitError if split == "test" else DataError)(f"store {self.root} has no {split!r} split (it has {', '.join(manifest['splits'])}); "
                            "a held-out split is prepared from a folder with train/ and val/ (or test/) sub-folders")
        self.manifest, self.split = manifest, split
        self.format = manifest["format"]
        if self.format not in STORE_FORMATS:
            raise DataError(f"store {self.root}: unknown image format {self.format!r}; prepare the store again")
        self.image_size, self.load_size = int(manifest["size"]), int(manifest["load_size"])
        self.num_channels = int(manifest["num_channels"])
        self.classes = list(manifest["classes"])
        self.mean, self.std = tuple(manifest["mean"]), tuple(manifest["std"])
        self.name = name if name is not None else STORE_PREFIX + str(root)
        self.image_report = None
        folder = self.root / split
        index = json.loads((folder / "index.json").read_text())
        for obj in index["shards"]:
            columns = dict(zip(obj.get("column_names", []), obj.get("column_encodings", [])))
            if obj.get("format") != "mds" or columns != SAFE_ENCODINGS:
                raise DataError(f"store {self.root}: shard {obj.get('raw_data', {}).get('basename')} has columns "
                                f"{columns}, expected {SAFE_ENCODINGS}; refusing to read it (prepare the store again)")
        self._shard_objs = index["shards"]  # readers are built per process (DataLoader workers pickle only JSON)
        self._shards = self._readers()
        self._starts = np.cumsum([0] + [int(o["samples"]) for o in self._shard_objs]).tolist()
        labels = np.load(folder / "labels.npy", allow_pickle=False).astype(np.int64)
        if len(labels) != self._starts[-1]:
            raise DataError(f"store {self.root}/{split}: {len(labels)} labels for {self._starts[-1]} images; "
                            "prepare the store again")
        self.labels = torch.from_numpy(labels) if manifest["labeled"] else None

    def _readers(self) -> list:
        reader_from_json = mds_engine()[0]
        shards = [reader_from_json(str(self.root), self.split, obj) for obj in self._shard_objs]
        for shard in shards:
            shard.validate(allow_unsafe_types=False)  # the engine's own check: no pickled columns
        return shards

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": None}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self._starts[-1]

    def sample(self, index: int) -> dict:
        """The stored sample: ``{"image": bytes, "label": int, "name": str}``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a store split of {len(self)} images")
        if self._shards is None:
            self._shards = self._readers()
        k = bisect.bisect_right(self._starts, index) - 1
        shard = self._shards[k]
        return shard.decode_sample(shard.get_sample_data(index - self._starts[k]))

    def name_of(self, index: int) -> str:
        """The file the image came from, relative to the prepared folder."""
        return self.sample(index)["name"]

    def decode(self, data: bytes) -> torch.Tensor:
        """Stored bytes to ``(C, L, L)`` uint8 (JPEGs with simplejpeg, i.e. libjpeg-turbo)."""
        c, side = self.num_channels, self.load_size
        if self.format == "raw":
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(c, side, side)
        import simplejpeg  # the store extra

        array = simplejpeg.decode_jpeg(data, colorspace="GRAY" if c == 1 else "RGB")
        # A (C, H, W) view of the (H, W, C) pixels: the batch's stack copies it once (a copy here would be a second).
        return torch.from_numpy(array.reshape(side, side, c)).permute(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        image = self.decode(self.sample(index)["image"])
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label


def open_store(name: str, split: str = "train", image_size: int | None = None) -> StoreDataset:
    """``store:PATH`` as a :class:`StoreDataset`; refuses a training size the stored pixels cannot give.

    ``image_size=None`` uses the size the store was prepared for. A smaller size is fine (the
    device-side random-resized-crop scales down); a size whose load size
    (:func:`selfsup.data.containers.default_load_size`) exceeds the stored side would upscale every image, so it is refused with the prepare command.
    """
    raw = name[len(STORE_PREFIX):] if name.startswith(STORE_PREFIX) else name
    if not raw:
        raise DataError("store needs a path: store:PATH (made by selfsup prepare imagefolder:PATH --out PATH)")
    dataset = StoreDataset(raw, split, name=name)
    if image_size is not None and default_load_size(int(image_size)) > dataset.load_size:
        raise DataError(f"store {raw} was prepared for {dataset.image_size} px (stored at {dataset.load_size} px) "
                        f"and cannot train at {image_size} px without upscaling; prepare it again with "
                        f"selfsup prepare {dataset.manifest['source']} --out NEW_STORE --size {image_size}")
    return dataset


def decode_jpeg_batch(datas: list[bytes], device: torch.device | str, num_channels: int = 3) -> torch.Tensor:
    """A batch of JPEG bytes decoded at once with nvJPEG on a CUDA device: ``(B, C, L, L)`` uint8 there.

    The GPU path: ``torchvision.io.decode_jpeg`` takes a list and decodes it in one batched call
    (CPU tensors in, device tensors out). Untested on CPU-only machines; used by
    ``benchmarks/store_throughput.py --nvjpeg`` on a GPU.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if num_channels == 1 else ImageReadMode.RGB
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    return torch.stack(decode_jpeg(tensors, mode=mode, device=device))
