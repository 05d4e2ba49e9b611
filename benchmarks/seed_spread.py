"""Seed spread of full-data cells: pre-train each method with several seeds, probe each run, print mean ± sd.

Each cell is ``selfsup pretrain --method M --dataset fashion-mnist --steps N --seed S`` (the default
recipe for the device; kNN monitor off) followed by ``selfsup eval linear`` and ``selfsup eval knn``
on the run (``benchmarks/cells.py``). Finished runs are read back and an interrupted one continues from its
newest checkpoint, so a rerun of the same command resumes.

    python benchmarks/seed_spread.py --methods simclr byol --steps 1000 --seeds 0 1 2 --root runs/seeds
    python benchmarks/seed_spread.py ... --data-dir DATA --device cuda     # on a GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cells  # noqa: E402


def cell(root: Path, method: str, steps: int, seed: int, data_dir: str | None, device: str) -> dict:
    """Pre-train (or resume) one run and evaluate it; linear and kNN top-1."""
    run = root / f"{method}_{steps}_s{seed}"
    common = ["--data-dir", data_dir] if data_dir else []
    quiet = ["--no-progress", "--logger", "none", "--set", f"device={device}"]
    argv = ["pretrain", "--method", method, "--dataset", "fashion-mnist", "--steps", steps, "--seed", seed,
            "--set", "knn_monitor=false", *quiet, *common]
    cells.pretrain(run, argv, steps, resume_argv=quiet)
    return {kind: cells.evaluate(kind, run / f"eval_{kind}.json", ["--run", run, "--device", device, *common])[0]["top1"]
            for kind in ("linear", "knn")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["simclr", "byol"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", default="runs/seeds")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    root = Path(args.root)
    for method in args.methods:
        rows = [cell(root, method, args.steps, s, args.data_dir, args.device) for s in args.seeds]
        for s, r in zip(args.seeds, rows):
            print(json.dumps({"method": method, "steps": args.steps, "seed": s, "linear": round(r["linear"], 2),
                              "knn": round(r["knn"], 2)}), flush=True)
        summary = {"method": method, "steps": args.steps, "seeds": len(rows)}
        for kind in ("linear", "knn"):
            vals = [r[kind] for r in rows]
            summary[kind] = round(statistics.mean(vals), 2)
            summary[f"{kind}_sd"] = round(statistics.stdev(vals), 2) if len(vals) > 1 else None
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
