"""The pre-training loop: ``pretrain()`` reads like the algorithm; each phase is a named function below it.

set up (``_begin``: process group, device, resume point) -> read the data (``_load_data``) -> build the
method, augmentations and optimiser (``_build``) -> fix the run's length (``_plan_length``) -> write the
run folder -> loop over steps (``TrainStep`` then ``_after_step``: log, kNN monitor, re-plan, checkpoint)
-> save the final weights (``_finish``). What is shared between the phases lives in one ``RunState`` record.

Step ``s`` is the same step on every run (``selfsup.training.steps``), so a resumed run replays exactly the
steps an uninterrupted one would have taken (bit-identical weights on CPU).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from selfsup import distributed as dist
from selfsup.data.image_checks import clean_error_message, final_report
from selfsup.errors import BadImageError, ConfigError, TrainingError
from selfsup.methods.collapse import CollapseMonitor
from selfsup.training import checkpoint as ckpt
from selfsup.training.build import total_steps_for, warmup_steps_for
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import save_yaml, to_dict
from selfsup.training.knn_monitor import measure_knn_cost, run_knn_monitor
from selfsup.training.metrics import MetricsLogger, truncate_metrics
from selfsup.training.ranks import broadcast_int, mean_over_ranks, rank_failure
from selfsup.training.resume import save_run_checkpoint, update_run_json, weights_meta, export_weights
from selfsup.training.schedules import warmup_cosine
from selfsup.training.setup import CreatedFolder, RunState, begin_run, build_run, load_training_data
from selfsup.training.steps import TrainStep, batch_stream
from selfsup.training.timed import TimePlan, boundaries, is_check_step, calibrate_steps, evaluations_after, median, replan
from selfsup.training.trackers import open_trackers
from selfsup.views.augment import save_view_grid

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


def _pretrain(cfg: PretrainConfig, run_dir: Path, resume: bool, progress: bool, on_step, t_begin: float) -> Path:
    run = begin_run(cfg, run_dir, resume)
    run.t_budget = t_begin
    load_training_data(run)
    build_run(run)
    train_step = TrainStep(run)
    _plan_length(run, train_step)
    _write_run_folder(run)
    dist.barrier()
    _open_outputs(run, progress)
    try:
        for images in _batches(run):
            if run.step >= run.total_steps:
                break
            cfg = run.cfg
            lr = warmup_cosine(run.step, run.total_steps, run.warmup_steps, run.base_lr,
                               run.base_lr * cfg.optim.final_lr_fraction)
            loss, logs = train_step(run.step, images, lr)
            run.step += 1
            _after_step(run, loss, logs, lr, on_step)
        return _finish(run)
    except BadImageError as e:  # on_bad_image="error" and a file that passed the scan failed to decode
        where = f"the last checkpoint is {run.last_ckpt}" if run.last_ckpt else "no checkpoint was written yet"
        raise TrainingError(f"{clean_error_message(e)} (during step {run.step + 1}); {where}, resume with --resume "
                            "once the file is fixed or removed") from None
    except BaseException as e:
        if dist.world_size() > 1:
            failure = rank_failure(e, run.step, run.last_ckpt)
            if failure is not e:
                raise failure from e
        raise
    finally:
        if run.bar is not None:
            run.bar.close()
        run.logger.close()


def _plan_length(run: RunState, train_step: TrainStep) -> None:
    """Steps, warm-up and (for ``--minutes``) the time plan: from the config, the checkpoint, or by timing steps."""
    cfg, state = run.cfg, run.state
    n = len(run.dataset)
    run.start_step = run.step = 0 if state is None else int(state["step"])
    run.total_steps = total_steps_for(cfg, n) if state is None else int(state["total_steps"])
    run.steps_per_epoch = n // cfg.batch_size
    if state is not None:
        _check_resumed_length(run, total_steps_for(cfg, n) if state.get("length_changed") else None)
    plan = None
    if cfg.minutes is not None and run.resume:
        plan = TimePlan.load(run.run_dir)  # a resumed timed run follows the recorded plan, never re-plans
        run.replaying = plan is not None
    if run.total_steps is None and plan is not None:
        run.total_steps = plan.total_steps
    elif run.total_steps is None:
        if cfg.knn_monitor and run.dataset.labels is not None:
            run.knn_cost = measure_knn_cost(run.model, run.dataset, run.device, run.image_size, run.precision, _clock)
        run.total_steps = calibrate_steps(cfg, run.model, run.optimizer, train_step, run.dataset, run.device, n,
                                          run.run_dir, run.main, _clock, t_start=run.t_budget, knn_cost=run.knn_cost)
    run.warmup_steps = warmup_steps_for(cfg, run.total_steps, run.steps_per_epoch)
    if cfg.minutes is not None and plan is None:
        plan = TimePlan(cfg.minutes * 60.0, run.total_steps, warmup_steps=run.warmup_steps)
        if run.main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            plan.save(run.run_dir)
    if plan is not None:
        run.total_steps, run.warmup_steps = plan.state_at(run.start_step)
    run.plan = plan
    run.replan_every = boundaries(run.total_steps, cfg.checkpoint_every)


def _check_resumed_length(run: RunState, wanted: int | None) -> None:
    """A resumed run with a new length is re-planned to it from the resume point; a finished one needs one.

    The learning-rate and EMA schedules then follow the new length from the resume point on (the steps
    already taken stay as they were); run.json records the step and the length it was extended from.
    """
    recorded, step = run.total_steps, run.start_step
    if wanted is None or wanted == recorded:
        if step >= recorded and _finished(run.run_dir, step):  # else stopped in its final save: finish it
            raise ConfigError(f"--resume {run.run_dir}: the run already finished ({step} of {recorded} steps); to "
                              f"train it longer give a new length, e.g. --steps {2 * recorded}")
        return
    if wanted <= step:
        raise ConfigError(f"--resume {run.run_dir}: the run is at step {step}, so a length of {wanted} steps ends "
                          f"before it; give a length beyond step {step}")
    run.total_steps = wanted
    run.length_change = {"from_step": step, "total_steps_before": recorded}
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


def _write_run_folder(run: RunState) -> None:
    """Rank 0 writes config.yaml, run.json, init.json and views.png before the first step."""
    if not run.main:
        return
    cfg, run_dir, dataset, model = run.cfg, run.run_dir, run.dataset, run.model
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.cleanup_temporary(run_dir)
    save_yaml(cfg, run_dir / "config.yaml")
    if run.resume:
        truncate_metrics(run_dir / "metrics.jsonl", run.start_step)
    else:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    world = dist.world_size()
    (run_dir / "run.json").write_text(json.dumps({
        "total_steps": run.total_steps, "steps_per_epoch": run.steps_per_epoch, "warmup_steps": run.warmup_steps,
        "base_lr": run.base_lr, "precision": run.precision, "device": str(run.device), "world_size": world,
        "sync_bn": bool(cfg.sync_bn and world > 1), "image_size": run.image_size, "num_images": len(dataset),
        "in_channels": dataset.num_channels, "dataset_mean": list(dataset.mean), "dataset_std": list(dataset.std),
        **_length_changes(run),
    }, indent=1))
    if getattr(model, "init_record", None) is not None:  # what --init loaded (file, sha256, prefix removed, classifier dropped)
        (run_dir / "init.json").write_text(json.dumps(model.init_record, indent=1))
    try:
        sample = dataset.images[:8] if hasattr(dataset, "images") else torch.stack([dataset[i][0] for i in range(8)])
        save_view_grid(sample, list(run.augs), run_dir / "views.png", n_images=8, n_views=6, seed=cfg.seed)
    except Exception as e:  # a picture must never cost a run
        warnings.warn(f"could not write views.png: {e}")


def _length_changes(run: RunState) -> dict:
    """``length_changes``: each resume that changed the run's length (kept from run.json across resumes)."""
    path = run.run_dir / "run.json"
    before = json.loads(path.read_text()).get("length_changes", []) if run.resume and path.is_file() else []
    now = [run.length_change] if run.length_change is not None else []
    return {"length_changes": before + now} if before or now else {}


