"""selfsup's methods as Lightning modules, for users who already train with ``lightning.Trainer``.

One ``LightningModule`` per method: :class:`SimCLRModule`, :class:`SimCLRv2Module` (SimCLR with
SimCLRv2's 3-layer head) and :class:`BYOLModule`. Each wraps the same plain-torch method as
``selfsup pretrain`` (``selfsup.methods``), so the loss, heads, views, optimiser and schedules are
the same code; only the loop is Lightning's.

- Config: ``SimCLRModule(cfg)`` with a ``PretrainConfig`` (or its dict), or keyword arguments
  ``SimCLRModule(backbone="resnet18", batch_size=256, temperature=0.2)`` which go through
  ``build_config`` (the method's defaults apply, bad keys are refused naming the key). The data's
  ``in_channels``, ``image_size`` and ``mean``/``std`` come from :meth:`SelfSupModule.for_dataset` or
  are given. The weights are a function of ``cfg.seed`` (the global RNG is left alone), as in the loop.
- Data: batches of ``uint8`` images, or float images in [0, 1] (or ``(images, labels)``). ``on_after_batch_transfer`` runs our
  batched augmentation on the device after Lightning moved the batch there, with the loop's per-step
  seed, so :func:`step_dataloader` + this module give the plain loop's exact first step.
- Schedules: the learning rate (warm-up + cosine over ``trainer.max_steps``, or the estimated
  stepping batches) is set before each step; ``cfg.batch_size`` is the global batch used for the
  linear lr scaling, as in the loop.
- BYOL: the target network's EMA update is an explicit call in :meth:`SelfSupModule.optimizer_step`,
  after the optimiser has stepped, once per optimiser step (not per micro-batch when
  ``accumulate_grad_batches > 1``), with tau from the pure schedule ``ema_tau(step)``.
- Logging: ``loss``, ``lr`` and the method's monitors (``collapse_std`` and ``target_collapse_std``
  for BYOL, ``z_std`` for SimCLR) through ``self.log``, so any Lightning logger receives them; the
  collapse monitor warns as in the loop.
- Precision and devices are the Trainer's (``precision="bf16-mixed"``, ``devices=8``); ``cfg.precision``,
  ``cfg.device`` and ``cfg.accumulate`` apply to ``selfsup pretrain`` only (use ``accumulate_grad_batches``).
- Checkpoints: Lightning's ``.ckpt`` files hold only tensors and plain containers (the hyper-parameters
  are stored as a plain dict), so ``selfsup export --run FILE.ckpt --to ...`` reads them with
  ``torch.load(weights_only=True)``.

Needs ``pip install 'selfsup[lightning]'``.
"""
from __future__ import annotations

from dataclasses import replace

import lightning as L
import torch
from torch.utils.data import DataLoader

from selfsup.errors import ConfigError, DataError
from selfsup.methods.collapse import CollapseMonitor
from selfsup.training.build import build_model, resolve_views
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import build_config, from_dict, to_dict
from selfsup.training.guards import channels_last_hazard
from selfsup.training.optim import build_optimizer
from selfsup.training.schedules import ema_tau, scaled_lr, warmup_cosine
from selfsup.training.steps import StepBatchSampler, mix_seed
from selfsup.views.augment import BatchAugment

__all__ = ["SelfSupModule", "SimCLRModule", "SimCLRv2Module", "BYOLModule", "MODULES", "step_dataloader"]


