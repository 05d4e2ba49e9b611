"""The supervised loop shared by fine-tuning and distillation: one plain function, no trainer class.

As in pre-training (``selfsup.training.loop``), randomness is a pure function of ``(seed, step)`` (data order
from per-epoch seeded permutations, augmentation from a per-step seeded generator), checkpoints are
written with ``selfsup.training.checkpoint`` and resuming replays exactly the steps an uninterrupted run takes.
Only the trainable model is wrapped in DDP under torchrun; anything else a step uses (a teacher) is not.
"""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from selfsup import distributed as dist
from selfsup.errors import CheckpointError, ConfigError, TrainingError
from selfsup.evaluation.frozen import iterate_batches, topk_accuracy
from selfsup.evaluation.preprocess import prepare_images
from selfsup.training import checkpoint as ckpt
from selfsup.errors import check_choice, check_field
from selfsup.training.config_io import from_dict, save_yaml, to_dict
from selfsup.training.monitors import MetricsLogger, truncate_metrics
from selfsup.training.optim import optimizer_from_groups, split_decay_groups
from selfsup.training.schedules import warmup_cosine
from selfsup.training.batches import StepBatchSampler, step_indices
from selfsup.training.devices import autocast_context, resolve_device, resolve_precision


# ------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset, device: torch.device, image_size: int, batch_size: int = 512,
                        precision: str = "fp32") -> dict[str, float]:
    """Top-1/top-5 (%) on every image of ``dataset`` (centre, no augmentation), model in eval mode."""
    was_training = model.training
    model.eval()
    scores, labels = [], []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    try:
        for images, y in iterate_batches(dataset, batch_size):
            x = prepare_images(images.to(device), dataset.mean, dataset.std, image_size)
            with autocast:
                scores.append(model(x).float().cpu())
            labels.append(torch.as_tensor(y).long())
    finally:
        model.train(was_training)
    out = topk_accuracy(torch.cat(scores), torch.cat(labels))
    out["num_test"] = sum(len(y) for y in labels)
    return out


# ------------------------------------------------------------------------------------------------
# Data streams (randomness is a pure function of (seed, step), as in pre-training)


def effective_batch(batch_size: int, n: int, world: int) -> int:
    """``batch_size`` capped at the number of images, rounded down to a multiple of the world size."""
    b = min(batch_size, n)
    b -= b % world
    if b < world:
        raise ConfigError(f"batch_size: {n} image(s) cannot be split over {world} processes; use more labels")
    return b


