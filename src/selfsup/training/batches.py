"""Step order and seeding: what makes step ``s`` the same batch on every run and every rank.

Randomness is a pure function of ``(seed, step)``: the data order of every epoch comes from a generator
seeded with ``(seed, epoch)`` and each step's augmentation from one seeded with ``(seed, step, rank)``.
Resuming from a checkpoint therefore replays exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

from typing import Iterator

import torch

from selfsup import distributed as dist


# ------------------------------------------------------------------------------------------------
# Data order


def mix_seed(*xs: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix-style), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h ^= (x + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 1)))


def step_indices(n: int, global_batch: int, seed: int, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Indices of this rank's share of the global batch of ``step`` (drop-last epochs of ``n // B`` steps)."""
    steps_per_epoch = n // global_batch
    epoch, i = divmod(step, steps_per_epoch)
    perm = epoch_permutation(n, seed, epoch)
    batch = perm[i * global_batch:(i + 1) * global_batch]
    local = global_batch // world
    return batch[rank * local:(rank + 1) * local]


class StepBatchSampler(torch.utils.data.Sampler):
    """Batch sampler for streamed data sets giving the same per-step indices as in-memory training."""

    def __init__(self, n: int, global_batch: int, seed: int, start_step: int, total_steps: int, rank: int = 0, world: int = 1):
        self.args = (n, global_batch, seed)
        self.start, self.total, self.rank, self.world = start_step, total_steps, rank, world

    def __iter__(self):
        for step in range(self.start, self.total):
            yield step_indices(*self.args, step, self.rank, self.world).tolist()

    def __len__(self):
        return max(0, self.total - self.start)


def batch_stream(dataset, global_batch: int, seed: int, start_step: int, total_steps: int, num_workers: int,
                 device: torch.device, with_labels: bool = False) -> Iterator[torch.Tensor]:
    """uint8 image batches (this rank's share) for steps ``start_step .. total_steps - 1``.

    ``with_labels``: yield ``(images, labels)`` instead (``--method supervised``).
    """
    n, r, w = len(dataset), dist.rank(), dist.world_size()
    if hasattr(dataset, "images"):
        images = dataset.images
        if device.type == "cuda" and images.numel() < 2 * 1024**3:
            images = images.to(device)  # small data sets live on the GPU: no per-step host copy
        for step in range(start_step, total_steps):
            idx = step_indices(n, global_batch, seed, step, r, w)
            batch = images[idx.to(images.device)].to(device, non_blocking=True)
            yield (batch, dataset.labels[idx].to(device, non_blocking=True)) if with_labels else batch
        return
    from torch.utils.data import DataLoader

    sampler = StepBatchSampler(n, global_batch, seed, start_step, total_steps, r, w)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, prefetch_factor=4 if num_workers else None,
                        collate_fn=getattr(dataset, "collate_fn", None))  # a store's: channels-last batches
    for images, labels in loader:
        batch = images.to(device, non_blocking=True)
        yield (batch, torch.as_tensor(labels).long().to(device, non_blocking=True)) if with_labels else batch
