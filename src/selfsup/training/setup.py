"""Setting up a pre-training run: the resume point, the training data and its views, the method and its optimiser.

The phases :func:`selfsup.training.loop.pretrain` runs before its first step; what they produce is kept
in one :class:`RunState`, which the loop then updates step by step.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup import distributed as dist
from selfsup.data.datasets import load_dataset
from selfsup.errors import ConfigError
from selfsup.methods import LABELLED_METHODS, recipes
from selfsup.methods.collapse import CollapseMonitor
from selfsup.models.resnet import SMALL_IMAGE_MAX
from selfsup.models.sync_batchnorm import convert_sync_batchnorm
from selfsup.training import checkpoint as ckpt
from selfsup.training.build import build_model, resolve_views
from selfsup.training.config import PretrainConfig, check_length
from selfsup.training.guards import channels_last_hazard
from selfsup.training.metrics import truncate_metrics
from selfsup.training.optim import build_optimizer
from selfsup.training.resume import load_model_weights, load_resume
from selfsup.training.schedules import scaled_lr
from selfsup.training.steps import resolve_device, resolve_precision
from selfsup.training.timed import PLAN_FILE, TimePlan
from selfsup.training.trackers import check_trackers
from selfsup.views.augment import BatchAugment


@dataclass(eq=False)
class RunState:
    """One run, shared by the phases of :func:`pretrain`: set up once, then updated step by step."""

    cfg: PretrainConfig
    run_dir: Path
    resume: bool
    owns_group: bool  # this call joined the process group, so it also leaves it
    main: bool  # rank 0: the only rank that writes files and logs
    device: torch.device
    precision: str
    weights: dict | None = None  # the checkpoint resumed from: model weights ...
    state: dict | None = None  # ... and optimiser state, step and length
    dataset: Any = None
    image_size: int = 0
    with_labels: bool = False  # LABELLED_METHODS get (images, labels) batches
    model: nn.Module | None = None
    train_model: nn.Module | None = None  # the model under DDP (when distributed)
    step_model: nn.Module | None = None  # ... and torch.compile (when asked for)
    channels_last: bool = False
    augs: tuple = ()
    optimizer: Any = None
    base_lr: float = 0.0
    # The run's length; a timed run (--minutes) may re-plan total_steps and warmup_steps.
    start_step: int = 0
    total_steps: int | None = 1
    warmup_steps: int = 0
    steps_per_epoch: int = 1
    plan: TimePlan | None = None
    replaying: bool = False  # a resumed timed run follows its recorded plan
    t_budget: float = 0.0
    replan_every: int = 1
    length_change: dict | None = None  # a resume that gave a new length: the step and the length before
    # Bookkeeping of the loop.
    step: int = 0
    bad_in_a_row: int = 0
    bad_total: int = 0
    last_ckpt: Path | None = None
    collapse: CollapseMonitor | None = None
    logger: Any = None
    bar: Any = None
    imgs_since: int = 0
    t_start: float = 0.0
    t_log: float = 0.0
    t_prev: float = 0.0
    step_times: list = field(default_factory=list)
    knn_seconds: list = field(default_factory=list)
    knn_cost: float = 0.0  # a timed run's measured cost of one kNN-monitor evaluation, until one has run
    knn_data: Any = None




def begin_run(cfg: PretrainConfig, run_dir: Path, resume: bool) -> RunState:
    """Check the config, join the process group, pick device and precision, find the resume point."""
    cfg.validate()
    if not resume:
        check_length(cfg)
    check_trackers(cfg.logger)  # a --logger whose package is missing fails here, before any work
    owns_group = dist.init_from_env(cfg.device)  # under torchrun: join the process group (docs/distributed.md)
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
        print(recipes.describe(cfg), file=sys.stderr, flush=True)
        if (warning := recipes.lr_warning(cfg)) is not None:
            print(f"[selfsup] warning: {warning}", file=sys.stderr, flush=True)
    world = dist.world_size()
    if cfg.batch_size % (world * cfg.accumulate):
        raise ConfigError(f"batch_size: {cfg.batch_size} is not divisible by world size x accumulate "
                          f"({world} x {cfg.accumulate})")
    return RunState(cfg=cfg, run_dir=run_dir, resume=resume, owns_group=owns_group, main=main, device=device,
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


def load_training_data(run: RunState) -> None:
    """Read the training split; resolve the image size, the two views and the stem into the config."""
    cfg, main = run.cfg, run.main
    unlabelled_too = cfg.dataset.startswith("stl10") and cfg.method not in LABELLED_METHODS
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
    with_labels = cfg.method in LABELLED_METHODS
    if with_labels and (dataset.labels is None or bool((dataset.labels < 0).any())):
        raise ConfigError(f"method: {cfg.method!r} trains with labels and {cfg.dataset!r} has unlabelled images; "
                          "use a labelled data set (class sub-folders for an image folder)")
    view1, view2 = resolve_views(cfg, image_size)
    if cfg.view is None or cfg.view2 is None:
        cfg = replace(cfg, view=view1, view2=view2)  # written resolved into config.yaml and checkpoints
    if cfg.small_stem is None and not cfg.backbone.startswith("timm:"):
        cfg = replace(cfg, small_stem=image_size <= SMALL_IMAGE_MAX)  # recorded, so the run reloads the same
    run.cfg, run.dataset, run.image_size, run.with_labels = cfg, dataset, image_size, with_labels
    run.augs = (BatchAugment(view1, image_size, dataset.mean, dataset.std),
                BatchAugment(view2, image_size, dataset.mean, dataset.std))


def build_run(run: RunState) -> None:
    """The method around its backbone (seeded, ``--init`` or the checkpoint's weights), then its optimiser."""
    cfg, dataset, device = run.cfg, run.dataset, run.device
    torch.manual_seed(cfg.seed)
    # --init applies to a fresh run only: a resumed run continues from its checkpoint's weights.
    init = cfg.init if run.weights is None else None
    num_classes = dataset.num_classes if run.with_labels else None  # only labelled methods take it
    model = build_model(cfg, dataset.num_channels, run.image_size, num_classes=num_classes, init=init).to(device)
    if run.weights is not None:
        load_model_weights(model, run.weights, run.run_dir)
    if cfg.sync_bn and dist.world_size() > 1:  # global batch-norm statistics (SimCLR Sec. B.1)
        model = convert_sync_batchnorm(model)
    run.channels_last = cfg.channels_last
    if run.channels_last and (hazard := channels_last_hazard(model, device)):
        warnings.warn(f"channels_last is off for this run: {hazard}")
        run.channels_last = False
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)

    run.base_lr = scaled_lr(cfg.optim.lr, cfg.batch_size, cfg.optim.lr_scaling)
    run.optimizer = build_optimizer(cfg.optim.name, model, run.base_lr, cfg.optim.weight_decay, cfg.optim.momentum)
    if run.state is not None:
        try:
            run.optimizer.load_state_dict(run.state["optimizer"])
        except (KeyError, ValueError, TypeError) as e:
            raise ckpt.CheckpointError(f"--resume {run.run_dir}: the optimiser state in the checkpoint does not fit "
                                       f"this model and optimiser ({type(e).__name__}: {e})") from None
    if run.main:  # room for keep_last + 1 checkpoints and the final weights, checked before training
        ckpt.check_space_for_run(run.run_dir, model.state_dict(), cfg.keep_last, 2 if cfg.optim.name == "adamw" else 1)
    run.model = model
    run.train_model = dist.wrap_ddp(model, device)
    run.step_model = torch.compile(run.train_model) if cfg.compile else run.train_model
