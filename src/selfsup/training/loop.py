"""The pre-training loop: one plain function, no trainer class.

Randomness is a pure function of ``(seed, step)``: the data order of every epoch comes from a
generator seeded with ``(seed, epoch)`` and each step's augmentation from one seeded with
``(seed, step, rank)``. Resuming from a checkpoint therefore replays exactly the steps an
uninterrupted run would have taken (bit-identical weights on CPU).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from selfsup.training import checkpoint as ckpt
from selfsup import distributed as dist
from selfsup.methods import recipes
from selfsup.views.augment import BatchAugment, ViewConfig
from selfsup.models.backbones import build_backbone, saved_stem
from selfsup.models.resnet import SMALL_IMAGE_MAX
from selfsup.methods.collapse import CollapseMonitor
from selfsup.training.config import PretrainConfig, save_yaml, to_dict
from selfsup.errors import ConfigError
from selfsup.data.datasets import load_dataset
from selfsup.training.guards import channels_last_hazard
from selfsup.data.image_checks import clean_error_message, final_report
from selfsup.errors import BadImageError
from selfsup.training.init_weights import load_init
from selfsup.methods import LABELLED_METHODS, METHODS
from selfsup.training.optim import build_optimizer
from selfsup.training.schedules import ema_tau, scaled_lr, warmup_cosine
from selfsup.training.trackers import check_trackers, open_trackers
from selfsup.training.timed import TimePlan, boundaries, evaluations_after, median, replan
from selfsup.errors import TrainingError  # noqa: F401 (re-exported: defined here before)


_clock = time.perf_counter  # every timing of the loop reads this, so tests can run timed runs on a fake clock


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


def _mix(*xs: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix-style), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h ^= (x + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch, 1)))


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
                        persistent_workers=False, prefetch_factor=4 if num_workers else None)
    for images, labels in loader:
        batch = images.to(device, non_blocking=True)
        yield (batch, torch.as_tensor(labels).long().to(device, non_blocking=True)) if with_labels else batch


# ------------------------------------------------------------------------------------------------
# Building the model


def resolve_views(cfg: PretrainConfig, image_size: int) -> tuple[ViewConfig, ViewConfig]:
    """The configured view distributions, or the method's preset for this image size."""
    from selfsup.methods import VIEW_PRESETS

    preset = VIEW_PRESETS.get(cfg.method, lambda size: (ViewConfig.simclr(size), ViewConfig.simclr(size)))
    p1, p2 = preset(image_size)
    v1 = cfg.view if cfg.view is not None else p1
    v2 = cfg.view2 if cfg.view2 is not None else (v1 if cfg.view is not None else p2)
    return v1, v2


def build_model(cfg: PretrainConfig, in_channels: int, image_size: int, num_classes: int | None = None,
                init: str | None = None) -> nn.Module:
    """The method around a fresh backbone; ``init`` (``--init``) loads the backbone's starting weights first,
    so a BYOL target starts as the same copy. ``model.init_record`` then says what was loaded. Labelled
    methods (``supervised``) also take ``num_classes``."""
    kw = {} if cfg.backbone_width is None else {"width": cfg.backbone_width}
    kw.update(saved_stem(cfg.backbone, cfg.small_stem, image_size))
    if cfg.zero_init_residual:
        kw["zero_init_residual"] = True
    backbone = build_backbone(cfg.backbone, in_channels=in_channels, image_size=image_size, **kw)
    record = load_init(backbone, init) if init is not None else None
    model = METHODS[cfg.method](cfg, backbone)
    model.init_record = record
    return model


def total_steps_for(cfg: PretrainConfig, n: int) -> int | None:
    steps_per_epoch = n // cfg.batch_size
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        return max(1, int(round(cfg.epochs * steps_per_epoch)))
    return None  # minutes: fixed after timing the first steps


