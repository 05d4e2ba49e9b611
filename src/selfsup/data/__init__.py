"""Data: built-in readers (idx, torchvision, the embedded sample), image folders and bad-image checks, label subsets and
official label lists, the prepared store (``store``, ``prepare``) and the Hugging Face reader (``hf``, optional extra).

``selfsup.data`` re-exports the public names below, as when it was one module.
"""
from selfsup.data.datasets import (  # noqa: F401
    BadImageError,
    DataError,
    DataNotFoundError,
    DATASET_NAMES,
    IMAGEFOLDER_PREFIX,
    IMAGE_EXTENSIONS,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    STL10_CLASSES,
    SYSTEM_DATA_DIRS,
    IN_MEMORY_MAX_IMAGES,
    IN_MEMORY_MAX_SIZE,
    DEFAULT_IMAGEFOLDER_SIZE,
    InMemoryDataset,
    default_load_size,
    ImageFolderDataset,
    load_dataset,
    canonical_dataset_name,
    LABEL_BALANCES,
    label_subset,
    read_label_list,
    fashion_mnist_available,
)

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
    'SYSTEM_DATA_DIRS',
    'IN_MEMORY_MAX_IMAGES',
    'IN_MEMORY_MAX_SIZE',
    'DEFAULT_IMAGEFOLDER_SIZE',
    'InMemoryDataset',
    'default_load_size',
    'ImageFolderDataset',
    'load_dataset',
    'canonical_dataset_name',
    'LABEL_BALANCES',
    'label_subset',
    'read_label_list',
    'fashion_mnist_available',
]
