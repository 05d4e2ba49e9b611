"""The pre-training loop: ``pretrain()`` reads like the algorithm; each phase is a named function below it.

set up (``begin_run``: process group, device, resume point) -> read the data (``load_training_data``) ->
build the method and optimiser (``build_run``) -> fix the run's length (``_plan_length``) -> write the run
folder -> loop over steps (``OptimStep``, then ``_after_step``: log, kNN monitor, re-plan, checkpoint) ->
save the final weights (``_finish``). Each phase takes and returns named records: ``Run``, ``TrainingData``
and ``Trainable`` (``selfsup.training.setup``), ``Length`` and the loop's ``Progress`` (below).

Step ``s`` is the same step on every run (``selfsup.training.batches`` and ``selfsup.training.step``), so a resumed run replays exactly the
steps an uninterrupted one would have taken (bit-identical weights on CPU).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from selfsup import distributed as dist
from selfsup.data.image_checks import clean_error_message, final_report
from selfsup.errors import BadImageError, ConfigError, TrainingError
from selfsup.methods.collapse import CollapseMonitor
from selfsup.training import checkpoint as ckpt
from selfsup.training.batches import batch_stream
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import save_yaml, to_dict
from selfsup.training.monitors import MetricsLogger, measure_knn_cost, run_knn_monitor, truncate_metrics
from selfsup.training.resume import save_run_checkpoint, update_run_json, weights_meta, export_weights
from selfsup.training.setup import (
    CreatedFolder, Run, Trainable, TrainingData, begin_run, build_run, load_training_data, total_steps_for,
)
from selfsup.training.step import OptimStep, Schedule, warmup_steps_for
from selfsup.training.timed import TimePlan, boundaries, is_check_step, calibrate_steps, evaluations_after, median, replan
from selfsup.training.trackers import open_trackers
from selfsup.views.augment import save_view_grid
from selfsup.views.multicrop import save_multicrop_grid

__all__ = ["pretrain", "TrainingError", "export_weights"]

_clock = time.perf_counter  # every timing of the loop reads this, so tests can run timed runs on a fake clock


def pretrain(cfg: PretrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
             on_step: Callable[[int], None] | None = None) -> Path:
    """Pre-train ``cfg.method`` and write the run folder; returns the path of ``model.safetensors``.

    ``resume=True`` continues from the newest checkpoint in ``run_dir`` with the config saved there
    (the given one must agree on everything that shapes the run; a new ``steps`` or ``epochs`` re-plans the
    run to that length from the resume point). A fresh run that fails before it starts removes the folders
    it created.
    """
    t_begin = _clock()  # a timed run's budget starts here: loading the data and building the model count
    created = CreatedFolder(Path(run_dir), resume)
    try:
        return _pretrain(cfg, Path(run_dir), resume, progress, on_step, t_begin)
    except Exception:  # an interrupt (Ctrl-C), or a failure once the run started, keeps the folder for --resume
        created.remove_if_unfinished()
        raise


@dataclass(eq=False)
class Length:
    """The run's length: fixed by the config or the checkpoint, or (``--minutes``) by timing steps and re-planning."""

    start_step: int
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    plan: TimePlan | None = None
    replaying: bool = False  # a resumed timed run follows its recorded plan
    replan_every: int = 1
    length_change: dict | None = None  # a resume that gave a new length: the step and the length before
    knn_cost: float = 0.0  # a timed run's measured cost of one kNN-monitor evaluation, until one has run

    def schedule(self, cfg: PretrainConfig, base_lr: float) -> Schedule:
        return Schedule(cfg, base_lr, self.total_steps, self.warmup_steps, self.steps_per_epoch)


@dataclass(eq=False)
class Progress:
    """What the loop counts and keeps between steps: the step, bad steps, the last checkpoint, logs and clocks."""

    step: int
    bad_total: int
    last_ckpt: Path | None
    collapse: CollapseMonitor
    logger: MetricsLogger
    bar: Any = None
    bad_in_a_row: int = 0
    imgs_since: int = 0
    t_start: float = 0.0
    t_log: float = 0.0
    t_prev: float = 0.0
    step_times: list = field(default_factory=list)
    knn_seconds: list = field(default_factory=list)
    knn_data: Any = None