# ------------------------------------------------------------------------------------------------
# The loop


def _open_outputs(run: RunState, progress: bool) -> None:
    """The metric log and trackers (rank 0), the progress bar, and the clocks and monitors of the loop."""
    cfg = run.cfg
    trackers = open_trackers(cfg.logger, run.run_dir, to_dict(cfg), run.resume, run.start_step) if run.main else []
    run.logger = MetricsLogger(run.run_dir, run.main, trackers)
    if run.main and progress:
        run.bar = tqdm(total=run.total_steps, initial=run.start_step, desc=f"{cfg.method} pre-training", unit="step",
                       dynamic_ncols=True, file=sys.stderr)
    run.collapse = CollapseMonitor.for_dim(cfg.proj_out_dim, cfg.collapse_threshold, after_step=run.warmup_steps)
    run.bad_total = (run.state or {}).get("bad_steps", 0)
    run.last_ckpt = ckpt.list_checkpoints(run.run_dir)[-1] if ckpt.list_checkpoints(run.run_dir) else None
    run.model.train()
    run.t_log = run.t_start = run.t_prev = _clock()


def _batches(run: RunState):
    """Batches from ``start_step`` on; a timed run may re-plan its length, so its stream is open-ended."""
    cfg = run.cfg
    stream_end = run.total_steps if run.plan is None else 1 << 62
    return batch_stream(run.dataset, cfg.batch_size, cfg.seed, run.start_step, stream_end, cfg.num_workers,
                        run.device, run.with_labels)


