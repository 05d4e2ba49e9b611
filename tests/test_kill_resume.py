"""``kill -9`` at seeded random moments, ``--resume``, and the same weights as an uninterrupted run.

Real ``selfsup pretrain`` processes on the embedded data set with a tiny backbone: one runs
uninterrupted; another is killed with SIGKILL several times (after a random logged step plus a
random delay, so kills land mid-step, mid-checkpoint-write or during the final save) and resumed
each time. Every kill may lose at most one checkpoint interval, and the final ``model.safetensors``
and every logged loss must be bit-identical to the uninterrupted run's (CPU, same seed).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfsup.training.checkpoint import list_checkpoints, load_weights

TOTAL, EVERY = 30, 5
ARGS = ["pretrain", "--dataset", "embedded", "--steps", str(TOTAL), "--batch-size", "16", "--checkpoint-every",
        str(EVERY), "--seed", "3", "--no-progress", "--set", "backbone=resnet18", "--set", "backbone_width=0.0625",
        "--set", "image_size=16", "--set", "simclr.proj_out_dim=16", "--set", "knn_monitor=false", "--set", "log_every=1",
        "--recipe", "cpu", "--set", f"precision={os.environ.get('SELFSUP_TEST_PRECISION', 'fp32')}"]


def _start(run: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "selfsup", *ARGS, "--out", str(run)] + (["--resume", str(run)] if resume else [])
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged(run: Path) -> dict[int, float]:
    """step -> loss of the complete lines of metrics.jsonl (a kill can leave half a line)."""
    out = {}
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "loss" in row:
                out[row["step"]] = row["loss"]
    return out


def _newest_checkpoint_step(run: Path) -> int:
    done = list_checkpoints(run)
    return int(done[-1].name[len("step_"):]) if done else 0


def _kill_after(proc: subprocess.Popen, run: Path, step: int, delay: float) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after it logs ``step``; False if it finished first."""
    deadline = time.monotonic() + 120
    while max(_logged(run), default=0) < step:
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


@pytest.mark.slow
@pytest.mark.precision
def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path):
    reference = _start(tmp_path / "reference", resume=False)  # runs alongside the interrupted chain
    run = tmp_path / "killed"
    rng = random.Random(20260530)
    kills = 0
    proc = _start(run, resume=False)
    for _ in range(3):
        start = _newest_checkpoint_step(run)
        target = rng.randint(start + 1, TOTAL)
        landed = _kill_after(proc, run, target, rng.uniform(0.0, 0.08))
        if not landed:
            break
        kills += 1
        lost = max(_logged(run), default=0) - _newest_checkpoint_step(run)
        assert lost <= EVERY, f"a kill lost {lost} steps, more than one checkpoint interval ({EVERY})"
        proc = _start(run, resume=bool(list_checkpoints(run)))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    ref_out, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-2000:]
    assert kills >= 2

    a = load_weights(tmp_path / "reference" / "model.safetensors")
    b = load_weights(run / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # ... and the same file, byte for byte (metadata in a fixed order, whichever process wrote it)
    assert (tmp_path / "reference" / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    ref_log, log = _logged(tmp_path / "reference"), _logged(run)
    assert sorted(log) == list(range(1, TOTAL + 1))
    assert log == ref_log  # every step replayed exactly
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