def _pretrain(cfg: PretrainConfig, run_dir: Path, resume: bool, progress: bool, on_step, t_begin: float) -> Path:
    run = begin_run(cfg, run_dir, resume)
    cfg, data = load_training_data(run)
    net = build_run(run, cfg, data)
    train_step = OptimStep(net.model, net.optimizer, cfg, data.views, run.device, run.precision, net.channels_last,
                           forward=net.step_model, no_sync=net.train_model.no_sync if dist.is_distributed() else None)
    length = _plan_length(run, cfg, data, net, train_step, t_begin)
    _write_run_folder(run, cfg, data, net, length)
    dist.barrier()
    prog = _open_outputs(run, cfg, length, progress)
    net.model.train()
    try:
        for batch in _batches(run, cfg, data, length):
            if prog.step >= length.total_steps:
                break
            loss, lr, logs = train_step(prog.step, batch, length.schedule(cfg, net.base_lr))
            prog.step += 1
            _after_step(run, cfg, data, net, length, prog, loss, logs, lr, on_step, t_begin)
        return _finish(run, cfg, data, net, length, prog, t_begin)
    except BadImageError as e:  # on_bad_image="error" and a file that passed the scan failed to decode
        where = f"the last checkpoint is {prog.last_ckpt}" if prog.last_ckpt else "no checkpoint was written yet"
        raise TrainingError(f"{clean_error_message(e)} (during step {prog.step + 1}); {where}, resume with --resume "
                            "once the file is fixed or removed") from None
    except BaseException as e:
        if dist.world_size() > 1:
            failure = dist.rank_failure(e, prog.step, prog.last_ckpt)
            if failure is not e:
                raise failure from e
        raise
    finally:
        if prog.bar is not None:
            prog.bar.close()
        prog.logger.close()


