"""What every reader returns: uint8 ``(C, H, W)`` images in an :class:`InMemoryDataset`, the per-channel mean/std, the data set names."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "gray": ((0.5,), (0.25,)),
}
MEAN_STD["embedded"] = MEAN_STD["fashion-mnist"]
MEAN_STD["stl10"] = MEAN_STD["imagenet"]

IN_MEMORY_MAX_IMAGES = 20_000
IN_MEMORY_MAX_SIZE = 64
SMALL_IMAGE_MAX = 32  # evaluation keeps the whole image up to this side (selfsup.evaluation.preprocess.eval_crop)
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
    """Side at which streamed images are stored: ``image_size * 256 / 224`` (~1.15x), rounded; 256 for 224.

    Evaluation keeps the central 224/256 = 87.5% of such an image, which is then ``image_size`` with no
    second resize. At 32 px and below evaluation keeps the whole image, so images are stored at
    ``image_size`` itself: a larger side would only upscale them and make evaluation resize them back
    (a streamed 28 px folder then read differently from the same folder held in memory).
    """
    if image_size <= SMALL_IMAGE_MAX:
        return int(image_size)
    return int(round(image_size * 256 / 224))


def canonical_dataset_name(name: str) -> str:
    """The built-in name ``name`` stands for (``"CIFAR_10"`` -> ``"cifar10"``); unknown names come back normalised."""
    key = name.strip().lower().replace("_", "-")
    return {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100", "stl-10": "stl10"}.get(
        key, key
    )
