"""``load_dataset(name, split)``: the one entry point that reads any data set by name, as uint8 tensors for device-side augmentation.

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

import os

import torch

from selfsup.data.builtin import DATASET_SPLITS, load_embedded, load_idx_dataset, load_torchvision_dataset
from selfsup.data.containers import DATASET_NAMES, IMAGEFOLDER_PREFIX, InMemoryDataset, canonical_dataset_name
from selfsup.data.folders import ImageFolderDataset, load_image_folder
from selfsup.data.store import STORE_PREFIX, StoreDataset, open_store



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
    <= 64) every image is decoded once, exactly as streaming decodes it (shorter side resized to the
    load size, :func:`selfsup.data.containers.default_load_size`, centre square), into an
    :class:`InMemoryDataset`; otherwise an :class:`ImageFolderDataset` streams them.
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
        return load_image_folder(name, split, image_size, in_memory, num_channels, on_bad_image)
    if name.startswith(STORE_PREFIX):  # made by `selfsup prepare`; see selfsup.data.store
        return _load_store(name, split, image_size, in_memory)
    if name.startswith("hf:"):
        from selfsup.data.hf import load_hf_dataset  # optional extra (datasets): imported only for hf: names

        return load_hf_dataset(name, split, image_size, in_memory, image_column, label_column)
    key = canonical_dataset_name(name)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)} or imagefolder:PATH")
    if split not in DATASET_SPLITS[key]:
        raise ValueError(f"data set {key!r} has no split {split!r}; choose one of {', '.join(DATASET_SPLITS[key])}")
    if key == "embedded":
        return load_embedded(split)
    if key in ("fashion-mnist", "mnist"):
        return load_idx_dataset(key, split, data_dir)
    return load_torchvision_dataset(key, split, data_dir)


def _load_store(name: str, split: str, image_size: int | None, in_memory: bool | None) -> InMemoryDataset | StoreDataset:
    """A prepared store, streamed by index; ``in_memory=True`` reads it whole (at its stored size)."""
    store = open_store(name, split, image_size)
    if not in_memory:
        return store
    images = torch.stack([store[i][0] for i in range(len(store))])
    return InMemoryDataset(images=images, labels=store.labels, classes=store.classes, name=store.name,
                           mean=store.mean, std=store.std)
