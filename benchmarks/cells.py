"""Resumable benchmark cells on top of the ``selfsup`` command: pre-train, evaluate, fine-tune, distill.

A cell is one run folder made by the commands a user would type. Each helper runs the command's own
entry point (``selfsup.cli.main``, what the installed ``selfsup`` executes) in this process, so there is
no second path into the library, and reads what the run wrote back from its folder. Every helper can be
called again on the same folder: finished work is read back, an interrupted pre-training, fine-tuning or
distillation continues from its newest checkpoint (``--resume``), and an evaluation whose JSON is
missing or unreadable (a kill while writing it) runs again.

Used by ``benchmarks/reference.py`` (the reference grid) and ``benchmarks/seed_spread.py``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


class CommandFailed(RuntimeError):
    """A ``selfsup`` command ended with a non-zero status (its message is in the log above it)."""


def selfsup(argv: list[str], log=None) -> str:
    """Run ``selfsup ARGV`` in this process and return what it printed on stdout.

    The command line and the command's stdout (its JSON result lines) go to ``log`` (default: stderr), so a
    caller's own stdout stays its own. An interrupted command (status 130) raises ``KeyboardInterrupt``,
    any other non-zero status ``CommandFailed`` with the command line.
    """
    from selfsup.cli import main

    argv = [str(a) for a in argv]
    log = sys.stderr if log is None else log
    log.write(f"$ selfsup {' '.join(argv)}\n")  # the log shows every command as it was run
    log.flush()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            status = main(argv)
    finally:
        out = buf.getvalue()
        log.write(out)
        log.flush()
    if status == 130:
        raise KeyboardInterrupt
    if status:
        raise CommandFailed(f"selfsup {' '.join(argv)} exited with status {status}")
    return out


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None if it is missing or unreadable (cut short by a kill)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename, so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# State of a run folder


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint in ``run_dir``, or None if there is none."""
    from selfsup.training.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    return int(found[-1].name.split("_")[-1]) if found else None


def pretrain_state(run_dir: Path, steps: int) -> tuple[str, int]:
    """``(state, step)`` of a pre-training run folder meant to train ``steps`` steps.

    ``done``: final weights and a summary at ``steps``; ``partial``: a checkpoint at ``step`` to resume
    from; ``started``: the run wrote its config but no checkpoint yet (killed early: nothing to continue);
    ``new``: no folder, or an empty one.
    """
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "train_summary.json") or {}
    if summary.get("steps") == steps and (run_dir / "model.safetensors").is_file():
        return "done", steps
    step = checkpoint_step(run_dir)
    if step is not None:
        return "partial", step
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "started", 0
    return "new", 0


def labelled_state(run_dir: Path) -> tuple[str, int]:
    """``(state, step)`` of a fine-tuning or distillation run folder: done (``results.json``), partial, new."""
    if read_json(Path(run_dir) / "results.json") is not None:
        return "done", 0
    step = checkpoint_step(run_dir)
    return ("partial", step) if step is not None else ("new", 0)


# ------------------------------------------------------------------------------------------------
# The phases of a cell


def pretrain(run_dir: Path, argv: list[str], steps: int, resume_argv: list[str], log=None) -> dict | None:
    """Make ``run_dir`` a finished ``steps``-step pre-training run; returns this session's record, or None if
    it was already finished.

    ``argv`` starts a fresh run (``selfsup pretrain ...`` without ``--out``); ``resume_argv`` is what a
    resumed run is given besides ``--resume RUN_DIR`` (bookkeeping only: device, logger; the run's saved
    config rules everything else). A folder the run created but left without a checkpoint is cleared and
    the run starts again, since ``pretrain`` takes a new run only into an empty folder.
    """
    run_dir = Path(run_dir)
    state, step = pretrain_state(run_dir, steps)
    if state == "done":
        return None
    if state == "started":
        if (run_dir / "model.safetensors").is_file():
            raise CommandFailed(f"{run_dir} holds final weights of a run of another length (not {steps} steps) and no "
                                "checkpoint to continue; delete the folder or choose another one")
        shutil.rmtree(run_dir)
    if state == "partial":
        cmd = ["pretrain", "--resume", run_dir, *resume_argv]
    else:
        cmd = [*argv, "--out", run_dir]
    t0 = time.perf_counter()
    selfsup(cmd, log)
    return {"phase": "pretrain", "resumed": state == "partial", "start_step": step, "end_step": steps,
            "seconds": round(time.perf_counter() - t0, 1)}


