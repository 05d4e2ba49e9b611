"""``benchmarks/reference.py``: a tiny grid end to end, killed and rerun, and its report from the JSON alone.

Two rows (SimCLR, BYOL) of one 40-step cell each on the embedded sample with a tiny encoder. The grid is
killed (SIGKILL of its whole process group) once the SimCLR cell has finished and the BYOL cell has
written a checkpoint; the rerun must skip the finished cell untouched and resume the other from that
checkpoint. Then the results JSON is checked, ``--report`` builds the tables and plots from it, and a
rerun with other settings is refused. The claim verdicts are checked on a hand-made JSON.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "reference.py"
TINY = ["--dataset", "embedded", "--set", "backbone=resnet18", "--set", "backbone_width=0.0625", "--set", "recipe=cpu",
        "--set", "image_size=16",
        "--set", f"precision={os.environ.get('SELFSUP_TEST_PRECISION', 'fp32')}",
        "--batch-size", "64", "--steps-scale", "0.002", "--checkpoint-every", "2", "--jobs", "1"]
SUBSET = ["--rows", "simclr,byol", "--steps", "20000", "--seeds", "0"]  # 20,000 x 0.002 = 40 steps, seed 0
SIMCLR, BYOL = "simclr_b64_40_s0", "byol_b64_40_s0"


def _env() -> dict:
    src = str(REPO / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "PYTHONWARNINGS": "ignore"}


def _grid(root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--root", str(root), *TINY, *extra]


def _checkpoints(run: Path) -> list[int]:
    folder = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in folder.glob("step_*") if (p / "meta.json").is_file()) if folder.is_dir() else []


def _load_reference():
    spec = importlib.util.spec_from_file_location("reference_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    return module


def test_tiny_grid_skips_finished_cells_resumes_unfinished_ones_and_reports(tmp_path):
    root = tmp_path / "grid"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(_grid(root, *SUBSET), env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.monotonic() + 120
    while not ((root / SIMCLR / "cell.json").is_file() and _checkpoints(root / BYOL)):
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "the tiny grid did not reach BYOL's first checkpoint in 120 s"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)  # the grid and its worker, as a lost machine would
    first.wait()
    killed_at = _checkpoints(root / BYOL)[-1]
    assert not (root / BYOL / "cell.json").exists(), "BYOL finished before the kill; the test needs it unfinished"
    assert 0 < killed_at < 40
    finished = (root / SIMCLR / "cell.json").read_bytes()
    finished_mtime = (root / SIMCLR / "cell.json").stat().st_mtime_ns

    listed = subprocess.run(_grid(root, *SUBSET, "--list"), env=_env(), capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()}
    assert " done " in lines[SIMCLR] and f"checkpoint at step {killed_at} of 40" in lines[BYOL], listed.stdout

    rerun = subprocess.run(_grid(root, *SUBSET), env=_env(), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{SIMCLR}: done, skipped" in rerun.stdout
    assert f"{BYOL}: start (partial: checkpoint at step {killed_at} of 40)" in rerun.stdout, rerun.stdout
    assert (root / SIMCLR / "cell.json").read_bytes() == finished
    assert (root / SIMCLR / "cell.json").stat().st_mtime_ns == finished_mtime
    sessions = [s for s in json.loads((root / BYOL / "cell.json").read_text())["sessions"] if s["phase"] == "pretrain"]
    assert sessions == [{**sessions[0], "resumed": True, "start_step": killed_at, "end_step": 40}], sessions
    log = (root / "logs" / f"{BYOL}.log").read_text()
    assert log.count(f"$ selfsup pretrain --method byol") == 1 and f"$ selfsup pretrain --resume {BYOL}" in log, log

    data = json.loads((root / "results.json").read_text())
    by_id = {c["id"]: c for c in data["cells"]}
    assert set(by_id) == {SIMCLR, BYOL}
    for cid, method in ((SIMCLR, "simclr"), (BYOL, "byol")):
        c = by_id[cid]
        assert (c["row"], c["method"], c["steps"], c["seed"], c["batch_size"], c["budget"]) == (method, method, 40, 0, 64, 20000)
        assert set(c["metrics"]) == {"linear", "knn"} and all(0 < v <= 100 for v in c["metrics"].values())
        assert c["results"]["linear"]["top1"] == c["metrics"]["linear"]
        assert c["config"]["method"] == method and c["config"]["backbone_width"] == 0.0625
        assert c["config"]["run"]["total_steps"] == 40
        assert c["machine"]["device"] == "cpu" and c["machine"]["cpu_model"] and c["machine"]["torch_threads"] == 1
        assert isinstance(c["machine"]["cpu_bf16"], bool)
        assert c["wall_seconds"] > 0
    assert by_id[BYOL]["collapse"]["threshold"] == pytest.approx(0.4 / 128 ** 0.5)  # byol.proj_out_dim 128
    assert data["claims"] and len(data["pending"]) > 0

    md = tmp_path / "docs" / "results" / "reference.md"
    prefix = tmp_path / "docs" / "img" / "reference_"
    report = subprocess.run([sys.executable, str(SCRIPT), "--report", "--json", str(root / "results.json"), "--md", str(md),
                             "--plots", str(prefix)], env=_env(), capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    text = md.read_text()
    for cid, row in ((SIMCLR, "simclr"), (BYOL, "byol")):
        assert f"| {row} | {by_id[cid]['metrics']['linear']:.2f} (1 seed) |" in text
        assert f"| {row} | {by_id[cid]['metrics']['knn']:.2f} (1 seed) |" in text
    assert "](../img/reference_linear.png)" in text and "| row | 40 steps |" in text
    for metric in ("linear", "knn"):
        assert Path(f"{prefix}{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    other = subprocess.run(_grid(root, *SUBSET, "--set", "temperature=0.5"), env=_env(), capture_output=True, text=True,
                           timeout=60)
    assert other.returncode != 0 and "made with other settings" in other.stderr, other.stdout + other.stderr


def _cell(cid: str, **metrics) -> dict:
    return {"id": cid, "kind": "pretrain", "row": cid.split("_")[0], "budget": 1000, "steps": 1000, "seed": int(cid[-1]),
            "batch_size": 256, "metrics": metrics, "wall_seconds": 60.0, "collapse": None,
            "machine": {"cpu_model": "AMD EPYC", "cpu_bf16": True, "device": "cpu"}}


def test_report_states_each_claim_with_mean_sd_and_difference_in_sds(tmp_path):
    ref = _load_reference()
    a = {0: 86.70, 1: 86.45, 2: 86.73}   # SimCLR at 1,000 steps (docs/benchmarks.md): 86.63 ± 0.15
    b = {0: 84.75, 1: 84.10, 2: 85.00}   # 84.62 ± 0.46
    c = {0: 86.40, 1: 86.90, 2: 86.20}   # 86.50 ± 0.36: overlaps a
    cells = [_cell(f"{name}_s{s}", linear=v[s], knn=v[s] - 5) for name, v in (("a", a), ("b", b), ("c", c)) for s in v]
    comparisons = [ref.compare(f"{x} above {y}", x, ref.values({s: f"{x}_s{s}" for s in a}, "linear"), y,
                               ref.values({s: f"{y}_s{s}" for s in a}, "linear")) for x, y in (("a", "b"), ("b", "a"), ("a", "c"))]
    data = {"updated": "now", "command": ["python", "benchmarks/reference.py"], "cells": cells, "pending": [],
            "grid": {"dataset": "fashion-mnist", "batch_size": 256, "sets": [], "claim_seeds": [0, 1, 2],
                     "columns": {"1000": {"steps": 1000, "seeds": [0, 1, 2]}},
                     "rows": [{"name": n, "method": n} for n in "abc"]},
            "claims": [{"id": "x", "title": "t", "paper": "p", "comparisons": comparisons[:1]},
                       {"id": "y", "title": "t", "paper": "p", "comparisons": comparisons[1:]}]}
    (tmp_path / "r.json").write_text(json.dumps(data))
    text = ref.report(tmp_path / "r.json", tmp_path / "md" / "r.md", str(tmp_path / "img" / "r_"))
    assert "| a | 86.63 ± 0.15 |" in text and "| b | 84.62 ± 0.46 |" in text
    # a - b = 2.01 points; pooled sd sqrt((0.152^2 + 0.462^2) / 2) = 0.344: 5.8 sds, intervals apart
    assert "| a above b | a: 86.63 ± 0.15 | b: 84.62 ± 0.46 | +2.01 | +5.8 | **holds** |" in text
    assert "| b above a | b: 84.62 ± 0.46 | a: 86.63 ± 0.15 | -2.01 | -5.8 | **does not hold (the reverse is separated)** |" in text
    assert "| a above c | a: 86.63 ± 0.15 | c: 86.50 ± 0.36 | +0.13 | +0.5 | **not resolved (within the seed spread)** |" in text
    assert text.count("**Holds here: yes.**") == 1 and text.count("**Holds here: no.**") == 1
    assert ref.judge([1.0, 2.0], [0.0, 0.5], expected=3)["verdict"] == "holds on 2 of 3 seeds"
    assert ref.judge([1.0, 2.0], [0.5, 1.5], expected=3)["verdict"] == "not resolved (within the seed spread)"
    assert ref.judge([5.0], [1.0], expected=3)["verdict"] == "incomplete (1 of 3 seeds)"
