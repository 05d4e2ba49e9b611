"""How the CPU default was chosen: SimCLR configs compared at the step count each reaches in
10 minutes on a 2-core CPU, by linear-evaluation top-1 on Fashion-MNIST.

Accuracy at a fixed number of steps does not depend on the machine, so the search can run on any
device (we ran it on a lent GPU, several configs at once); the step budgets come from throughput
measured on the 2-core CPU (benchmarks/throughput.py). Prints one line per config and a table.

    python benchmarks/cpu_default_search.py --jobs 8 --data-dir DIR --out runs/search
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# "A" is resnet18_narrow_plain (no 1x1 expansion), "Ax1024" the final default resnet18_narrow.
# name: (steps in 10 CPU minutes at batch 256, --set overrides). Steps from measured CPU images/s:
# resnet18_narrow ~480 img/s -> ~1100 steps; resnet10_narrow ~280 img/s -> ~650; resnet18 w0.25
# with a stride-1 stem ~100 img/s -> ~230 (benchmarks/README.md).
CONFIGS = {
    # round 1 (temperature 0.2, LARS base lr 1.0)
    "A_t0.2_lars1.0": (1100, {}),
    "A_t0.1": (1100, {"simclr.temperature": 0.1}),
    "A_t0.5": (1100, {"simclr.temperature": 0.5}),
    "A_crop0.2": (1100, {"view.crop_scale": "[0.2,1.0]", "view2.crop_scale": "[0.2,1.0]"}),
    "A_lars2.0": (1100, {"optim.lr": 2.0}),
    "A_lars0.5": (1100, {"optim.lr": 0.5}),
    "A_adamw": (1100, {"optim.name": "adamw", "optim.lr": 0.002, "optim.weight_decay": 1e-4}),
    "A_jitter1.0": (1100, {"view.jitter_strength": 1.0, "view2.jitter_strength": 1.0}),
    "B_r10w0.5": (650, {"backbone": "resnet10_narrow"}),
    "C_r18w0.25_stride1": (230, {"backbone": "resnet18", "backbone_width": 0.25}),
    "A_batch512": (550, {"batch_size": 512}),
    "A_batch128": (2200, {"batch_size": 128}),
    # round 2 (temperature 0.1, LARS base lr 2.0; wide h through a final 1x1 expansion)
    "R2_A_t0.1_lr2": (1100, {"simclr.temperature": 0.1, "optim.lr": 2.0}),
    "R2_Ax1024": (1000, {"backbone": "resnet18_narrow", "simclr.temperature": 0.1, "optim.lr": 2.0}),
    "R2_Ax1024_lr1": (1000, {"backbone": "resnet18_narrow", "simclr.temperature": 0.1, "optim.lr": 1.0}),
    "R2_Ax1024_t0.2": (1000, {"backbone": "resnet18_narrow", "simclr.temperature": 0.2, "optim.lr": 2.0}),
    "R2_Ax1024_crop0.2": (1000, {"backbone": "resnet18_narrow", "simclr.temperature": 0.1, "optim.lr": 2.0,
                                 "view.crop_scale": "[0.2,1.0]", "view2.crop_scale": "[0.2,1.0]"}),
    "R2_Ax1024_b512": (500, {"backbone": "resnet18_narrow", "simclr.temperature": 0.1, "optim.lr": 2.0, "batch_size": 512}),
    "R2_Ax2048": (950, {"backbone": "resnet18_narrow_x2048", "simclr.temperature": 0.1, "optim.lr": 2.0}),
    "R2_B_t0.1_lr2": (650, {"backbone": "resnet10_narrow", "simclr.temperature": 0.1, "optim.lr": 2.0}),
    # random-init baselines: one step at a negligible learning rate
    "R2_random_Ax1024": (1, {"backbone": "resnet18_narrow", "optim.lr": 1e-12}),
    "R2_random_B": (1, {"backbone": "resnet10_narrow", "optim.lr": 1e-12}),
    "R2_random_A": (1, {"optim.lr": 1e-12}),
}
BASE = {"recipe": "cpu", "backbone": "resnet18_narrow_plain", "simclr.temperature": 0.2, "optim.lr": 1.0, "knn_monitor": "false", "precision": "fp32"}


def run_one(name: str, steps: int, sets: dict, args) -> dict:
    out = Path(args.out) / name
    if (out / "eval_linear.json").is_file():
        return json.loads((out / "eval_linear.json").read_text()) | {"name": name, "steps": steps}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    overrides = {**BASE, **sets}
    view_keys = [k for k in overrides if k.startswith("view")]
    cmd = [sys.executable, "-m", "selfsup", "pretrain", "--dataset", args.dataset, "--out", str(out),
           "--steps", str(max(1, int(steps * args.scale))), "--no-progress"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if view_keys:  # a partial view override needs the rest of the preset spelled out
        cmd += ["--set", "view.blur_p=0.0", "--set", "view.jitter_strength=0.5", "--set", "view2.blur_p=0.0",
                "--set", "view2.jitter_strength=0.5"]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={v}"]
    if args.device:
        cmd += ["--set", f"device={args.device}"]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    ev = [sys.executable, "-m", "selfsup", "eval", "linear", "--run", str(out), "--no-progress"]
    if args.data_dir:
        ev += ["--data-dir", args.data_dir]
    res = json.loads(subprocess.run(ev, check=True, env=env, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    res.update(name=name, steps=max(1, int(steps * args.scale)), seconds=round(time.time() - t0))
    print(json.dumps({k: res[k] for k in ("name", "steps", "top1", "top5", "seconds")}), flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--device")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step budget")
    p.add_argument("--only", nargs="*")
    p.add_argument("--prefix", help="run only configs whose name starts with this (e.g. R2_)")
    p.add_argument("--out", default="runs/cpu_default_search")
    args = p.parse_args()
    names = args.only or [n for n in CONFIGS if not args.prefix or n.startswith(args.prefix)]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda n: run_one(n, *CONFIGS[n], args), names))
    print("\n| config | steps | linear top-1 | top-5 |\n|---|---|---|---|")
    for r in sorted(results, key=lambda r: -r["top1"]):
        print(f"| {r['name']} | {r['steps']} | {r['top1']:.2f} | {r['top5']:.2f} |")


if __name__ == "__main__":
    main()
