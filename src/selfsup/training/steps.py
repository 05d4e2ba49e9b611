"""Step order and seeding, devices and precision: what makes step ``s`` the same step on every run and every rank.

Randomness is a pure function of ``(seed, step)``: the data order of every epoch comes from a generator
seeded with ``(seed, epoch)`` and each step's augmentation from one seeded with ``(seed, step, rank)``.
Resuming from a checkpoint therefore replays exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from selfsup import distributed as dist
from selfsup.errors import ConfigError
from selfsup.training.build import unwrap
from selfsup.training.schedules import ema_tau


# ------------------------------------------------------------------------------------------------
# Devices and precision


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank() if dist.launched_by_torchrun() else 0)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} was asked for but CUDA is not available; use --set device=cpu")
    if name == "cuda":
        return torch.device("cuda", dist.local_rank() if dist.launched_by_torchrun() else torch.cuda.current_device())
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 runs natively: CUDA with bf16 units, CPUs with AVX512-BF16/AMX (oneDNN's check).

    On CPUs without them PyTorch emulates bf16 and a step gets several times slower, so ``auto``
    keeps fp32 there.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


class TrainStep:
    """One optimiser step over ``accumulate`` micro-batches, seeded by ``(seed, step, rank)``.

    A step with a non-finite loss or gradient is skipped without a trace: batch-norm running statistics
    (updated by the forward pass) are copied before each step and put back when it is skipped.
    """

    def __init__(self, run):  # a selfsup.training.setup.RunState
        self.run = run
        self.buffers = list(run.model.buffers())
        self.saved_buffers = [b.clone() for b in self.buffers]

    def skip(self) -> tuple[float, dict[str, float]]:
        self.run.optimizer.zero_grad(set_to_none=True)
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved_buffers)
        return float("nan"), {}

    def __call__(self, step: int, images, lr: float) -> tuple[float, dict[str, float]]:
        run = self.run
        cfg, optimizer, (aug1, aug2) = run.cfg, run.optimizer, run.augs
        images, labels = images if run.with_labels else (images, None)  # (images, labels) for LABELLED_METHODS
        for g in optimizer.param_groups:
            g["lr"] = lr
        gen = torch.Generator(device=run.device).manual_seed(mix_seed(cfg.seed, step, dist.rank(), 2))
        micro = images.chunk(cfg.accumulate)
        micro_labels = labels.chunk(cfg.accumulate) if run.with_labels else [None] * len(micro)
        total_loss, logs = 0.0, {}
        if self.buffers:
            torch._foreach_copy_(self.saved_buffers, self.buffers)
        for i, mb in enumerate(micro):
            x1, x2 = aug1(mb, gen), aug2(mb, gen)
            if run.channels_last:
                x1 = x1.contiguous(memory_format=torch.channels_last)
                x2 = x2.contiguous(memory_format=torch.channels_last)
            sync = i == len(micro) - 1 or not dist.is_distributed()
            # Under DDP, only the last micro-batch's backward all-reduces the summed gradients.
            with contextlib.nullcontext() if sync else run.train_model.no_sync():
                with autocast_context(run.device, run.precision):
                    inputs = (x1, x2) if not run.with_labels else (x1, x2, micro_labels[i])
                    loss, logs = run.step_model(*inputs)
                loss_value = loss.detach().float()
                # Every rank must skip together, or the others would wait for its gradients.
                if not dist.all_ranks_true(bool(torch.isfinite(loss_value)), run.device):
                    return self.skip()
                (loss / cfg.accumulate).backward()
            total_loss += loss_value.item() / cfg.accumulate
        grads = [p.grad for p in run.model.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):  # all-reduced: same on every rank
            return self.skip()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_target = getattr(unwrap(run.model), "update_target", None)
        if update_target is not None:  # BYOL's EMA target: an explicit call after every optimiser step
            # total_steps is None only while --minutes times throw-away steps (their state is restored).
            update_target(ema_tau(step, run.total_steps, cfg.base_tau) if run.total_steps else cfg.base_tau)
        return total_loss, {k: float(v) for k, v in logs.items()}