def _plan_length(run: Run, cfg: PretrainConfig, data: TrainingData, net: Trainable, train_step: OptimStep,
                 t_begin: float) -> Length:
    """Steps, warm-up and (for ``--minutes``) the time plan: from the config, the checkpoint, or by timing steps."""
    state, dataset = run.state, data.dataset
    n = len(dataset)
    start = 0 if state is None else int(state["step"])
    total = total_steps_for(cfg, n) if state is None else int(state["total_steps"])
    length = Length(start_step=start, total_steps=total, warmup_steps=0, steps_per_epoch=n // cfg.batch_size)
    if state is not None:
        _check_resumed_length(run, length, total_steps_for(cfg, n) if state.get("length_changed") else None)
    plan = None
    if cfg.minutes is not None and run.resume:
        plan = TimePlan.load(run.run_dir)  # a resumed timed run follows the recorded plan, never re-plans
        length.replaying = plan is not None
    if length.total_steps is None and plan is not None:
        length.total_steps = plan.total_steps
    elif length.total_steps is None:
        if cfg.knn_monitor and dataset.labels is not None:
            length.knn_cost = measure_knn_cost(net.model, dataset, run.device, data.image_size, run.precision, _clock)
        length.total_steps = calibrate_steps(cfg, net.model, net.optimizer, train_step, dataset, run.device, n,
                                             run.run_dir, run.main, _clock, t_start=t_begin, knn_cost=length.knn_cost)
    length.warmup_steps = warmup_steps_for(cfg, length.total_steps, length.steps_per_epoch)
    if cfg.minutes is not None and plan is None:
        plan = TimePlan(cfg.minutes * 60.0, length.total_steps, warmup_steps=length.warmup_steps)
        if run.main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            plan.save(run.run_dir)
    if plan is not None:
        length.total_steps, length.warmup_steps = plan.state_at(length.start_step)
    length.plan = plan
    length.replan_every = boundaries(length.total_steps, cfg.checkpoint_every)
    return length


def _check_resumed_length(run: Run, length: Length, wanted: int | None) -> None:
    """A resumed run with a new length is re-planned to it from the resume point; a finished one needs one.

    The learning-rate and EMA schedules then follow the new length from the resume point on (the steps
    already taken stay as they were); run.json records the step and the length it was extended from.
    """
    recorded, step = length.total_steps, length.start_step
    if wanted is None or wanted == recorded:
        if step >= recorded and _finished(run.run_dir, step):  # else stopped in its final save: finish it
            raise ConfigError(f"--resume {run.run_dir}: the run already finished ({step} of {recorded} steps); to "
                              f"train it longer give a new length, e.g. --steps {2 * recorded}")
        return
    if wanted <= step:
        raise ConfigError(f"--resume {run.run_dir}: the run is at step {step}, so a length of {wanted} steps ends "
                          f"before it; give a length beyond step {step}")
    length.total_steps = wanted
    length.length_change = {"from_step": step, "total_steps_before": recorded}
    if run.main:
        print(f"[selfsup] --resume {run.run_dir}: length {recorded} -> {wanted} steps; the schedules are re-planned "
              f"to {wanted} steps from step {step}", file=sys.stderr)


def _finished(run_dir: Path, step: int) -> bool:
    """True if the run wrote its final weights and summary at ``step`` (not stopped part-way through its final save)."""
    summary = run_dir / "train_summary.json"
    try:
        done = json.loads(summary.read_text()).get("steps") == step if summary.is_file() else False
    except ValueError:
        done = False
    return done and (run_dir / "model.safetensors").is_file()


def _write_run_folder(run: Run, cfg: PretrainConfig, data: TrainingData, net: Trainable, length: Length) -> None:
    """Rank 0 writes config.yaml, run.json, init.json and views.png before the first step."""
    if not run.main:
        return
    run_dir, dataset, model = run.run_dir, data.dataset, net.model
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.cleanup_temporary(run_dir)
    save_yaml(cfg, run_dir / "config.yaml")
    if run.resume:
        truncate_metrics(run_dir / "metrics.jsonl", length.start_step)
    else:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    world = dist.world_size()
    (run_dir / "run.json").write_text(json.dumps({
        "total_steps": length.total_steps, "steps_per_epoch": length.steps_per_epoch,
        "warmup_steps": length.warmup_steps, "base_lr": net.base_lr, "precision": run.precision,
        "device": str(run.device), "world_size": world, "sync_bn": bool(cfg.sync_bn and world > 1),
        "image_size": data.image_size, "num_images": len(dataset), "in_channels": dataset.num_channels,
        "dataset_mean": list(dataset.mean), "dataset_std": list(dataset.std), **_length_changes(run, length),
    }, indent=1))
    if getattr(model, "init_record", None) is not None:  # what --init loaded (file, sha256, prefix removed, classifier dropped)
        (run_dir / "init.json").write_text(json.dumps(model.init_record, indent=1))
    try:
        sample = dataset.images[:8] if hasattr(dataset, "images") else torch.stack([dataset[i][0] for i in range(8)])
        if data.views.num_local:  # the global views and the local crops of each image
            save_multicrop_grid(sample, data.views, run_dir / "views.png", n_images=8, seed=cfg.seed)
        else:
            save_view_grid(sample, [data.views.global1, data.views.global2], run_dir / "views.png", n_images=8,
                           n_views=6, seed=cfg.seed)
    except Exception as e:  # a picture must never cost a run
        warnings.warn(f"could not write views.png: {e}")


def _length_changes(run: Run, length: Length) -> dict:
    """``length_changes``: each resume that changed the run's length (kept from run.json across resumes)."""
    path = run.run_dir / "run.json"
    before = json.loads(path.read_text()).get("length_changes", []) if run.resume and path.is_file() else []
    now = [length.length_change] if length.length_change is not None else []
    return {"length_changes": before + now} if before or now else {}


# ------------------------------------------------------------------------------------------------
# The loop


def _open_outputs(run: Run, cfg: PretrainConfig, length: Length, progress: bool) -> Progress:
    """The metric log and trackers (rank 0), the progress bar, and the clocks and monitors of the loop."""
    trackers = open_trackers(cfg.logger, run.run_dir, to_dict(cfg), run.resume, length.start_step) if run.main else []
    dim = cfg.spec.collapse_dim(cfg.section)
    checkpoints = ckpt.list_checkpoints(run.run_dir)
    prog = Progress(step=length.start_step, bad_total=(run.state or {}).get("bad_steps", 0),
                    last_ckpt=checkpoints[-1] if checkpoints else None,
                    collapse=CollapseMonitor.for_dim(dim or 1, cfg.collapse_threshold if dim else 0.0,
                                                     after_step=length.warmup_steps, hint=cfg.spec.collapse_hint),
                    logger=MetricsLogger(run.run_dir, run.main, trackers))
    if run.main and progress:
        prog.bar = tqdm(total=length.total_steps, initial=length.start_step, desc=f"{cfg.method} pre-training",
                        unit="step", dynamic_ncols=True, file=sys.stderr)
    prog.t_log = prog.t_start = prog.t_prev = _clock()
    return prog


def _batches(run: Run, cfg: PretrainConfig, data: TrainingData, length: Length):
    """Batches from ``start_step`` on; a timed run may re-plan its length, so its stream is open-ended."""
    stream_end = length.total_steps if length.plan is None else 1 << 62
    return batch_stream(data.dataset, cfg.batch_size, cfg.seed, length.start_step, stream_end, cfg.num_workers,
                        run.device, cfg.spec.needs_labels)


def _after_step(run: Run, cfg: PretrainConfig, data: TrainingData, net: Trainable, length: Length, prog: Progress,
                loss: float, logs: dict[str, float], lr: float, on_step, t_begin: float) -> None:
    """Everything after an optimiser step: count bad steps, log, kNN monitor, re-plan, checkpoint."""
    step = prog.step
    _count_bad_steps(cfg, prog, loss)
    if run.main:
        prog.collapse.check(step, logs.get("collapse_std"))
    prog.imgs_since += cfg.batch_size
    now = _clock()  # one read per step: the step's duration and the log's time
    prog.step_times.append(now - prog.t_prev)
    prog.t_prev = now
    if step % cfg.log_every == 0 or step == length.total_steps:
        _log_step(run, length, prog, loss, logs, lr, now)
    if prog.bar is not None:
        prog.bar.update(1)
    if on_step is not None:
        on_step(step)
    if cfg.knn_monitor and data.dataset.labels is not None and (step % length.steps_per_epoch == 0
                                                                 or step == length.total_steps):
        t_knn = _clock()
        prog.knn_data = run_knn_monitor(cfg, net.model, data.dataset, run.device, data.image_size, run.precision,
                                        step, prog.logger, prog.knn_data)
        prog.knn_seconds.append(_clock() - t_knn)
    replanned = length.plan is not None and step < length.total_steps and _replan(run, cfg, data, length, prog, now,
                                                                                  t_begin)
    if (step % cfg.checkpoint_every == 0 or (replanned and not length.replaying)) and step < length.total_steps:
        prog.last_ckpt = save_run_checkpoint(run.run_dir, net.model, net.optimizer, cfg, step, length.total_steps,
                                             prog.bad_total, run.main)


def _count_bad_steps(cfg: PretrainConfig, prog: Progress, loss: float) -> None:
    """A skipped (non-finite) step warns; ``max_bad_steps`` of them in a row end the run."""
    if math.isfinite(loss):
        prog.bad_in_a_row = 0
        return
    prog.bad_in_a_row += 1
    prog.bad_total += 1
    if prog.bad_in_a_row >= cfg.max_bad_steps:
        where = f"the last good checkpoint is {prog.last_ckpt}" if prog.last_ckpt else "no checkpoint was written yet"
        raise TrainingError(f"the loss was not finite for {prog.bad_in_a_row} steps in a row (last at step {prog.step}); "
                            f"{where}. Lower the learning rate (--set optim.lr=...) or use --set precision=fp32, "
                            "then resume.")
    warnings.warn(f"non-finite loss at step {prog.step}; the step was skipped ({prog.bad_total} so far)")


def _log_step(run: Run, length: Length, prog: Progress, loss: float, logs: dict[str, float], lr: float,
              now: float) -> None:
    """The global batch's loss (averaged over ranks, not rank 0's share), logged by rank 0."""
    loss, logs = dist.mean_over_ranks(loss, logs, run.device)
    if not run.main:
        return
    ips = prog.imgs_since / max(now - prog.t_log, 1e-9)
    prog.t_log, prog.imgs_since = now, 0
    prog.logger.log({"step": prog.step, "epoch": prog.step / length.steps_per_epoch, "loss": loss, "lr": lr,
                     "images_per_sec": ips, "elapsed_sec": now - prog.t_start, **logs})
    if prog.bar is not None:
        prog.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}")