def warmup_steps_for(cfg: PretrainConfig, total_steps: int, steps_per_epoch: int) -> int:
    """``optim.warmup_epochs`` (the papers' 10 epochs) if set, else ``warmup_fraction`` of the run.

    Warm-up in epochs is capped at half the run, so a short run still has a cosine phase.
    """
    if cfg.optim.warmup_epochs is not None:
        return min(int(round(cfg.optim.warmup_epochs * steps_per_epoch)), total_steps // 2)
    return int(round(cfg.optim.warmup_fraction * total_steps))


# ------------------------------------------------------------------------------------------------
# The loop


class _Logger:
    """metrics.jsonl + TensorBoard (if installed), written by rank 0 only.

    ``trackers`` (from ``selfsup.training.trackers.open_trackers``, ``--logger``) replace the built-in TensorBoard writer.
    """

    def __init__(self, run_dir: Path, enabled: bool, trackers: list | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.trackers = list(trackers or [])
        if enabled and trackers is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception:  # tensorboard is an optional extra
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk must not end the run here; the next checkpoint says so clearly
            if not getattr(self, "_warned", False):
                warnings.warn(f"could not append to {self.path} ({e.strerror or e}); metrics are not being logged")
                self._warned = True
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        for tracker in self.trackers:
            tracker.close()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop log lines written after the checkpoint we restart from."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", -1) <= last_step:
                keep.append(line)
        except ValueError:
            continue
    path.write_text("".join(k + "\n" for k in keep))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def pretrain(cfg: PretrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
             on_step: Callable[[int], None] | None = None) -> Path:
    """Pre-train ``cfg.method`` and write the run folder; returns the path of ``model.safetensors``.

    ``resume=True`` continues from the newest checkpoint in ``run_dir`` with the config saved there
    (the given one must agree on everything that shapes the run).
    """
    run_dir = Path(run_dir)
    cfg.validate()
    check_trackers(cfg.logger)  # a --logger whose package is missing fails here, before any work
    owns_group = dist.init_from_env(cfg.device)  # under torchrun: join the process group (docs/distributed.md)
    main = dist.is_main_process()
    if main:
        ckpt.check_writable(run_dir)  # a read-only, missing or full output folder fails here, before any work
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    precision = resolve_precision(cfg.precision, device)

    state: dict[str, Any] | None = None
    weights = None
    if resume and not ckpt.list_checkpoints(run_dir):
        # Killed before its first checkpoint: the run starts again from step 0 with the same seed and
        # (for --minutes) the recorded step plan, so it ends as an uninterrupted run would.
        if main:
            print(f"[selfsup] --resume {run_dir}: no checkpoint was written yet; starting from step 0", file=sys.stderr)
        _truncate_metrics(run_dir / "metrics.jsonl", 0)
    elif resume:
        cfg, weights, state = _load_resume(cfg, run_dir)
    elif (run_dir / "checkpoints").exists() and ckpt.list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds a run with checkpoints; add --resume {run_dir} to continue it, "
                          "or choose a new --out folder")

    if main:  # the first line of every run, and the lr warning, before any data is read
        print(recipes.describe(cfg), file=sys.stderr, flush=True)
        if (warning := recipes.lr_warning(cfg)) is not None:
            print(f"[selfsup] warning: {warning}", file=sys.stderr, flush=True)
    world = dist.world_size()
    if cfg.batch_size % (world * cfg.accumulate):
        raise ConfigError(f"batch_size: {cfg.batch_size} is not divisible by world size x accumulate "
                          f"({world} x {cfg.accumulate})")

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

    torch.manual_seed(cfg.seed)
    # --init applies to a fresh run only: a resumed run continues from its checkpoint's weights.
    init = cfg.init if weights is None else None
    num_classes = (dataset.num_classes,) if with_labels else ()  # only labelled methods take it
    init_kw = {"init": init} if init is not None else {}  # tests replace build_model with a 3-argument function
    model = build_model(cfg, dataset.num_channels, image_size, *num_classes, **init_kw).to(device)
    if weights is not None:
        _load_model_weights(model, weights, run_dir)
    if cfg.sync_bn and dist.world_size() > 1:  # global batch-norm statistics (SimCLR Sec. B.1)
        from selfsup.models.sync_batchnorm import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    channels_last = cfg.channels_last
    if channels_last and (hazard := channels_last_hazard(model, device)):
        warnings.warn(f"channels_last is off for this run: {hazard}")
        channels_last = False
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    aug1 = BatchAugment(view1, image_size, dataset.mean, dataset.std)
    aug2 = BatchAugment(view2, image_size, dataset.mean, dataset.std)

    base_lr = scaled_lr(cfg.optim.lr, cfg.batch_size, cfg.optim.lr_scaling)
    optimizer = build_optimizer(cfg.optim.name, model, base_lr, cfg.optim.weight_decay, cfg.optim.momentum)
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, TypeError) as e:
            raise ckpt.CheckpointError(f"--resume {run_dir}: the optimiser state in the checkpoint does not fit this "
                                       f"model and optimiser ({type(e).__name__}: {e})") from None
    if main:  # room for keep_last + 1 checkpoints and the final weights, checked before training
        ckpt.check_space_for_run(run_dir, model.state_dict(), cfg.keep_last, 2 if cfg.optim.name == "adamw" else 1)

    train_model = dist.wrap_ddp(model, device)
    step_fn_model = torch.compile(train_model) if cfg.compile else train_model
    total_steps = 1  # fixed below, before the first real step
    # A skipped step must leave no trace: batch-norm running statistics (updated by the forward pass)
    # are copied before each step and put back when the loss or the gradients are not finite.
    buffers = [b for b in model.buffers()]
    saved_buffers = [b.clone() for b in buffers]

    def skip_step() -> tuple[float, dict[str, float]]:
        optimizer.zero_grad(set_to_none=True)
        if buffers:
            torch._foreach_copy_(buffers, saved_buffers)
        return float("nan"), {}

    def train_step(step: int, images: torch.Tensor, lr: float) -> tuple[float, dict[str, float]]:
        images, labels = images if with_labels else (images, None)  # (images, labels) for LABELLED_METHODS
        for g in optimizer.param_groups:
            g["lr"] = lr
        gen = torch.Generator(device=device).manual_seed(_mix(cfg.seed, step, dist.rank(), 2))
        micro = images.chunk(cfg.accumulate)
        micro_labels = labels.chunk(cfg.accumulate) if with_labels else [None] * len(micro)
        total_loss, logs = 0.0, {}
        if buffers:
            torch._foreach_copy_(saved_buffers, buffers)
        for i, mb in enumerate(micro):
            x1, x2 = aug1(mb, gen), aug2(mb, gen)
            if channels_last:
                x1 = x1.contiguous(memory_format=torch.channels_last)
                x2 = x2.contiguous(memory_format=torch.channels_last)
            sync = i == len(micro) - 1 or not dist.is_distributed()
            # Under DDP, only the last micro-batch's backward all-reduces the summed gradients.
            with contextlib.nullcontext() if sync else train_model.no_sync():
                with autocast_context(device, precision):
                    loss, logs = step_fn_model(x1, x2) if not with_labels else step_fn_model(x1, x2, micro_labels[i])
                loss_value = loss.detach().float()
                # Every rank must skip together, or the others would wait for its gradients.
                if not dist.all_ranks_true(bool(torch.isfinite(loss_value)), device):
                    return skip_step()
                (loss / cfg.accumulate).backward()
            total_loss += loss_value.item() / cfg.accumulate
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):  # all-reduced: same on every rank
            return skip_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_target = getattr(unwrap(model), "update_target", None)
        if update_target is not None:  # BYOL's EMA target: an explicit call after every optimiser step
            # total_steps is None only while --minutes times throw-away steps (their state is restored).
            update_target(ema_tau(step, total_steps, cfg.base_tau) if total_steps else cfg.base_tau)
        return total_loss, {k: float(v) for k, v in logs.items()}

    # Length of the run.
    start_step = 0 if state is None else int(state["step"])
    total_steps = total_steps_for(cfg, n) if state is None else int(state["total_steps"])
    steps_per_epoch = n // cfg.batch_size
    plan, replaying, t_budget = None, False, _clock()
    if cfg.minutes is not None and resume:
        plan = TimePlan.load(run_dir)  # a resumed timed run follows the recorded plan, never re-plans
        replaying = plan is not None
    if total_steps is None and plan is not None:
        total_steps = plan.total_steps
    elif total_steps is None:
        total_steps, t_budget = _calibrate_steps(cfg, model, optimizer, train_step, dataset, device, n, run_dir, main)
    warmup_steps = warmup_steps_for(cfg, total_steps, steps_per_epoch)
    if cfg.minutes is not None and plan is None:
        plan = TimePlan(cfg.minutes * 60.0, total_steps, warmup_steps=warmup_steps)
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            plan.save(run_dir)
    if plan is not None:
        total_steps, warmup_steps = plan.state_at(start_step)
    replan_every = boundaries(total_steps, cfg.checkpoint_every)

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.cleanup_temporary(run_dir)
        save_yaml(cfg, run_dir / "config.yaml")
        if resume:
            _truncate_metrics(run_dir / "metrics.jsonl", start_step)
        else:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (run_dir / "run.json").write_text(json.dumps({
            "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup_steps,
            "base_lr": base_lr, "precision": precision, "device": str(device), "world_size": world,
            "sync_bn": bool(cfg.sync_bn and world > 1), "image_size": image_size, "num_images": n, "in_channels": dataset.num_channels,
            "dataset_mean": list(dataset.mean), "dataset_std": list(dataset.std),
        }, indent=1))
        if getattr(model, "init_record", None) is not None:  # what --init loaded (file, sha256, prefix removed, classifier dropped)
            (run_dir / "init.json").write_text(json.dumps(model.init_record, indent=1))
        try:
            from selfsup.views.augment import save_view_grid

            save_view_grid(dataset.images[:8] if hasattr(dataset, "images") else torch.stack([dataset[i][0] for i in range(8)]),
                           [aug1, aug2], run_dir / "views.png", n_images=8, n_views=6, seed=cfg.seed)
        except Exception as e:  # a picture must never cost a run
            warnings.warn(f"could not write views.png: {e}")
    dist.barrier()
    trackers = open_trackers(cfg.logger, run_dir, to_dict(cfg), resume, start_step) if main else []
    logger = _Logger(run_dir, main, trackers)
    bar = None
    if main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc=f"{cfg.method} pre-training", unit="step",
                   dynamic_ncols=True, file=sys.stderr)

    knn_data = None
    collapse = CollapseMonitor.for_dim(cfg.proj_out_dim, cfg.collapse_threshold, after_step=warmup_steps)
    bad_in_a_row, bad_total = 0, (state or {}).get("bad_steps", 0)
    last_ckpt = ckpt.list_checkpoints(run_dir)[-1] if ckpt.list_checkpoints(run_dir) else None
    model.train()
    imgs_since = 0
    t_log = t_start = t_prev = _clock()
    step_times: list[float] = []
    knn_seconds: list[float] = []
    step = start_step
    # A timed run may re-plan its length, so its stream is open-ended and the loop stops at total_steps.
    stream_end = total_steps if plan is None else 1 << 62
    try:
        for images in batch_stream(dataset, cfg.batch_size, cfg.seed, start_step, stream_end, cfg.num_workers, device,
                                   with_labels):
            if step >= total_steps:
                break
            lr = warmup_cosine(step, total_steps, warmup_steps, base_lr, base_lr * cfg.optim.final_lr_fraction)
            loss, logs = train_step(step, images, lr)
            step += 1
            if not math.isfinite(loss):
                bad_in_a_row += 1
                bad_total += 1
                if bad_in_a_row >= cfg.max_bad_steps:
                    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    raise TrainingError(f"the loss was not finite for {bad_in_a_row} steps in a row (last at step {step}); "
                                        f"{where}. Lower the learning rate (--set optim.lr=...) or use --set precision=fp32, "
                                        "then resume.")
                warnings.warn(f"non-finite loss at step {step}; the step was skipped ({bad_total} so far)")
            else:
                bad_in_a_row = 0
            if main:
                collapse.check(step, logs.get("collapse_std"))
            imgs_since += cfg.batch_size
            now = _clock()  # one read per step: the step's duration and the log's time
            step_times.append(now - t_prev)
            t_prev = now
            if step % cfg.log_every == 0 or step == total_steps:
                loss, logs = _mean_over_ranks(loss, logs, device)  # the global batch's loss, not rank 0's share
            if main and (step % cfg.log_every == 0 or step == total_steps):
                ips = imgs_since / max(now - t_log, 1e-9)
                t_log, imgs_since = now, 0
                record = {"step": step, "epoch": step / steps_per_epoch, "loss": loss, "lr": lr, "images_per_sec": ips,
                          "elapsed_sec": now - t_start, **logs}
                logger.log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(step)
            if cfg.knn_monitor and dataset.labels is not None and (step % steps_per_epoch == 0 or step == total_steps):
                t_knn = _clock()
                knn_data = _knn_monitor(cfg, model, dataset, device, image_size, precision, step, logger, knn_data)
                knn_seconds.append(_clock() - t_knn)
            replanned = False
            if plan is not None and step < total_steps:
                new_total = None
                if replaying:
                    new_total, new_warmup = plan.state_at(step)
                    new_total = None if (new_total, new_warmup) == (total_steps, warmup_steps) else new_total
                elif step % replan_every == 0 and step_times:
                    pace = median(step_times)
                    extra = 0.0
                    if cfg.knn_monitor and dataset.labels is not None:  # measured once one evaluation has run
                        cost = sum(knn_seconds) / len(knn_seconds) if knn_seconds else _knn_cost_estimate(cfg, pace)
                        extra = lambda total: cost * evaluations_after(step, total, steps_per_epoch)  # noqa: E731
                    new_total = replan(plan, step, now - t_budget, pace, extra, total_steps=total_steps)
                    if dist.is_distributed():  # every rank takes rank 0's decision
                        new_total = _broadcast_int(-1 if new_total is None else new_total, device)
                        new_total = None if new_total < 0 else new_total
                    step_times = []
                    if new_total is not None:
                        new_warmup = min(warmup_steps, new_total // 2) if step < warmup_steps else warmup_steps
                        plan.record(step, new_total, new_warmup, pace)
                        if main:
                            plan.save(run_dir)
                            _update_run_json(run_dir, total_steps=new_total, warmup_steps=new_warmup)
                            print(f"[selfsup] --minutes {cfg.minutes}: {pace * 1000:.0f} ms/step since the last check; "
                                  f"{total_steps} -> {new_total} steps", file=sys.stderr)
                if new_total is not None:
                    total_steps, warmup_steps, replanned = new_total, new_warmup, True
                    if bar is not None:
                        bar.total = total_steps
                        bar.refresh()
            if (step % cfg.checkpoint_every == 0 or (replanned and not replaying)) and step < total_steps:
                last_ckpt = _save(run_dir, model, optimizer, cfg, step, total_steps, bad_total, main)
        _save(run_dir, model, optimizer, cfg, step, total_steps, bad_total, main)
        final = run_dir / "model.safetensors"
        if main:
            ckpt.save_weights(export_weights(model), final, metadata=_weights_meta(cfg, image_size, dataset))
            image_report = final_report(dataset)
            if image_report is not None and image_report.skipped:
                print(f"[selfsup] {image_report.skipped} bad images skipped: {image_report.summary()}", file=sys.stderr)
            (run_dir / "train_summary.json").write_text(json.dumps({
                "steps": step, "bad_steps": bad_total, "train_seconds_this_session": _clock() - t_start,
                "budget_seconds_used": None if plan is None or replaying else _clock() - t_budget,
                "bad_images": None if image_report is None else image_report.to_dict(),
                "collapse_warning_step": collapse.warned_at,
            }, indent=1))
        dist.barrier()
        if owns_group:
            dist.destroy()
        return final
    except BadImageError as e:  # on_bad_image="error" and a file that passed the scan failed to decode
        where = f"the last checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        raise TrainingError(f"{clean_error_message(e)} (during step {step + 1}); {where}, resume with --resume "
                            "once the file is fixed or removed") from None
    except BaseException as e:
        if dist.world_size() > 1:
            failure = _rank_failure(e, step, last_ckpt)
            if failure is not e:
                raise failure from e
        raise
    finally:
        if bar is not None:
            bar.close()
        logger.close()


