"""The run's metric log: ``metrics.jsonl`` plus TensorBoard or the ``--logger`` trackers, written by rank 0."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any


class MetricsLogger:
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


def truncate_metrics(path: Path, last_step: int) -> None:
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