def _replan(run: Run, cfg: PretrainConfig, data: TrainingData, length: Length, prog: Progress, now: float,
            t_begin: float) -> bool:
    """A timed run: follow the recorded plan (resumed), or re-plan from the measured pace; True if the length changed."""
    step, plan = prog.step, length.plan
    new_total = None
    if length.replaying:
        new_total, new_warmup = plan.state_at(step)
        new_total = None if (new_total, new_warmup) == (length.total_steps, length.warmup_steps) else new_total
    elif is_check_step(step, length.total_steps, length.replan_every) and prog.step_times:
        pace = median(prog.step_times)
        reserve = cfg.minutes_reserve_steps * pace  # work after the run, inside the same budget
        extra = reserve
        if cfg.knn_monitor and data.dataset.labels is not None:  # measured once one evaluation has run
            cost = sum(prog.knn_seconds) / len(prog.knn_seconds) if prog.knn_seconds else length.knn_cost
            extra = lambda total: cost * evaluations_after(step, total, length.steps_per_epoch) + reserve  # noqa: E731
        new_total = replan(plan, step, now - t_begin, pace, extra, total_steps=length.total_steps)
        if dist.is_distributed():  # every rank takes rank 0's decision
            new_total = dist.broadcast_int(-1 if new_total is None else new_total, run.device)
            new_total = None if new_total < 0 else new_total
        prog.step_times = []
        if new_total is not None:
            new_warmup = min(length.warmup_steps, new_total // 2) if step < length.warmup_steps else length.warmup_steps
            plan.record(step, new_total, new_warmup, pace)
            if run.main:
                plan.save(run.run_dir)
                update_run_json(run.run_dir, total_steps=new_total, warmup_steps=new_warmup)
                print(f"[selfsup] --minutes {cfg.minutes}: {pace * 1000:.0f} ms/step since the last check; "
                      f"{length.total_steps} -> {new_total} steps", file=sys.stderr)
    if new_total is None:
        return False
    length.total_steps, length.warmup_steps = new_total, new_warmup
    if prog.bar is not None:
        prog.bar.total = length.total_steps
        prog.bar.refresh()
    return True


def _finish(run: Run, cfg: PretrainConfig, data: TrainingData, net: Trainable, length: Length, prog: Progress,
            t_begin: float) -> Path:
    """The last checkpoint, the final weights and train_summary.json; leave the process group if this call joined it."""
    run_dir, dataset = run.run_dir, data.dataset
    save_run_checkpoint(run_dir, net.model, net.optimizer, cfg, prog.step, length.total_steps, prog.bad_total, run.main)
    final = run_dir / "model.safetensors"
    if run.main:
        ckpt.save_weights(export_weights(net.model), final, metadata=weights_meta(cfg, data.image_size, dataset))
        image_report = final_report(dataset)
        if image_report is not None and image_report.skipped:
            print(f"[selfsup] {image_report.skipped} bad images skipped: {image_report.summary()}", file=sys.stderr)
        (run_dir / "train_summary.json").write_text(json.dumps({
            "steps": prog.step, "bad_steps": prog.bad_total, "train_seconds_this_session": _clock() - prog.t_start,
            "budget_seconds_used": None if length.plan is None or length.replaying else _clock() - t_begin,
            "bad_images": None if image_report is None else image_report.to_dict(),
            "collapse_warning_step": prog.collapse.warned_at,
        }, indent=1))
    dist.barrier()
    if run.owns_group:
        dist.destroy()
    return final
