"""selfsup's methods as Lightning modules, for users who already train with ``lightning.Trainer``.

One ``LightningModule`` per registered method (``MODULES``, built from ``selfsup.methods.METHODS``):
:class:`SimCLRModule`, :class:`SimCLRv2Module`, :class:`BYOLModule`, ... Each wraps the same plain-torch
method as ``selfsup pretrain`` and takes its optimisation step with the same code
(:class:`selfsup.training.step.OptimStep`): the views, the learning rate (warm-up in epochs or as a
fraction, then cosine), accumulation, the non-finite guard and the target update are the loop's; only
the loop around them is Lightning's (manual optimisation).

- Config: ``SimCLRModule(cfg)`` with a ``PretrainConfig`` (or its dict), or keyword arguments
  ``SimCLRModule(backbone="resnet18", batch_size=256, simclr={"temperature": 0.2})`` which go through
  ``build_config`` (the method's defaults apply, bad keys are refused naming the key). The data's
  ``in_channels``, ``image_size`` and ``mean``/``std`` come from :meth:`SelfSupModule.for_dataset` or
  are given. The weights are a function of ``cfg.seed`` (the global RNG is left alone), as in the loop.
- Data: batches of ``uint8`` images, or float images in [0, 1] (or ``(images, labels)``), this device's
  share of the global batch ``cfg.batch_size``; :func:`step_dataloader` gives the loop's order, so this
  module takes the loop's exact steps. The views are drawn on the device with the loop's per-step seed.
- Schedules: over ``trainer.max_steps`` (or the estimated stepping batches); an epoch is
  ``len(train_dataloader.dataset) // cfg.batch_size`` steps, as in the loop, for ``optim.warmup_epochs``.
- ``cfg.accumulate`` splits each batch into micro-batches as in the loop (Lightning's
  ``accumulate_grad_batches`` does not apply under manual optimisation).
- Logging: ``loss``, ``lr`` and the method's monitors through ``self.log``, so any Lightning logger
  receives them; the collapse monitor warns as in the loop.
- Precision and devices are the Trainer's (``precision="bf16-mixed"``, ``devices=8``); ``cfg.precision``
  and ``cfg.device`` apply to ``selfsup pretrain`` only.
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
from selfsup.methods import METHODS
from selfsup.methods.collapse import CollapseMonitor
from selfsup.training.batches import StepBatchSampler
from selfsup.training.config import PretrainConfig, complete
from selfsup.training.config_io import build_config, from_dict, to_dict
from selfsup.training.optim import build_optimizer
from selfsup.training.schedules import scaled_lr
from selfsup.training.setup import build_model, channels_last_hazard
from selfsup.training.step import OptimStep, Schedule
from selfsup.views.multicrop import MultiCrop


class SelfSupModule(L.LightningModule):
    """A selfsup method under Lightning; use the subclass of your method (see the module docstring)."""

    method: str | None = None

    def __init__(self, config: PretrainConfig | dict | None = None, *, in_channels: int = 3, image_size: int = 32,
                 mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.25,), num_classes: int | None = None,
                 **kwargs):
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
        self.cfg = complete(config, image_size)
        if self.cfg.spec.needs_labels and num_classes is None:
            raise ConfigError(f"method: {self.cfg.method!r} trains with labels; give num_classes (or use for_dataset)")
        with torch.random.fork_rng(devices=[]):  # the loop's initial weights for this seed
            torch.manual_seed(self.cfg.seed)
            self.model = build_model(self.cfg, in_channels, image_size, num_classes=num_classes, init=self.cfg.init)
        self.views = MultiCrop(self.cfg.view, self.cfg.view2, image_size, mean, std, self.cfg.multicrop)
        self.channels_last = self.cfg.channels_last and channels_last_hazard(self.model, torch.device("cpu")) is None
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.base_lr = scaled_lr(self.cfg.optim.lr, self.cfg.batch_size, self.cfg.optim.lr_scaling)
        dim = self.cfg.spec.collapse_dim(self.cfg.section)
        self.collapse = CollapseMonitor.for_dim(dim or 1, self.cfg.collapse_threshold if dim else 0.0,
                                                hint=self.cfg.spec.collapse_hint)
        self.automatic_optimization = False  # the step is OptimStep's, the loop's own
        self._optim_step: OptimStep | None = None
        self._schedule: Schedule | None = None
        # Plain values only (no dataclasses), so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"config": to_dict(self.cfg), "in_channels": int(in_channels),
                                   "image_size": int(image_size), "mean": [float(m) for m in mean],
                                   "std": [float(s) for s in std], "num_classes": num_classes})

    @classmethod
    def for_dataset(cls, dataset, config: PretrainConfig | dict | None = None, **kwargs) -> "SelfSupModule":
        """The module for a selfsup data set (``selfsup.data.datasets.load_dataset``): channels, size and statistics from it."""
        labels = getattr(dataset, "labels", None)
        num_classes = dataset.num_classes if labels is not None else None
        return cls(config, in_channels=dataset.num_channels, image_size=dataset.image_size,
                   mean=tuple(dataset.mean), std=tuple(dataset.std), num_classes=num_classes, **kwargs)

    # -- schedule ---------------------------------------------------------------------------------
    def total_steps(self) -> int:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        return int(trainer.estimated_stepping_batches)

    def steps_per_epoch(self) -> int:
        """Optimiser steps per pass over the data, as in the loop: ``len(dataset) // cfg.batch_size`` (an iterable
        data set: Lightning's batches per epoch)."""
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        try:
            return max(1, len(dataset) // self.cfg.batch_size)
        except TypeError:
            batches = self.trainer.num_training_batches
            return max(1, int(batches)) if batches != float("inf") else 1

    def schedule(self) -> Schedule:
        """The loop's schedules for this Trainer's run length (``Schedule.for_run``)."""
        return Schedule.for_run(self.cfg, self.base_lr, self.total_steps(), self.steps_per_epoch())

    def lr_at(self, step: int) -> float:
        return self.schedule().lr(step)

    # -- hooks ----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._optim_step, self._schedule = None, None  # each fit has its own optimiser and length

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Check the batch: images ``(B, C, H, W)``, uint8 in [0, 255] or float in [0, 1], or ``(images, labels)``.
        The views are drawn in the step, on the device, with the loop's per-step seed."""
        images = check_image_batch(batch[0] if isinstance(batch, (tuple, list)) and batch else batch)
        if self.cfg.spec.needs_labels:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise DataError(f"method {self.cfg.method!r} trains with labels; give (images, labels) batches")
            return images, batch[1]
        return images

    def training_step(self, batch, batch_idx: int):
        if self._optim_step is None:  # the data loader is known from the first batch on
            self._optim_step = OptimStep(self.model, self.optimizers(), self.cfg, self.views, self.device,
                                         channels_last=self.channels_last, backward=self.manual_backward)
            self._schedule = self.schedule()
            self.collapse.after_step = self._schedule.warmup_steps  # as in the loop: armed once warm-up is over
        step = self.global_step
        loss, lr, logs = self._optim_step(step, batch, self._schedule)
        self.log("loss", loss, prog_bar=True)
        self.log("lr", lr)
        for key, value in logs.items():
            self.log(key, value)
        if "collapse_std" in logs:
            self.collapse.check(step + 1, float(logs["collapse_std"]))
        return torch.tensor(loss)

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


def _module_class(name: str) -> type[SelfSupModule]:
    spec = METHODS[name]
    title = "".join(c for c in spec.title.title() if c.isalnum()) if not spec.title.isalnum() else spec.title
    return type(f"{title}Module", (SelfSupModule,), {
        "method": name, "__module__": __name__,
        "__doc__": f"{spec.title} ({spec.paper}) under Lightning: ``selfsup pretrain --method {name}``'s step."})


# One module class per registered method, named after its title: SimCLRModule, SimCLRv2Module, BYOLModule, ...
MODULES: dict[str, type[SelfSupModule]] = {name: _module_class(name) for name in METHODS}
globals().update({cls.__name__: cls for cls in MODULES.values()})
SimCLRModule, SimCLRv2Module, BYOLModule = MODULES["simclr"], MODULES["simclrv2"], MODULES["byol"]

# Every method's class (SimCLRModule, BYOLModule, ...) is made from its spec, kept in MODULES and importable by its name.
__all__ = ["SelfSupModule", "MODULES", "step_dataloader"]


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
