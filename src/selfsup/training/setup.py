"""Setting up a pre-training run: the resume point, the training data and its views, the method and its optimiser.

The phases :func:`selfsup.training.loop.pretrain` runs before its first step, each returning a named record
(:class:`Run`, :class:`TrainingData`, :class:`Trainable`); and the guards against known crashes below selfsup
(in torch or its kernels), which turn a risky option off with a warning instead of crashing mid-run.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup import distributed as dist
from selfsup.data.datasets import load_dataset
from selfsup.errors import CheckpointError, ConfigError
from selfsup.models.backbones import build_backbone, saved_stem
from selfsup.models.sync_batchnorm import convert_sync_batchnorm
from selfsup.training import checkpoint as ckpt
from selfsup.training.config import PretrainConfig, check_length, complete, describe, lr_warning
from selfsup.training.devices import resolve_device, resolve_precision
from selfsup.training.init_weights import load_init
from selfsup.training.monitors import truncate_metrics
from selfsup.training.optim import build_optimizer
from selfsup.training.resume import load_model_weights, load_resume
from selfsup.training.schedules import scaled_lr
from selfsup.training.timed import PLAN_FILE
from selfsup.training.trackers import check_trackers
from selfsup.views.multicrop import MultiCrop


@dataclass(eq=False)
class Run:
    """Where and how the run happens: its config, folder, process role, device and resume point."""

    cfg: PretrainConfig
    run_dir: Path
    resume: bool
    owns_group: bool  # this call joined the process group, so it also leaves it
    main: bool  # rank 0: the only rank that writes files and logs
    device: torch.device
    precision: str
    weights: dict | None = None  # the checkpoint resumed from: model weights ...
    state: dict | None = None  # ... and optimiser state, step and length


@dataclass(eq=False)
class TrainingData:
    """The training split and the views drawn from it on the device (two global views, then any local crops)."""

    dataset: Any
    image_size: int
    views: MultiCrop


@dataclass(eq=False)
class Trainable:
    """The method, its wrappers and its optimiser."""

    model: nn.Module  # the method itself
    train_model: nn.Module  # under DDP (when distributed)
    step_model: nn.Module  # ... and torch.compile (when asked for)
    optimizer: Any
    base_lr: float  # optim.lr scaled with the global batch
    channels_last: bool


def begin_run(cfg: PretrainConfig, run_dir: Path, resume: bool) -> Run:
    """Check the config, join the process group, pick device and precision, find the resume point."""
    cfg.validate()
    if not resume:
        check_length(cfg)
    check_trackers(cfg.logger)  # a --logger whose package is missing fails here, before any work
    owns_group = dist.init_from_env(cfg.device)  # under torchrun: join the process group (docs/how-to/distributed.md)
    main = dist.is_main_process()
    if main:
        check_run_folder(run_dir, resume)
        ckpt.check_writable(run_dir)  # a read-only, missing or full output folder fails here, before any work
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    precision = resolve_precision(cfg.precision, device)
    cfg, weights, state = resume_point(cfg, run_dir, resume, main)
    if main:  # the first line of every run, and the lr warning, before any data is read
        print(describe(cfg), file=sys.stderr, flush=True)
        if (warning := lr_warning(cfg)) is not None:
            print(f"[selfsup] warning: {warning}", file=sys.stderr, flush=True)
    world = dist.world_size()
    if cfg.batch_size % (world * cfg.accumulate):
        raise ConfigError(f"batch_size: {cfg.batch_size} is not divisible by world size x accumulate "
                          f"({world} x {cfg.accumulate})")
    return Run(cfg=cfg, run_dir=run_dir, resume=resume, owns_group=owns_group, main=main, device=device,
               precision=precision, weights=weights, state=state)


def run_started(run_dir: Path) -> bool:
    """True if ``run_dir`` holds a run that ``--resume`` can continue (finished, or stopped at any point after its
    config or time plan was written)."""
    return ((run_dir / "config.yaml").is_file() or (run_dir / PLAN_FILE).is_file()
            or bool(ckpt.list_checkpoints(run_dir)))


def check_run_folder(run_dir: Path, resume: bool) -> None:
    """Before any work: ``--resume`` names a run folder; a new run goes into a missing or empty folder.

    A folder holding files (an earlier run, finished or not) is reused only through ``--resume``, so no
    run mixes its files with another's.
    """
    if resume:
        if not run_dir.is_dir():
            raise ConfigError(f"--resume {run_dir}: no such folder; give the folder of the run to continue, or "
                              f"start a new run with --out {run_dir}")
        if not run_started(run_dir):
            raise ConfigError(f"--resume {run_dir}: not a run folder (no config.yaml and no checkpoint); give the "
                              f"folder of the run to continue, or start a new run with --out {run_dir}")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; choose a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        what = "a run with checkpoints" if ckpt.list_checkpoints(run_dir) else "files (" + ", ".join(
            sorted(p.name for p in run_dir.iterdir())[:3]) + ")"
        raise ConfigError(f"{run_dir} already holds {what}; add --resume {run_dir} to continue it, or choose a new "
                          "--out folder (or delete this one)")


class CreatedFolder:
    """What a fresh run is about to create, so a run that fails before it starts (a config or data error) leaves
    nothing; once its config is written the folder stays, for ``--resume`` and for its logs.

    ``run_dir`` and the missing folders above it are removed; a folder that existed (empty, as
    ``check_run_folder`` asks) keeps existing and is emptied. Nothing that was there before is touched.
    """

    def __init__(self, run_dir: Path, resume: bool):
        self.run_dir = run_dir
        self.root: Path | None = None  # the outermost folder this run creates; None: run_dir already exists
        main = dist.is_main_process() and os.environ.get("RANK", "0") == "0"  # before torchrun's group is joined too
        self.active = not resume and main and not (run_dir.is_dir() and any(run_dir.iterdir()))
        if self.active and not run_dir.exists():
            self.root = run_dir
            while not self.root.parent.exists():
                self.root = self.root.parent

    def remove_if_unfinished(self) -> None:
        """Remove what the run created, unless it started (then ``--resume`` can continue it)."""
        if not self.active or not self.run_dir.is_dir() or run_started(self.run_dir):
            return
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for child in self.run_dir.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def resume_point(cfg: PretrainConfig, run_dir: Path, resume: bool, main: bool):
    """``(cfg, weights, state)``: the saved config and checkpoint when resuming, else ``(cfg, None, None)``."""
    if resume and not ckpt.list_checkpoints(run_dir):
        # Killed before its first checkpoint: the run starts again from step 0 with the same seed and
        # (for --minutes) the recorded step plan, so it ends as an uninterrupted run would.
        if main:
            print(f"[selfsup] --resume {run_dir}: no checkpoint was written yet; starting from step 0", file=sys.stderr)
        truncate_metrics(run_dir / "metrics.jsonl", 0)
    elif resume:
        return load_resume(cfg, run_dir)
    return cfg, None, None


def load_training_data(run: Run) -> tuple[PretrainConfig, TrainingData]:
    """Read the training split; returns the config with what a directly constructed one left open filled for the
    data's image size (``complete``: a resolved config comes back unchanged) and the data with its two views."""
    cfg, main = run.cfg, run.main
    spec = cfg.spec
    unlabelled_too = cfg.dataset.startswith("stl10") and not spec.needs_labels
    dataset = load_dataset(cfg.dataset, "train+unlabeled" if unlabelled_too else "train",
                           data_dir=cfg.data_dir, image_size=cfg.image_size, on_bad_image=cfg.on_bad_image,
                           image_column=cfg.hf.image_column, label_column=cfg.hf.label_column)
    image_report = getattr(dataset, "image_report", None)  # bad/small images found by the scan (image folders)
    if main and image_report is not None and (image_report.bad or image_report.upscaled):
        print(f"[selfsup] {image_report.summary()}", file=sys.stderr)
    image_size = cfg.image_size or dataset.image_size
    n = len(dataset)
    if n < cfg.batch_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is larger than the data set ({n} images); lower --batch-size")
    if spec.needs_labels and (dataset.labels is None or bool((dataset.labels < 0).any())):
        raise ConfigError(f"method: {cfg.method!r} trains with labels and {cfg.dataset!r} has unlabelled images; "
                          "use a labelled data set (class sub-folders for an image folder)")
    cfg = complete(cfg, image_size)
    views = MultiCrop(cfg.view, cfg.view2, image_size, dataset.mean, dataset.std, cfg.multicrop)
    return cfg, TrainingData(dataset, image_size, views)


