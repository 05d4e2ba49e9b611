"""A held-out part of the training split, for data sets that have no ``test`` split of their own.

A labelled image folder without ``val/``, a single ``hf:`` Dataset or a store prepared without a held-out
split can still be evaluated: ``HOLDOUT_FRACTION`` of each class's training images (seeded, stratified)
is set aside as the queries, the rest is the training side (kNN bank, linear-probe fit). The result says
so, as this measures generalisation to unseen images of the same collection, not to a curated test set.
"""

from __future__ import annotations

import torch

HOLDOUT_FRACTION = 0.2


def holdout_split(labels: torch.Tensor, fraction: float = HOLDOUT_FRACTION,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, held_out)``: sorted indices; ``round(fraction x count)`` images of each class held out.

    Stratified: each class with at least two images gives at least one and keeps at least one; a class
    of one image stays on the kept side. Unlabelled samples (``-1``) are never held out. Seeded: the
    same labels and seed give the same split.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    g = torch.Generator().manual_seed(int(seed))
    held = []
    for c in torch.unique(labels[labels >= 0]).tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < 2:
            continue
        n = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        held.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    held_out = torch.cat(held).sort().values if held else torch.empty(0, dtype=torch.int64)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_out] = False
    return mask.nonzero().flatten(), held_out


class IndexedSubset(torch.utils.data.Dataset):
    """The samples of a streamed data set at ``indices``, with its classes, statistics and image size."""

    def __init__(self, dataset, indices: torch.Tensor):
        self.dataset, self.indices = dataset, torch.as_tensor(indices, dtype=torch.int64)
        self.labels = None if dataset.labels is None else dataset.labels[self.indices]
        for name in ("classes", "name", "mean", "std", "num_channels", "image_size"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.indices[index])]


def subset(dataset, indices: torch.Tensor):
    """``dataset`` restricted to ``indices``: an in-memory data set's own copy, else an :class:`IndexedSubset`."""
    return dataset.subset(indices) if hasattr(dataset, "subset") else IndexedSubset(dataset, indices)


def split_off_test(train, fraction: float = HOLDOUT_FRACTION, seed: int = 0) -> tuple:
    """``(train part, held-out part, description)`` of a labelled training split (see :func:`holdout_split`)."""
    kept, held = holdout_split(train.labels, fraction, seed)
    about = {"test_split": "held out from the training images", "holdout_fraction": fraction,
             "holdout_seed": int(seed), "holdout": "stratified by class"}
    return subset(train, kept), subset(train, held), about