class SelfSupModule(L.LightningModule):
    """A selfsup method under Lightning; use the subclass of your method (see the module docstring)."""

    method: str | None = None

    def __init__(self, config: PretrainConfig | dict | None = None, *, in_channels: int = 3, image_size: int = 32,
                 mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.25,), **kwargs):
        super().__init__()
        if config is not None and kwargs:
            raise ConfigError(f"give a config or keyword arguments, not both (got config and {', '.join(kwargs)})")
        if config is None:
            config = build_config(PretrainConfig, {"method": self.method or "simclr", **kwargs})
        elif isinstance(config, dict):
            config = build_config(PretrainConfig, {"method": self.method or "simclr", **config})
        config.validate()
        if self.method is not None and config.method != self.method:
            raise ConfigError(f"method: {type(self).__name__} trains {self.method!r}, the config says {config.method!r}; "
                              f"use MODULES[{config.method!r}]")
        if len(mean) != in_channels:
            mean, std = tuple(mean) * in_channels, tuple(std) * in_channels
        view1, view2 = resolve_views(config, image_size)
        self.cfg = replace(config, view=view1, view2=view2)
        with torch.random.fork_rng(devices=[]):  # the loop's initial weights for this seed
            torch.manual_seed(self.cfg.seed)
            self.model = build_model(self.cfg, in_channels, image_size, init=self.cfg.init)
        self.aug1 = BatchAugment(view1, image_size, mean, std)
        self.aug2 = BatchAugment(view2, image_size, mean, std)
        self.channels_last = self.cfg.channels_last and channels_last_hazard(self.model, torch.device("cpu")) is None
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.base_lr = scaled_lr(self.cfg.optim.lr, self.cfg.batch_size, self.cfg.optim.lr_scaling)
        self.collapse = CollapseMonitor.for_dim(self.cfg.proj_out_dim, self.cfg.collapse_threshold)
        self._step, self._last_step, self._micro = 0, -1, 0
        # Plain values only (no dataclasses), so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"config": to_dict(self.cfg), "in_channels": int(in_channels),
                                   "image_size": int(image_size), "mean": [float(m) for m in mean],
                                   "std": [float(s) for s in std]})

    @classmethod
    def for_dataset(cls, dataset, config: PretrainConfig | dict | None = None, **kwargs) -> "SelfSupModule":
        """The module for a selfsup data set (``selfsup.data.datasets.load_dataset``): channels, size and statistics from it."""
        return cls(config, in_channels=dataset.num_channels, image_size=dataset.image_size,
                   mean=tuple(dataset.mean), std=tuple(dataset.std), **kwargs)

    # -- schedule -------------------------------------------------------------------------------
    def total_steps(self) -> int:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        return int(trainer.estimated_stepping_batches)

    def lr_at(self, step: int) -> float:
        total = self.total_steps()
        warmup = int(round(self.cfg.optim.warmup_fraction * total))
        return warmup_cosine(step, total, warmup, self.base_lr, self.base_lr * self.cfg.optim.final_lr_fraction)

    # -- hooks ----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # As in the loop: the collapse warning is armed once warm-up is over.
        self.collapse.after_step = int(round(self.cfg.optim.warmup_fraction * self.total_steps()))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Two augmented views of the image batch, on the device, seeded as the loop's step (and micro-batch).

        The batch: images (a tensor) or ``(images, labels)``; images ``(B, C, H, W)``, uint8 in [0, 255] or
        float in [0, 1]. A pair of two same-shaped image tensors is taken as views made already.
        """
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(
                isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point() for t in batch) \
                and batch[0].shape == batch[1].shape:
            return tuple(batch)  # already views: leave them alone
        images = check_image_batch(batch[0] if isinstance(batch, (tuple, list)) and batch else batch)
        step = self.global_step
        if step != self._last_step:
            self._last_step, self._micro = step, 0
        parts = (self.cfg.seed, step, self.global_rank, 2) + ((self._micro,) if self._micro else ())
        self._micro += 1
        gen = torch.Generator(device=images.device).manual_seed(mix_seed(*parts))
        x1, x2 = self.aug1(images, gen), self.aug2(images, gen)
        if self.channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last)
            x2 = x2.contiguous(memory_format=torch.channels_last)
        return x1, x2

    def training_step(self, batch, batch_idx: int):
        x1, x2 = batch
        self._step = step = self.global_step
        lr = self.lr_at(step)
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = lr
        loss, logs = self.model(x1, x2)
        self.log("loss", loss, prog_bar=True)
        self.log("lr", lr)
        for key, value in logs.items():
            self.log(key, value)
        if "collapse_std" in logs:
            self.collapse.check(step + 1, float(logs["collapse_std"]))
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        update_target = getattr(self.model, "update_target", None)
        if update_target is not None:  # BYOL: after the optimiser step, once per step (BYOL Eq. 1)
            update_target(ema_tau(self._step, self.total_steps(), self.cfg.base_tau))

    def configure_optimizers(self):
        return build_optimizer(self.cfg.optim.name, self.model, self.base_lr, self.cfg.optim.weight_decay,
                               self.cfg.optim.momentum)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hyper_parameters"] = dict(checkpoint.get("hyper_parameters", {}))  # plain dict, not AttributeDict

    def encoder(self) -> torch.nn.Module:
        """The backbone f whose features are the representation."""
        return self.model.backbone


def check_image_batch(images) -> torch.Tensor:
    """``images`` if it is a ``(B, C, H, W)`` uint8 or [0, 1] float tensor, else a one-line ``DataError``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3) \
            or not (images.dtype == torch.uint8 or images.is_floating_point()):
        what = (f"a {images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                else f"a {type(images).__name__}")
        raise DataError(f"the DataLoader gave {what}; give images (B, C, H, W) with C = 1 or 3, uint8 in [0, 255] "
                        "or float in [0, 1], or (images, labels) pairs")
    if images.is_floating_point() and images.numel() and float(images.max()) > 1.0 + 1e-3:
        raise DataError(f"the DataLoader gave float images with values up to {float(images.max()):.4g}; float "
                        "images must be in [0, 1] (divide by 255, or give uint8)")
    return images


class SimCLRModule(SelfSupModule):
    """SimCLR (Chen et al. 2020) under Lightning."""

    method = "simclr"


class SimCLRv2Module(SelfSupModule):
    """SimCLRv2's pre-training (Chen et al. 2020b, Sec. 2: SimCLR with a 3-layer projection head) under Lightning."""

    method = "simclrv2"


class BYOLModule(SelfSupModule):
    """BYOL (Grill et al. 2020) under Lightning; the EMA target is updated after each optimiser step."""

    method = "byol"


MODULES: dict[str, type[SelfSupModule]] = {"simclr": SimCLRModule, "simclrv2": SimCLRv2Module, "byol": BYOLModule}


def step_dataloader(dataset, config: PretrainConfig, total_steps: int, num_workers: int = 0) -> DataLoader:
    """Batches of ``config.batch_size`` in the plain loop's order (``selfsup.training.loop.step_indices``) for ``total_steps``.

    Use with ``Trainer(max_steps=total_steps)``. Under several devices pass ``use_distributed_sampler=False``
    to the Trainer: each rank then takes its share of the global batch, as in the loop.
    """
    if isinstance(config, dict):
        config = from_dict(PretrainConfig, config)
    world = int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1
    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
    sampler = StepBatchSampler(len(dataset), config.batch_size, config.seed, 0, total_steps, rank, world)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)