def labeled_stream(dataset, indices: torch.Tensor | None, batch: int, seed: int, start: int, total: int,
                   device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) of this rank's share of each step's batch, over ``indices`` (None: all)."""
    r, w = dist.rank(), dist.world_size()
    pool = torch.arange(len(dataset)) if indices is None else indices
    n = len(pool)
    if hasattr(dataset, "images"):
        labels = dataset.labels if dataset.labels is not None else torch.full((len(dataset),), -1)
        for step in range(start, total):
            idx = pool[step_indices(n, batch, seed, step, r, w)]
            yield dataset.images[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
        return
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, pool.tolist()), batch_sampler=StepBatchSampler(n, batch, seed, start, total, r, w),
                        num_workers=2, pin_memory=device.type == "cuda")
    for images, labels in loader:
        yield images.to(device, non_blocking=True), torch.as_tensor(labels).to(device, non_blocking=True)


# ------------------------------------------------------------------------------------------------
# The supervised loop, shared by fine-tuning and distillation


@dataclass
class LoopSettings:
    """The settings every labelled run shares (fine-tuning, distillation): precision, seed, device, bookkeeping."""

    precision: str = "auto"
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    eval_batch_size: int = 512
    max_bad_steps: int = 5


def check_loop_settings(cfg) -> None:
    """The checks every labelled run's config shares (fine-tuning, distillation): length, batch, bookkeeping,
    device, and its optimiser and view configs."""
    check_field("optim.warmup_epochs", getattr(cfg, "optim", None) is None or cfg.optim.warmup_epochs is None,
                "is a pre-training key; fine-tuning and distillation take optim.warmup_fraction")
    check_field("batch_size", cfg.batch_size >= 1, "must be >= 1")
    check_field("steps", cfg.steps is None or cfg.steps >= 1, "must be >= 1")
    check_field("epochs", cfg.epochs is None or (cfg.epochs > 0 and math.isfinite(cfg.epochs)), "must be > 0")
    check_field("epochs", cfg.epochs is None or cfg.steps is None, "give at most one of epochs, steps")
    check_choice("precision", cfg.precision, ("auto", "bf16", "fp32"))
    for key in ("checkpoint_every", "keep_last", "log_every", "eval_batch_size", "max_bad_steps"):
        check_field(key, getattr(cfg, key) >= 1, "must be >= 1")
    if not (cfg.device in ("auto", "cpu", "cuda", "mps") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: unknown device {cfg.device!r}; use auto, cpu, cuda, cuda:N or mps")
    if cfg.optim is not None:
        cfg.optim.validate()
    if cfg.view is not None:
        try:
            cfg.view.validate()
        except ValueError as e:
            raise ConfigError(f"view: {e}") from None


@dataclass
class LoopSpec:
    """What the supervised loop needs besides the model: length, lr schedule, and one step's loss."""

    kind: str  # "finetune" or "distill"
    total_steps: int
    base_lr: float
    warmup_steps: int
    final_lr: float
    step_loss: Callable[[int, nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
    batches: Callable[[int, int], Iterator[Any]]  # (start, total) -> one item per step
    images_per_step: int


def run_supervised(cfg, spec: LoopSpec, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path,
                   device: torch.device, precision: str, start_step: int, progress: bool,
                   bad_total: int = 0) -> int:
    """Train ``model`` for steps ``start_step .. total_steps - 1``; checkpoints, metrics.jsonl, final weights.

    Returns the number of skipped (non-finite) steps. ``model`` is the bare module; it is wrapped in
    DDP here when running under torchrun. Everything else (teachers) stays outside.
    """
    main = dist.is_main_process()
    train_model = dist.wrap_ddp(model, device)
    logger = MetricsLogger(run_dir, main)
    bar = None
    if main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=spec.total_steps, initial=start_step, desc=spec.kind, unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    model.train()
    bad_in_a_row = 0
    t_log, steps_since = time.perf_counter(), 0
    step = start_step
    try:
        for batch in spec.batches(start_step, spec.total_steps):
            lr = warmup_cosine(step, spec.total_steps, spec.warmup_steps, spec.base_lr, spec.final_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            with autocast_context(device, precision):
                loss, logs = spec.step_loss(step, train_model, batch)
            step += 1
            if not dist.all_ranks_true(bool(torch.isfinite(loss.detach())), device):  # every rank skips together
                optimizer.zero_grad(set_to_none=True)
                bad_in_a_row += 1
                bad_total += 1
                warnings.warn(f"non-finite loss at step {step}; the step was skipped")
                if bad_in_a_row >= cfg.max_bad_steps:
                    last = ckpt.list_checkpoints(run_dir)
                    where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
                    raise TrainingError(f"the loss was not finite for {bad_in_a_row} steps in a row (last at step {step}); "
                                        f"{where}. Lower the learning rate (--set optim.lr=...), then resume.")
            else:
                bad_in_a_row = 0
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            steps_since += 1
            if main and (step % cfg.log_every == 0 or step == spec.total_steps):
                now = time.perf_counter()
                ips = spec.images_per_step * steps_since / max(now - t_log, 1e-9)
                t_log, steps_since = now, 0
                logger.log({"step": step, "loss": float(loss.detach()), "lr": lr, "images_per_sec": ips,
                            **{k: float(v) for k, v in logs.items()}})
                if bar is not None:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{lr:.3g}")
            if bar is not None:
                bar.update(1)
            if step % cfg.checkpoint_every == 0 and step < spec.total_steps:
                save_state(cfg, spec, run_dir, model, optimizer, step, bad_total)
        save_state(cfg, spec, run_dir, model, optimizer, step, bad_total)
        if main:
            ckpt.save_weights(model.state_dict(), run_dir / "model.safetensors",
                              metadata={"kind": spec.kind, "config": json.dumps(to_dict(cfg))})
        dist.barrier()
        return bad_total
    finally:
        if bar is not None:
            bar.close()
        logger.close()


RESULTS_FILE = "results.json"


def train_and_evaluate(cfg, spec: LoopSpec, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path,
                       device: torch.device, precision: str, state: dict | None, progress: bool, run_info: dict,
                       test, image_size: int, result_info: dict) -> dict:
    """A fine-tuning or distillation run from its run folder to ``results.json``.

    Writes ``config.yaml`` and ``run.json`` (``{"kind": spec.kind, **run_info}``), starts or truncates
    ``metrics.jsonl``, trains with ``run_supervised`` from ``state`` (a resumed checkpoint, or None),
    then scores ``model`` on ``test`` and writes the result (``top1``, ``top5``, the run's facts and
    ``result_info``) to ``RUN_DIR/results.json``. Returns it (top1/top5 None on other ranks).
    """
    main = dist.is_main_process()
    start = int(state["step"]) if state else 0
    if main:
        save_yaml(cfg, run_dir / "config.yaml")
        (run_dir / "run.json").write_text(json.dumps({"kind": spec.kind, **run_info}, indent=1))
        if state is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            truncate_metrics(run_dir / "metrics.jsonl", start)
    t0 = time.perf_counter()
    bad = run_supervised(cfg, spec, model, optimizer, run_dir, device, precision, start, progress,
                         int(state.get("bad_steps", 0)) if state else 0)
    result = {"top1": None, "top5": None}
    if main:
        ev = evaluate_classifier(model, test, device, image_size, cfg.eval_batch_size, precision)
        result = {"top1": ev["top1"], "top5": ev["top5"], "dataset": run_info["dataset"], "split": "test",
                  "num_test": ev["num_test"], **result_info, "steps": spec.total_steps, "skipped_steps": bad,
                  "train_seconds_this_session": round(time.perf_counter() - t0, 1), "run": str(run_dir)}
        (run_dir / RESULTS_FILE).write_text(json.dumps(result, indent=1))
    dist.barrier()
    return result


def save_state(cfg, spec: LoopSpec, run_dir: Path, model: nn.Module, optimizer, step: int, bad_total: int) -> None:
    if not dist.is_main_process():
        return
    state = {"optimizer": optimizer.state_dict(), "step": step, "total_steps": spec.total_steps, "bad_steps": bad_total}
    ckpt.save_checkpoint(run_dir, step, model.state_dict(), state, {"config": to_dict(cfg), "kind": spec.kind},
                         keep_last=cfg.keep_last)


def resume_state(cls, cfg, run_dir: Path, kind: str, free: set[str]):
    """(saved config, weights, state) of the newest checkpoint; ``cfg`` must agree outside ``free`` keys."""
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"--resume {run_dir}: no checkpoint found in {run_dir / ckpt.CHECKPOINT_DIR}; "
                                   "start the run without --resume")
    weights, state, meta = ckpt.load_checkpoint(found[-1])
    if meta.get("kind") != kind:
        raise CheckpointError(f"--resume {run_dir}: this is a {meta.get('kind')} run, not a {kind} run")
    saved = from_dict(cls, meta["config"])
    given, kept = to_dict(cfg), to_dict(saved)
    diff = [k for k in kept if k not in free and given.get(k) != kept.get(k) and given.get(k) is not None]
    if diff:
        raise ConfigError(f"--resume {run_dir}: the command line differs from the interrupted run in {', '.join(diff)}; "
                          f"resume with the run's own settings (saved in {run_dir / 'config.yaml'})")
    for k in free:
        setattr(saved, k, getattr(cfg, k))
    return saved, weights, state


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    if not resume and ckpt.list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds a run with checkpoints; add --resume {run_dir} to continue it, "
                          "or choose a new --out folder")
    if dist.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.cleanup_temporary(run_dir)


def setup_device(name: str, precision: str) -> tuple[torch.device, str, bool]:
    """(device, resolved precision, whether this call created the process group and so must destroy it)."""
    owns_group = dist.init_from_env()  # under torchrun: join the process group (a no-op otherwise)
    device = resolve_device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, resolve_precision(precision, device), owns_group


def length_in_steps(epochs: float | None, steps: int | None, default_epochs: float, n: int, batch: int) -> int:
    if steps is not None:
        return steps
    return max(1, int(round((epochs if epochs is not None else default_epochs) * (n // batch))))


def classifier_optimizer(optim_cfg, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """``build_optimizer`` for a :class:`~selfsup.protocols.finetune.Classifier`, except that the linear classifier
    ``fc`` gets neither weight decay nor LARS's trust ratio (plain momentum SGD at ``lr``), as the
    released SimCLR code treats its supervised head. A zero-initialised layer would otherwise move by
    ``lr x eta x |w|``, i.e. hardly at all, under LARS."""
    fc = list(model.fc.parameters())
    ids = {id(p) for p in fc}
    body = [g for g in split_decay_groups(model)]
    for g in body:
        g["params"] = [p for p in g["params"] if id(p) not in ids]
    groups = body + [{"params": [p for p in fc if p.requires_grad], "weight_decay": 0.0, "lars_exclude": True}]
    try:
        return optimizer_from_groups(optim_cfg.name, groups, lr, optim_cfg.weight_decay, optim_cfg.momentum)
    except ValueError as e:
        raise ConfigError(f"optim.name: {e}") from None


def begin_labelled_run(cfg, run_dir, resume: bool, kind: str, free_keys: set[str]):
    """Validate ``cfg``, pick device and precision, resume (the saved config wins), prepare the run folder.

    Returns ``(cfg, run_dir, device, precision, owns_group, weights, state)``; weights and state are None
    for a fresh run.
    """
    run_dir = Path(run_dir)
    cfg.validate()
    device, precision, owns_group = setup_device(cfg.device, cfg.precision)
    weights = state = None
    if resume:
        cfg, weights, state = resume_state(type(cfg), cfg, run_dir, kind, free_keys)
    prepare_run_dir(run_dir, resume)
    return cfg, run_dir, device, precision, owns_group, weights, state
