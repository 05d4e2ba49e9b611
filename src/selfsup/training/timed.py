"""Timed runs (``--minutes M``): plan the step count from a measured pace, re-plan when the pace drifts.

The first plan comes from timing a few throw-away steps (:func:`calibrate_steps`). Early steps are
often slower or faster than the steady state (allocator and kernel warm-up, a busy machine; a BYOL
run measured 296 ms/step in calibration and then ran at ~163 ms/step), so at regular boundaries
(``boundaries``) the run compares the time the remaining steps will take at the pace measured since
the last boundary (the median step, which ignores the kNN monitor's pauses) with the time left, and
if they differ by more than ``TOLERANCE`` of the budget it fixes a new total. The learning-rate and EMA
schedules are pure functions of ``(step, total_steps)``, so warm-up and cosine then end on time.

Each re-plan is recorded in ``RUN_DIR/time_plan.json`` and followed by a checkpoint. A resumed run
replays the recorded plan (the totals at the recorded steps) and never re-plans itself, so it ends with
the same schedule, and the same weights, as the run it continues. Everything here takes the clock as
an argument, so the planning logic is tested with a fake clock.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as tdist

from selfsup import distributed as dist
from selfsup.training.batches import batch_stream
from selfsup.training.step import Schedule

TOLERANCE = 0.01  # re-plan when the predicted end is off by more than 1% of the budget
PLAN_FILE = "time_plan.json"


@dataclass
class TimePlan:
    """The budget, the first plan (``total_steps``, ``warmup_steps``) and the re-plans made since:
    ``events`` is ``[{"step", "total_steps", "warmup_steps", "pace_ms"}]``, in step order."""

    budget_s: float
    total_steps: int
    warmup_steps: int = 0
    events: list[dict] = field(default_factory=list)

    def record(self, step: int, total_steps: int, warmup_steps: int, pace_s: float) -> None:
        self.events.append({"step": int(step), "total_steps": int(total_steps), "warmup_steps": int(warmup_steps),
                            "pace_ms": round(pace_s * 1000, 3)})

    def save(self, run_dir: str | Path) -> None:
        Path(run_dir, PLAN_FILE).write_text(json.dumps(asdict(self), indent=1))

    @staticmethod
    def load(run_dir: str | Path) -> "TimePlan | None":
        path = Path(run_dir, PLAN_FILE)
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            return TimePlan(float(d["budget_s"]), int(d["total_steps"]), int(d.get("warmup_steps", 0)),
                            list(d.get("events", [])))
        except (ValueError, KeyError, TypeError):
            return None

    def state_at(self, step: int) -> tuple[int, int]:
        """``(total_steps, warmup_steps)`` in force after ``step`` steps (a resumed run replays the plan with this)."""
        total, warmup = self.total_steps, self.warmup_steps
        for e in self.events:
            if int(e["step"]) <= step:
                total, warmup = int(e["total_steps"]), int(e["warmup_steps"])
        return total, warmup


def steps_for(remaining_s: float, pace_s: float, extra_s: float = 0.0) -> int:
    """How many steps of ``pace_s`` seconds fit in ``remaining_s`` after ``extra_s`` of other work."""
    if pace_s <= 0:
        raise ValueError(f"pace must be > 0 seconds per step, got {pace_s}")
    return max(0, int((remaining_s - extra_s) / pace_s))


def boundaries(total_steps: int, checkpoint_every: int) -> int:
    """Re-planning interval: every tenth of the planned run (at least 10 steps), and at checkpoints."""
    return max(10, min(checkpoint_every, total_steps // 10))


def is_check_step(step: int, total_steps: int, every: int) -> bool:
    """Whether a timed run compares its pace with the time left after ``step``: every ``every`` steps,
    and five times as often in the last interval, where a change of pace has no later check to
    correct it (a machine that got busier in the last minute made a 10-minute run end 3% late)."""
    if step % every == 0:
        return True
    return total_steps - step <= every and step % max(2, every // 5) == 0


def evaluations_after(step: int, total_steps: int, steps_per_epoch: int) -> int:
    """How many kNN-monitor evaluations a run still makes after ``step``: one per epoch end, one at the end."""
    ends = total_steps // steps_per_epoch - step // steps_per_epoch
    return max(0, ends) + (1 if total_steps % steps_per_epoch and total_steps > step else 0)


def fit_total(step: int, left_s: float, pace_s: float, extra: Callable[[int], float], start: int) -> int:
    """The total step count that fills ``left_s`` after ``step`` at ``pace_s``, with ``extra(total)``
    seconds of other work (the kNN evaluations a total implies), by fixed-point iteration from ``start``.
    Never below ``step + 1``."""
    total = start
    for _ in range(8):
        new = step + max(1, steps_for(left_s, pace_s, extra(total)))
        if new == total:
            break
        total = new
    return total


def replan(plan: TimePlan, step: int, elapsed_s: float, pace_s: float, extra_s: float | Callable[[int], float] = 0.0,
           tolerance: float = TOLERANCE, total_steps: int | None = None) -> int | None:
    """A new total if finishing ``total_steps`` (the total in force; default the first plan's) at ``pace_s``
    misses the budget by more than ``tolerance``.

    ``elapsed_s`` is the time spent since the budget started (calibration included), ``extra_s`` the
    time of the remaining non-step work (kNN monitor), or a function of the total giving it (the number
    of evaluations left depends on the total; the new total is then found by fixed-point iteration).
    The new total is never below ``step + 1``.
    """
    extra = extra_s if callable(extra_s) else (lambda total: extra_s)
    current = plan.total_steps if total_steps is None else total_steps
    left = plan.budget_s - elapsed_s
    predicted = (current - step) * pace_s + extra(current)
    if abs(predicted - left) <= tolerance * plan.budget_s:
        return None
    total = fit_total(step, left, pace_s, extra, current)
    return None if total == current else total


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def calibrate_steps(cfg, model, optimizer, train_step, dataset, device, n, run_dir, main, clock,
                    t_start: float, knn_cost: float = 0.0) -> int:
    """For ``--minutes``: time a few steps on a throw-away copy of the state, then fix the step count.

    The copy is restored afterwards, so a run with a time budget is still reproducible from its seed
    and its (recorded) step count. ``clock`` is the loop's (a fake one in tests). The budget runs from
    ``t_start`` (when ``pretrain`` began: loading the data and building the model count too);
    ``knn_cost`` is the measured time of one kNN-monitor evaluation (0 without the monitor).
    """
    budget = cfg.minutes * 60.0
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    # The first steps pay for allocations and kernel set-up; the median of the timed ones is the
    # steady-state cost (a mean over the first steps overestimated it by ~10% on 2 CPU cores).
    warm, timed = 3, 6
    it = batch_stream(dataset, cfg.batch_size, cfg.seed + 7919, 0, warm + timed, cfg.num_workers, device,
                      cfg.spec.needs_labels)
    untrained = Schedule(cfg, base_lr=0.0, total_steps=None, warmup_steps=0)  # lr 0: the steps change nothing
    times, t_prev = [], clock()
    for i, batch in enumerate(it):  # each time includes fetching the batch
        train_step(i, batch, untrained)
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = clock()
        if i >= warm:
            times.append(now - t_prev)
        t_prev = now
    per_step = sorted(times)[len(times) // 2]
    model.load_state_dict(model_state)
    optimizer.load_state_dict(opt_state)
    steps_per_epoch = n // cfg.batch_size
    # Per-epoch extras (the kNN monitor: one evaluation per epoch end and one at the end) cost time too.
    remaining = budget - (clock() - t_start)
    reserve = cfg.minutes_reserve_steps * per_step  # work after the run, inside the same budget
    total = fit_total(0, remaining, per_step,
                      lambda t: knn_cost * evaluations_after(0, t, steps_per_epoch) + reserve,
                      max(1, int(remaining / per_step)))
    if dist.is_distributed():
        t = torch.tensor([total], device=device if device.type == "cuda" else "cpu")
        tdist.broadcast(t, 0)
        total = int(t.item())
    if main:
        print(f"[selfsup] --minutes {cfg.minutes}: {per_step * 1000:.0f} ms/step measured, training for {total} steps "
              f"({total / steps_per_epoch:.2f} epochs); re-planned if the pace drifts", file=sys.stderr)
    return total