def evaluate(kind: str, out: Path, argv: list[str], log=None) -> tuple[dict, dict | None]:
    """``selfsup eval KIND ARGV --out OUT`` unless ``out`` already holds its result.

    Returns ``(result, session)``; the session record (its wall time) is None when nothing ran.
    """
    out = Path(out)
    result = read_json(out)
    if result is not None:
        return result, None
    t0 = time.perf_counter()
    selfsup(["eval", kind, "--no-progress", *argv, "--out", out], log)
    result = read_json(out)
    if result is None:
        raise CommandFailed(f"selfsup eval {kind} wrote no result to {out}")
    return result, {"phase": f"eval_{kind}", "seconds": round(time.perf_counter() - t0, 1)}


def labelled(command: str, run_dir: Path, argv: list[str], resume_argv: list[str], log=None) -> tuple[dict, dict | None]:
    """A finished ``selfsup finetune`` / ``distill`` run in ``run_dir``: read back, resumed, or started.

    Returns ``(results.json, session)``; the session is None when the run had already finished.
    """
    run_dir = Path(run_dir)
    state, step = labelled_state(run_dir)
    if state != "done":
        cmd = [command, "--resume", run_dir, *resume_argv] if state == "partial" else [command, *argv, "--out", run_dir]
        t0 = time.perf_counter()
        selfsup(cmd, log)
        session = {"phase": command, "resumed": state == "partial", "start_step": step,
                   "seconds": round(time.perf_counter() - t0, 1)}
    else:
        session = None
    result = read_json(run_dir / "results.json")
    if result is None:
        raise CommandFailed(f"selfsup {command} wrote no results.json into {run_dir}")
    return result, session


# ------------------------------------------------------------------------------------------------
# What a run folder says about itself


def config_value(cfg: dict, key: str):
    """``key`` from a saved config, at the top level or inside any section (``base_tau`` or ``byol.base_tau``).

    Reading by the last part of the name keeps the readers working while keys move into sections.
    """
    leaf = key.split(".")[-1]
    if leaf in cfg and not isinstance(cfg[leaf], dict):
        return cfg[leaf]
    for value in cfg.values():
        if isinstance(value, dict) and leaf in value and not isinstance(value[leaf], dict):
            return value[leaf]
    return None


def load_config(run_dir: Path) -> dict:
    """A run folder's ``config.yaml`` as a dict ({} if there is none)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def config_summary(run_dir: Path, leave_out: tuple[str, ...] = ("view", "view2", "hf")) -> dict:
    """The run's resolved config without the augmentation sections, plus the facts ``run.json`` adds
    (precision, device, base learning rate, steps, image size)."""
    cfg = {k: v for k, v in load_config(run_dir).items() if k not in leave_out}
    info = read_json(Path(run_dir) / "run.json") or {}
    facts = ("kind", "precision", "device", "base_lr", "total_steps", "warmup_steps", "image_size", "num_images",
             "backbone", "backbone_width", "num_labeled", "label_fraction")
    return {**cfg, "run": {k: info[k] for k in facts if k in info}}


def collapse_summary(run_dir: Path) -> dict | None:
    """The collapse monitor's reading of a run (BYOL Sec. 3.2, ``selfsup.methods.collapse``), or None if the
    run logs no ``collapse_std``.

    ``warned_at_step``: the step at which the monitor warned (``train_summary.json``, the last session;
    a monitor restarts with a resumed run and warns again on a run still collapsed); ``final`` and
    ``lowest``: the logged ``collapse_std``; ``threshold``: ``collapse_threshold / sqrt(proj_out_dim)``,
    the monitor's own limit (healthy is about ``1/sqrt(d)``).
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    values = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("collapse_std") is not None:
            values.append((record.get("step"), float(record["collapse_std"])))
    if not values:
        return None
    cfg = load_config(run_dir)
    fraction, dim = config_value(cfg, "collapse_threshold"), config_value(cfg, "proj_out_dim")
    threshold = fraction / math.sqrt(dim) if fraction is not None and dim else None
    warned = (read_json(run_dir / "train_summary.json") or {}).get("collapse_warning_step")
    return {"warned_at_step": warned, "final": values[-1][1], "final_step": values[-1][0],
            "lowest": min(v for _, v in values), "threshold": threshold, "collapsed": warned is not None}


# ------------------------------------------------------------------------------------------------
# Machine and statistics


def machine() -> dict:
    """The CPU as ``lscpu`` names it and whether it has native bf16 (AVX512-BF16 or AMX), the core count,
    and the torch threads of this process."""
    model, flags = "", ""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("model name",) and not model:
            model = value.strip()
        elif key.strip().lower() == "flags" and not flags:
            flags = value
    names = set(flags.split())
    info = {"cpu_model": model or "unknown", "cpu_bf16": bool(names & {"avx512_bf16", "amx_bf16"}), "cpus": os.cpu_count()}
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than two values; mean None with none)."""
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` (dicts) with ``columns`` = (key, title); floats as 4 significant digits."""
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _ in columns:
            v = r.get(key)
            cells.append(f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
