"""Experiment trackers for ``selfsup pretrain --logger tensorboard,csv,wandb,mlflow``.

``metrics.jsonl`` is always written (``train._Logger``); these receive the same records. Each tracker
is an optional extra imported only when asked for: ``tensorboard`` (the default; skipped silently when
not installed, as before), ``csv`` (no dependency), ``wandb`` (``pip install 'selfsup[wandb]'``) and
``mlflow`` (``pip install 'selfsup[mlflow]'``).

A resumed run continues the same tracker run: the W&B run id and the MLflow run id (with its tracking
URI) are stored in ``RUN_DIR/trackers.json`` when the run starts and reused by ``--resume``. W&B follows
its own environment (``WANDB_MODE=offline``, ``WANDB_PROJECT``, ``WANDB_DIR``; default folder: the run
folder); MLflow its (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, default experiment
``selfsup``). Records carry their step; W&B plots them against ``trainer/step`` so a resumed run that
repeats steps since its last checkpoint is not refused.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from selfsup.errors import ConfigError
from selfsup.training.config import TRACKERS

__all__ = ["parse_trackers", "check_trackers", "open_trackers", "TrackerError", "STATE_FILE"]

STATE_FILE = "trackers.json"


class TrackerError(ConfigError):
    """An experiment tracker was asked for but cannot be used (e.g. its package is not installed)."""


def parse_trackers(spec: str) -> list[str]:
    """``"tensorboard,csv"`` -> ``["tensorboard", "csv"]``; ``""`` or ``"none"`` -> ``[]``."""
    names = [t.strip() for t in spec.split(",") if t.strip() and t.strip() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise TrackerError(f"--logger {name!r}: choose from {', '.join(TRACKERS)} (comma-separated)")
    return list(dict.fromkeys(names))


_MISSING = {
    "wandb": "--logger wandb needs the wandb package; pip install 'selfsup[wandb]' (set WANDB_MODE=offline to log "
             "without an account)",
    "mlflow": "--logger mlflow needs the mlflow package; pip install 'selfsup[mlflow]'",
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_trackers(spec: str) -> None:
    """Raise ``TrackerError`` before any work when a tracker in ``spec`` is not installed (finds, does not import)."""
    for name in parse_trackers(spec):
        if name in _MISSING and not _installed(name):
            raise TrackerError(_MISSING[name])


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _read_state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(run_dir: Path, state: dict) -> None:
    (run_dir / STATE_FILE).write_text(json.dumps(state, indent=1))


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.writer.close()


class CSVTracker:
    """``RUN_DIR/metrics.csv`` in long form (``step,name,value``), so records with different keys share one file."""

    def __init__(self, run_dir: Path, resume: bool, start_step: int):
        self.path = run_dir / "metrics.csv"
        if resume and self.path.is_file():  # drop rows written after the checkpoint we restart from
            with open(self.path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            keep = [r for r in rows if len(r) == 3 and _int_or(r[0], start_step + 1) <= start_step]
        else:
            keep = []
        self.file = open(self.path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(["step", "name", "value"])
        self.writer.writerows(keep)
        self.file.flush()

    def log(self, record: dict[str, Any]) -> None:
        self.writer.writerows([record["step"], k, repr(v)] for k, v in _scalars(record).items())
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _int_or(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def _require(tracker: str, module: str):
    """The tracker's optional package, imported when the tracker is opened; a clear error when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackerError(_MISSING[tracker]) from None


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict, state: dict):
        wandb = _require("wandb", "wandb")
        saved = state.get("wandb") or {}
        kwargs = {} if os.environ.get("WANDB_DIR") else {"dir": str(run_dir)}
        if saved.get("id"):  # continue the run this folder started
            kwargs.update(id=saved["id"], resume="allow")
        self.run = wandb.init(project=saved.get("project") or os.environ.get("WANDB_PROJECT", "selfsup"),
                              name=run_dir.name, config=config, **kwargs)
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")
        state["wandb"] = {"id": self.run.id, "project": self.run.project}

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({"trainer/step": record["step"], **_scalars(record)})

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    def __init__(self, run_dir: Path, config: dict, state: dict):
        Param = _require("mlflow", "mlflow.entities").Param
        MlflowClient = _require("mlflow", "mlflow.tracking").MlflowClient
        saved = state.get("mlflow") or {}
        self.client = MlflowClient(tracking_uri=saved.get("tracking_uri"))
        if saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "selfsup")
            experiment = self.client.get_experiment_by_name(name)
            eid = experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
            self.run_id = self.client.create_run(eid, run_name=run_dir.name,
                                                 tags={"selfsup.run_dir": str(run_dir.resolve())}).info.run_id
            params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in _flat(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        state["mlflow"] = {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri}

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, int(record["step"]))
                                                    for k, v in _scalars(record).items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(spec: str, run_dir: str | Path, config: dict, resume: bool = False, start_step: int = 0) -> list:
    """The trackers named in ``spec``, started (or, on resume, continued from ``trackers.json``)."""
    run_dir = Path(run_dir)
    state = _read_state(run_dir) if resume else {}
    out = []
    for name in parse_trackers(spec):
        if name == "tensorboard":
            try:
                out.append(TensorBoardTracker(run_dir))
            except ImportError:  # the default: missing tensorboard is not an error (pip install 'selfsup[viz]')
                if spec.strip() != "tensorboard":
                    warnings.warn("--logger tensorboard: the tensorboard package is not installed; pip install 'selfsup[viz]'")
        elif name == "csv":
            out.append(CSVTracker(run_dir, resume, start_step))
        elif name == "wandb":
            out.append(WandbTracker(run_dir, config, state))
        else:
            out.append(MLflowTracker(run_dir, config, state))
    if state:
        _write_state(run_dir, state)
    return out