def build_model(cfg: PretrainConfig, in_channels: int, image_size: int, num_classes: int | None = None,
                init: str | None = None) -> nn.Module:
    """The method around a fresh backbone; ``init`` (``--init``) loads the backbone's starting weights first,
    so a target network starts as the same copy. ``model.init_record`` then says what was loaded. A method
    that needs labels also takes ``num_classes``."""
    kw = {} if cfg.backbone_width is None else {"width": cfg.backbone_width}
    kw.update(saved_stem(cfg.backbone, cfg.small_stem, image_size))
    if cfg.zero_init_residual:
        kw["zero_init_residual"] = True
    backbone = build_backbone(cfg.backbone, in_channels=in_channels, image_size=image_size, **kw)
    record = load_init(backbone, init) if init is not None else None
    model = cfg.spec.build(cfg.section, backbone, num_classes if cfg.spec.needs_labels else None)
    model.init_record = record
    return model


def build_run(run: Run, cfg: PretrainConfig, data: TrainingData) -> Trainable:
    """The method around its backbone (seeded, ``--init`` or the checkpoint's weights), then its optimiser."""
    device = run.device
    torch.manual_seed(cfg.seed)
    # --init applies to a fresh run only: a resumed run continues from its checkpoint's weights.
    init = cfg.init if run.weights is None else None
    num_classes = data.dataset.num_classes if cfg.spec.needs_labels else None
    model = build_model(cfg, data.dataset.num_channels, data.image_size, num_classes, init=init).to(device)
    if run.weights is not None:
        load_model_weights(model, run.weights, run.run_dir)
    if cfg.sync_bn and dist.world_size() > 1:  # global batch-norm statistics (SimCLR Sec. B.1)
        model = convert_sync_batchnorm(model)
    channels_last = cfg.channels_last
    if channels_last and (hazard := channels_last_hazard(model, device)):
        warnings.warn(f"channels_last is off for this run: {hazard}")
        channels_last = False
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    base_lr = scaled_lr(cfg.optim.lr, cfg.batch_size, cfg.optim.lr_scaling)
    optimizer = build_optimizer(cfg.optim.name, model, base_lr, cfg.optim.weight_decay, cfg.optim.momentum)
    if run.state is not None:
        try:
            optimizer.load_state_dict(run.state["optimizer"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"--resume {run.run_dir}: the optimiser state in the checkpoint does not fit "
                                       f"this model and optimiser ({type(e).__name__}: {e})") from None
    if run.main:  # room for keep_last + 1 checkpoints and the final weights, checked before training
        ckpt.check_space_for_run(run.run_dir, model.state_dict(), cfg.keep_last, 2 if cfg.optim.name == "adamw" else 1)
    train_model = dist.wrap_ddp(model, device)
    step_model = torch.compile(train_model) if cfg.compile else train_model
    return Trainable(model, train_model, step_model, optimizer, base_lr, channels_last)


def total_steps_for(cfg: PretrainConfig, n: int) -> int | None:
    """The run's length in steps from ``steps`` or ``epochs`` over ``n`` images (None for ``--minutes``)."""
    steps_per_epoch = n // cfg.batch_size
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        return max(1, int(round(cfg.epochs * steps_per_epoch)))
    return None  # minutes: fixed after timing the first steps


# ------------------------------------------------------------------------------------------------
# Guards against known crashes below selfsup


def channels_last_hazard(model: nn.Module, device: torch.device) -> str | None:
    """Why ``channels_last`` must stay off for ``model`` on ``device``, or ``None``.

    torch 2.14's oneDNN CPU kernel for the weight gradient of a 1x1 convolution with stride > 1 and
    fewer than 8 input channels corrupts the heap in channels-last layout (the process dies with
    "double free or corruption" or a segmentation fault a step or two later). Such convolutions
    appear in the ResNet downsample path of very narrow backbones (width <= 1/16 of 64 channels).
    ``tests/test_reliability.py`` runs that model once in a subprocess to see whether it still
    applies.
    """
    if device.type != "cpu":
        return None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 8
                and m.weight.requires_grad):
            return (f"{name} is a 1x1 stride-{max(m.stride)} convolution with {m.in_channels} input channels, whose "
                    "channels-last weight gradient crashes oneDNN on CPU")
    return None