def _mean_over_ranks(loss: float, logs: dict[str, float], device: torch.device) -> tuple[float, dict[str, float]]:
    """Average the loss and logged scalars over ranks (each rank's loss is the mean over its share)."""
    if dist.world_size() == 1:
        return loss, logs
    keys = sorted(logs)
    values = dist.all_reduce_mean(torch.tensor([loss] + [logs[k] for k in keys], dtype=torch.float64, device=device))
    return float(values[0]), {k: float(v) for k, v in zip(keys, values[1:])}


# How gloo and NCCL word a collective that failed because a peer died or stopped answering.
_LOST_PEER = r"(?i)timed out|timeout|connection (closed|reset|refused)|pair closure|by peer|nccl|gloo"


def _rank_failure(e: BaseException, step: int, last_ckpt: Path | None) -> BaseException:
    """Name the rank in the error; a failed collective means another rank died or hung first."""
    who = f"rank {dist.rank()} of {dist.world_size()}"
    resume = f"continue with --resume {last_ckpt.parent.parent}" if last_ckpt else "no checkpoint was written yet"
    lost = isinstance(e, getattr(torch.distributed, "DistError", ())) or (
        isinstance(e, RuntimeError) and re.search(_LOST_PEER, str(e)) is not None)
    if lost:
        timeout = os.environ.get("SELFSUP_DIST_TIMEOUT", "600")
        return TrainingError(f"{who} lost contact with the other ranks after {step} completed steps: another rank crashed or "
                             f"stopped responding (collectives wait SELFSUP_DIST_TIMEOUT={timeout} s); if it crashed, its error is "
                             f"the root cause in torchrun's summary; {resume}. ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})")
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        return e
    print(f"[selfsup] {who} failed after {step} completed steps: {type(e).__name__}: {e}; torchrun stops the other ranks; "
          f"{resume}", file=sys.stderr, flush=True)
    return e


