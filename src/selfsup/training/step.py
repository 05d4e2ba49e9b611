"""One optimiser step, the same code under ``selfsup pretrain`` and the Lightning modules.

:class:`Schedule` gives the learning rate (linear warm-up given in epochs or as a fraction of the run, then
cosine) and the target network's EMA rate as pure functions of the step. :class:`OptimStep` runs one step:
the two views of each micro-batch drawn with the step's seed, the forward pass (under the run's precision),
the backward pass, a guard that skips a step whose loss or gradient is not finite (restoring batch-norm
statistics), the optimiser step and the target update the method's spec asks for.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from selfsup import distributed as dist
from selfsup.methods import MethodSpec
from selfsup.training.batches import mix_seed
from selfsup.training.config import PretrainConfig
from selfsup.training.devices import autocast_context
from selfsup.training.schedules import warmup_cosine


def warmup_steps_for(cfg: PretrainConfig, total_steps: int, steps_per_epoch: int) -> int:
    """``optim.warmup_epochs`` (the papers' 10 epochs) if set, else ``warmup_fraction`` of the run.

    Warm-up in epochs is capped at half the run, so a short run still has a cosine phase.
    """
    if cfg.optim.warmup_epochs is not None:
        return min(int(round(cfg.optim.warmup_epochs * steps_per_epoch)), total_steps // 2)
    return int(round(cfg.optim.warmup_fraction * total_steps))


@dataclass(frozen=True)
class Schedule:
    """The run's schedules over ``total_steps`` optimiser steps: learning rate and target EMA rate."""

    cfg: PretrainConfig
    base_lr: float  # optim.lr scaled with the global batch (training.schedules.scaled_lr)
    total_steps: int | None  # None only while a timed run measures its pace
    warmup_steps: int
    steps_per_epoch: int = 1  # optimiser steps per pass over the data (a method's schedules in epochs)

    @classmethod
    def for_run(cls, cfg: PretrainConfig, base_lr: float, total_steps: int, steps_per_epoch: int) -> Schedule:
        return cls(cfg, base_lr, total_steps, warmup_steps_for(cfg, total_steps, steps_per_epoch), steps_per_epoch)

    def lr(self, step: int) -> float:
        """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine to ``base_lr x final_lr_fraction``
        (``base_lr`` itself while the length is open)."""
        if self.total_steps is None:
            return self.base_lr
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.base_lr,
                             self.base_lr * self.cfg.optim.final_lr_fraction)

    def target_tau(self, step: int) -> float | None:
        """The method's target EMA rate after step ``step`` (None: the method has no target network)."""
        return self.cfg.spec.target_tau(self.cfg.section, step, self.total_steps)


def augment_seed(seed: int, step: int, rank: int) -> int:
    """The seed of step ``step``'s views on rank ``rank``: a pure function, so a resumed run draws the same views."""
    return mix_seed(seed, step, rank, 2)


class OptimStep:
    """One optimiser step over ``cfg.accumulate`` micro-batches, seeded by ``(seed, step, rank)``.

    ``views`` draws the views of a micro-batch (a :class:`selfsup.views.multicrop.MultiCrop`: the two global
    views, then the local crops when multi-crop is on); the method's ``forward`` takes them in that order
    (and ``labels=`` where its spec needs labels). The spec's ``before_step`` and ``before_optimizer_step``
    hooks run before the forward pass and before the optimiser steps.

    ``model`` is the method (unwrapped); ``forward`` calls it (the DDP / compiled wrapper in the loop, the
    module itself under Lightning); ``backward(loss)`` back-propagates (``loss.backward`` in the loop,
    ``LightningModule.manual_backward`` under Lightning); ``no_sync`` is DDP's context for the micro-batches
    whose gradients are not yet all-reduced (None: every backward synchronises). ``precision`` is applied
    here (``"bf16"``: autocast) unless the caller already runs under its own (Lightning's Trainer).

    A step with a non-finite loss or gradient is skipped without a trace: batch-norm running statistics
    (updated by the forward pass) are copied before each step and put back when it is skipped.
    """

    def __init__(self, model: nn.Module, optimizer, cfg: PretrainConfig, views: Callable, device: torch.device,
                 precision: str = "fp32", channels_last: bool = False, forward: Callable | None = None,
                 backward: Callable[[torch.Tensor], None] | None = None, no_sync: Callable | None = None):
        self.model, self.optimizer, self.cfg, self.make_views = model, optimizer, cfg, views
        self.spec: MethodSpec = cfg.spec
        self.device, self.precision, self.channels_last = device, precision, channels_last
        self.forward = forward if forward is not None else model
        self.backward = backward if backward is not None else torch.Tensor.backward
        self.no_sync = no_sync
        self.buffers = list(model.buffers())
        self.saved_buffers = [b.clone() for b in self.buffers]

    def skip(self, lr: float) -> tuple[float, float, dict[str, float]]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved_buffers)
        return float("nan"), lr, {}

    def views(self, images: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """The views of a micro-batch, drawn in order from the step's generator."""
        views = list(self.make_views(images, gen))
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    def __call__(self, step: int, batch, schedule: Schedule) -> tuple[float, float, dict[str, float]]:
        """Take step ``step`` on this rank's share of the batch (images, or ``(images, labels)`` for a method that
        needs labels); returns ``(loss, lr, logs)``, the loss NaN where the step was skipped."""
        cfg, optimizer = self.cfg, self.optimizer
        images, labels = batch if self.spec.needs_labels else (batch, None)
        lr = schedule.lr(step)
        for g in optimizer.param_groups:
            if not g.get("fixed_lr", False):  # a method's fixed-lr parameters keep their starting rate
                g["lr"] = lr
        gen = torch.Generator(device=images.device).manual_seed(augment_seed(cfg.seed, step, dist.rank()))
        micro = images.chunk(cfg.accumulate)
        micro_labels = labels.chunk(cfg.accumulate) if self.spec.needs_labels else [None] * len(micro)
        total_loss, logs = 0.0, {}
        if self.buffers:
            torch._foreach_copy_(self.saved_buffers, self.buffers)
        if self.spec.before_step is not None:
            self.spec.before_step(self.model, step, schedule)
        for i, mb in enumerate(micro):
            views = self.views(mb, gen)
            kwargs = {"labels": micro_labels[i]} if self.spec.needs_labels else {}
            last = i == len(micro) - 1
            # Under DDP, only the last micro-batch's backward all-reduces the summed gradients.
            with self.no_sync() if self.no_sync is not None and not last else contextlib.nullcontext():
                with autocast_context(self.device, self.precision):
                    loss, logs = self.forward(*views, **kwargs)
                loss_value = loss.detach().float()
                # Every rank must skip together, or the others would wait for its gradients.
                if not dist.all_ranks_true(bool(torch.isfinite(loss_value)), self.device):
                    return self.skip(lr)
                self.backward(loss / cfg.accumulate)
            total_loss += loss_value.item() / cfg.accumulate
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):  # all-reduced: same on every rank
            return self.skip(lr)
        if self.spec.before_optimizer_step is not None:
            self.spec.before_optimizer_step(self.model, step, schedule)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tau = schedule.target_tau(step)
        if tau is not None:  # an EMA target: an explicit call after every optimiser step (BYOL Eq. 1)
            self.model.update_target(tau)
        return total_loss, lr, {k: float(v) for k, v in logs.items()}