def _after_step(run: RunState, loss: float, logs: dict[str, float], lr: float, on_step) -> None:
    """Everything after an optimiser step: count bad steps, log, kNN monitor, re-plan, checkpoint."""
    cfg, step = run.cfg, run.step
    _count_bad_steps(run, loss)
    if run.main:
        run.collapse.check(step, logs.get("collapse_std"))
    run.imgs_since += cfg.batch_size
    now = _clock()  # one read per step: the step's duration and the log's time
    run.step_times.append(now - run.t_prev)
    run.t_prev = now
    if step % cfg.log_every == 0 or step == run.total_steps:
        _log_step(run, loss, logs, lr, now)
    if run.bar is not None:
        run.bar.update(1)
    if on_step is not None:
        on_step(step)
    if cfg.knn_monitor and run.dataset.labels is not None and (step % run.steps_per_epoch == 0
                                                                 or step == run.total_steps):
        t_knn = _clock()
        run.knn_data = run_knn_monitor(cfg, run.model, run.dataset, run.device, run.image_size, run.precision, step,
                                       run.logger, run.knn_data)
        run.knn_seconds.append(_clock() - t_knn)
    replanned = run.plan is not None and step < run.total_steps and _replan(run, now)
    if (step % cfg.checkpoint_every == 0 or (replanned and not run.replaying)) and step < run.total_steps:
        run.last_ckpt = save_run_checkpoint(run.run_dir, run.model, run.optimizer, cfg, step, run.total_steps, run.bad_total,
                                            run.main)


def _count_bad_steps(run: RunState, loss: float) -> None:
    """A skipped (non-finite) step warns; ``max_bad_steps`` of them in a row end the run."""
    if math.isfinite(loss):
        run.bad_in_a_row = 0
        return
    run.bad_in_a_row += 1
    run.bad_total += 1
    if run.bad_in_a_row >= run.cfg.max_bad_steps:
        where = f"the last good checkpoint is {run.last_ckpt}" if run.last_ckpt else "no checkpoint was written yet"
        raise TrainingError(f"the loss was not finite for {run.bad_in_a_row} steps in a row (last at step {run.step}); "
                            f"{where}. Lower the learning rate (--set optim.lr=...) or use --set precision=fp32, "
                            "then resume.")
    warnings.warn(f"non-finite loss at step {run.step}; the step was skipped ({run.bad_total} so far)")