def _init_process_group() -> bool:
    """Join torchrun's process group (kept for callers of the old name; see ``dist.init_from_env``)."""
    return dist.init_from_env()


def export_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's state dict: names start with the part (``backbone.``, ``head.``, ...)."""
    return {k: v for k, v in unwrap(model).state_dict().items()}


def _weights_meta(cfg: PretrainConfig, image_size: int, dataset) -> dict[str, str]:
    return {"method": cfg.method, "backbone": cfg.backbone, "image_size": str(image_size),
            "in_channels": str(dataset.num_channels), "config": json.dumps(to_dict(cfg))}


def _save(run_dir, model, optimizer, cfg, step, total_steps, bad_total, main) -> Path | None:
    if not main:
        return None
    weights = export_weights(model)
    floats = {k: v for k, v in weights.items() if v.is_floating_point()}
    finite = torch.stack([torch.isfinite(v).all() for v in floats.values()]) if floats else torch.ones(1, dtype=torch.bool)
    if not bool(finite.all()):  # one sync; never let a broken state push a good checkpoint out of keep_last
        broken = [k for k, ok in zip(floats, finite.tolist()) if not ok]
        done = ckpt.list_checkpoints(run_dir)
        raise TrainingError(f"the model holds non-finite values at step {step} ({', '.join(broken[:3])}); it was not "
                            f"saved. The last good checkpoint is {done[-1] if done else 'none (none was written yet)'}")
    state = {"optimizer": optimizer.state_dict(), "step": step, "total_steps": total_steps, "bad_steps": bad_total,
             "torch_rng": torch.get_rng_state()}
    return ckpt.save_checkpoint(run_dir, step, weights, state, {"config": to_dict(cfg), "kind": "pretrain"},
                                keep_last=cfg.keep_last)


