"""Data: built-in readers (idx, torchvision, the embedded sample), image folders and bad-image checks, label subsets and
official label lists, the prepared store (``store``, ``prepare``) and the Hugging Face reader (``hf``, optional extra).

``selfsup.data`` re-exports the public names below, as when it was one module.
"""
from selfsup.data.builtin import SYSTEM_DATA_DIRS, fashion_mnist_available
from selfsup.data.containers import (
    DATASET_NAMES, IMAGEFOLDER_PREFIX, IMAGE_EXTENSIONS, FASHION_MNIST_CLASSES, MNIST_CLASSES, STL10_CLASSES,
    IN_MEMORY_MAX_IMAGES, IN_MEMORY_MAX_SIZE, DEFAULT_IMAGEFOLDER_SIZE, InMemoryDataset, default_load_size,
    canonical_dataset_name,
)
from selfsup.data.datasets import load_dataset
from selfsup.data.folders import ImageFolderDataset
from selfsup.data.labels import LABEL_BALANCES, label_subset, read_label_list
from selfsup.errors import BadImageError, DataError, DataNotFoundError  # noqa: F401

__all__ = [
    'BadImageError',
    'DataError',
    'DataNotFoundError',
    'DATASET_NAMES',
    'IMAGEFOLDER_PREFIX',
    'IMAGE_EXTENSIONS',
    'FASHION_MNIST_CLASSES',
    'MNIST_CLASSES',
    'STL10_CLASSES',
    'IN_MEMORY_MAX_IMAGES',
    'IN_MEMORY_MAX_SIZE',
    'DEFAULT_IMAGEFOLDER_SIZE',
    'InMemoryDataset',
    'default_load_size',
    'canonical_dataset_name',
    'SYSTEM_DATA_DIRS',
    'fashion_mnist_available',
    'ImageFolderDataset',
    'LABEL_BALANCES',
    'label_subset',
    'read_label_list',
    'load_dataset',
]