def _log_step(run: RunState, loss: float, logs: dict[str, float], lr: float, now: float) -> None:
    """The global batch's loss (averaged over ranks, not rank 0's share), logged by rank 0."""
    loss, logs = mean_over_ranks(loss, logs, run.device)
    if not run.main:
        return
    ips = run.imgs_since / max(now - run.t_log, 1e-9)
    run.t_log, run.imgs_since = now, 0
    run.logger.log({"step": run.step, "epoch": run.step / run.steps_per_epoch, "loss": loss, "lr": lr,
                    "images_per_sec": ips, "elapsed_sec": now - run.t_start, **logs})
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}")


def _replan(run: RunState, now: float) -> bool:
    """A timed run: follow the recorded plan (resumed), or re-plan from the measured pace; True if the length changed."""
    cfg, step, plan = run.cfg, run.step, run.plan
    new_total = None
    if run.replaying:
        new_total, new_warmup = plan.state_at(step)
        new_total = None if (new_total, new_warmup) == (run.total_steps, run.warmup_steps) else new_total
    elif is_check_step(step, run.total_steps, run.replan_every) and run.step_times:
        pace = median(run.step_times)
        reserve = cfg.minutes_reserve_steps * pace  # work after the run, inside the same budget
        extra = reserve
        if cfg.knn_monitor and run.dataset.labels is not None:  # measured once one evaluation has run
            cost = sum(run.knn_seconds) / len(run.knn_seconds) if run.knn_seconds else run.knn_cost
            extra = lambda total: cost * evaluations_after(step, total, run.steps_per_epoch) + reserve  # noqa: E731
        new_total = replan(plan, step, now - run.t_budget, pace, extra, total_steps=run.total_steps)
        if dist.is_distributed():  # every rank takes rank 0's decision
            new_total = broadcast_int(-1 if new_total is None else new_total, run.device)
            new_total = None if new_total < 0 else new_total
        run.step_times = []
        if new_total is not None:
            new_warmup = min(run.warmup_steps, new_total // 2) if step < run.warmup_steps else run.warmup_steps
            plan.record(step, new_total, new_warmup, pace)
            if run.main:
                plan.save(run.run_dir)
                update_run_json(run.run_dir, total_steps=new_total, warmup_steps=new_warmup)
                print(f"[selfsup] --minutes {cfg.minutes}: {pace * 1000:.0f} ms/step since the last check; "
                      f"{run.total_steps} -> {new_total} steps", file=sys.stderr)
    if new_total is None:
        return False
    run.total_steps, run.warmup_steps = new_total, new_warmup
    if run.bar is not None:
        run.bar.total = run.total_steps
        run.bar.refresh()
    return True


def _finish(run: RunState) -> Path:
    """The last checkpoint, the final weights and train_summary.json; leave the process group if this call joined it."""
    cfg, run_dir, dataset = run.cfg, run.run_dir, run.dataset
    save_run_checkpoint(run_dir, run.model, run.optimizer, cfg, run.step, run.total_steps, run.bad_total, run.main)
    final = run_dir / "model.safetensors"
    if run.main:
        ckpt.save_weights(export_weights(run.model), final, metadata=weights_meta(cfg, run.image_size, dataset))
        image_report = final_report(dataset)
        if image_report is not None and image_report.skipped:
            print(f"[selfsup] {image_report.skipped} bad images skipped: {image_report.summary()}", file=sys.stderr)
        (run_dir / "train_summary.json").write_text(json.dumps({
            "steps": run.step, "bad_steps": run.bad_total, "train_seconds_this_session": _clock() - run.t_start,
            "budget_seconds_used": None if run.plan is None or run.replaying else _clock() - run.t_budget,
            "bad_images": None if image_report is None else image_report.to_dict(),
            "collapse_warning_step": run.collapse.warned_at,
        }, indent=1))
    dist.barrier()
    if run.owns_group:
        dist.destroy()
    return final