def _load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], run_dir: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        raise ckpt.CheckpointError(
            f"the checkpoint in {run_dir} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]}); was it written with another backbone or method?")
    model.load_state_dict(weights)


def _load_resume(cfg: PretrainConfig, run_dir: Path):
    from selfsup.training.config import from_dict

    ckpts = ckpt.list_checkpoints(run_dir)
    if not ckpts:
        raise ckpt.CheckpointError(f"--resume {run_dir}: no checkpoint found in {run_dir / 'checkpoints'}; "
                                   "start the run without --resume")
    weights, state, meta = ckpt.load_checkpoint(ckpts[-1])
    try:
        saved = from_dict(PretrainConfig, meta["config"])
        int(state["step"]), int(state["total_steps"]), state["optimizer"]
    except (KeyError, TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise ckpt.CheckpointError(f"--resume {run_dir}: checkpoint {ckpts[-1]} was written by an incompatible selfsup "
                                   f"({type(e).__name__}: {e}); resume it with the release that wrote it") from None
    # Everything but bookkeeping must match the interrupted run; the saved config wins.
    free = {"device", "num_workers", "log_every", "checkpoint_every", "keep_last", "data_dir", "knn_monitor",
            "epochs", "steps", "minutes", "on_bad_image", "logger", "recipe"}
    given, kept = to_dict(cfg), to_dict(saved)
    diff = [k for k in kept if k not in free and given.get(k) != kept.get(k)
            and not (k in ("view", "view2") and given.get(k) is None)]
    if diff:
        raise ConfigError(f"--resume {run_dir}: the command line differs from the interrupted run in "
                          f"{', '.join(diff)}; resume with the run's own settings (saved in {run_dir / 'config.yaml'})")
    for k in ("device", "num_workers", "log_every", "checkpoint_every", "keep_last", "data_dir", "on_bad_image", "logger"):
        setattr(saved, k, getattr(cfg, k))
    return saved, weights, state


def _calibrate_steps(cfg, model, optimizer, train_step, dataset, device, n, run_dir, main) -> int:
    """For ``--minutes``: time a few steps on a throw-away copy of the state, then fix the step count.

    The copy is restored afterwards, so a run with a time budget is still reproducible from its seed
    and its (recorded) step count.
    """
    import copy

    budget = cfg.minutes * 60.0
    t0 = _clock()
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    # The first steps pay for allocations and kernel set-up; the median of the timed ones is the
    # steady-state cost (a mean over the first steps overestimated it by ~10% on 2 CPU cores).
    warm, timed = 3, 6
    it = batch_stream(dataset, cfg.batch_size, cfg.seed + 7919, 0, warm + timed, cfg.num_workers, device,
                      cfg.method in LABELLED_METHODS)
    times, t_prev = [], _clock()
    for i, images in enumerate(it):  # each time includes fetching the batch
        train_step(i, images, 0.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = _clock()
        if i >= warm:
            times.append(now - t_prev)
        t_prev = now
    per_step = sorted(times)[len(times) // 2]
    model.load_state_dict(model_state)
    optimizer.load_state_dict(opt_state)
    steps_per_epoch = n // cfg.batch_size
    # Per-epoch extras (kNN monitor) cost time too: estimate them as a few steps' worth each.
    remaining = budget - (_clock() - t0)
    total = int(remaining / per_step)
    if cfg.knn_monitor and dataset.labels is not None:
        epochs = total / steps_per_epoch
        knn_cost = _knn_cost_estimate(cfg, per_step)
        total = int((remaining - knn_cost * max(1.0, math.ceil(epochs))) / per_step)
    total = max(1, total)
    if dist.is_distributed():
        t = torch.tensor([total], device=device if device.type == "cuda" else "cpu")
        import torch.distributed as tdist

        tdist.broadcast(t, 0)
        total = int(t.item())
    if main:
        print(f"[selfsup] --minutes {cfg.minutes}: {per_step * 1000:.0f} ms/step measured, training for {total} steps "
              f"({total / steps_per_epoch:.2f} epochs); re-planned if the pace drifts", file=sys.stderr)
    return total, t0


def _update_run_json(run_dir: Path, **values) -> None:
    path = run_dir / "run.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(values)
    path.write_text(json.dumps(info, indent=1))


def _broadcast_int(value: int, device: torch.device) -> int:
    import torch.distributed as tdist

    t = torch.tensor([value], device=device if device.type == "cuda" else "cpu")
    tdist.broadcast(t, 0)
    return int(t.item())


KNN_BANK, KNN_QUERIES = 10000, 2000


def _knn_cost_estimate(cfg, per_step: float) -> float:
    # Feature extraction of bank + queries, forward only (~1/3 of a training pass), two views per step image.
    images = KNN_BANK + KNN_QUERIES
    return per_step * images / (cfg.batch_size * 2) / 3 * 2


def _knn_monitor(cfg, model, dataset, device, image_size, precision, step, logger, cache):
    """kNN accuracy on a fixed subset (10k bank from the training set, 2k held-out queries).

    Under torchrun every rank embeds a shard of the bank and queries (``dist_eval``); rank 0 scores
    and logs. All ranks take part, so none waits in a collective while another evaluates.
    """
    from selfsup.evaluation.sharded import extract_features_sharded
    from selfsup.evaluation.frozen import knn_eval

    if cache is None:
        g = torch.Generator().manual_seed(_mix(cfg.seed, 3))
        perm = torch.randperm(len(dataset), generator=g)
        try:
            test = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, image_size=cfg.image_size,
                                on_bad_image=cfg.on_bad_image, image_column=cfg.hf.image_column,
                                label_column=cfg.hf.label_column)
            tperm = torch.randperm(len(test), generator=g)[:KNN_QUERIES]
            cache = (perm[:KNN_BANK], test, tperm)
        except Exception:
            cache = (perm[KNN_QUERIES:KNN_QUERIES + KNN_BANK], dataset, perm[:KNN_QUERIES])
    bank_idx, qset, q_idx = cache
    enc = unwrap(model).backbone
    bf, bl = extract_features_sharded(enc, dataset, device, image_size, indices=bank_idx, precision=precision)
    qf, ql = extract_features_sharded(enc, qset, device, image_size, indices=q_idx, precision=precision)
    if dist.is_main_process():
        res = knn_eval(bf, bl, qf, ql, dataset.num_classes, cfg.knn_k, cfg.knn_temperature)
        logger.log({"step": step, "knn_top1": res["top1"], "knn_top5": res["top5"]})
    model.train()
    return cache
