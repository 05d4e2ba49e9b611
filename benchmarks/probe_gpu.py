"""The linear probe on a GPU: a run's evaluation, and feature sets of ResNet-50 and wide-encoder size.

Prints, for each case, the wall time, the peak GPU memory beside the size of the float32 features
(the probe keeps one float32 copy of them on the device and reads it in row chunks, so the peak
stays close to that size), the chosen C, iterations and whether every fit converged.

    python benchmarks/probe_gpu.py --run runs/simclr --data-dir DATA       # selfsup eval linear/knn --device cuda
    python benchmarks/probe_gpu.py --synthetic 1281167x2048x1000 --c 0.1    # one fit at ImageNet size
    python benchmarks/probe_gpu.py --synthetic 200000x8192x10               # a whole C search, wide features
"""
from __future__ import annotations

import argparse
import json
import time

import torch

DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def synthetic(n: int, dim: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian classes in a random low-rank-plus-noise geometry, made on the GPU (no host copy)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    y = torch.randint(0, classes, (n,), device=DEVICE, generator=g)
    means = torch.randn(classes, 64, device=DEVICE, generator=g)
    mix = torch.randn(64, dim, device=DEVICE, generator=g) / 8
    x = torch.randn(n, dim, device=DEVICE, generator=g)
    x += (0.4 * means[y] + 0.5 * torch.randn(n, 64, device=DEVICE, generator=g)) @ mix
    return x, y


def run_synthetic(spec: str, c: float | None) -> dict:
    from selfsup.evaluation.linear_probe import select_and_fit

    n, dim, classes = (int(v) for v in spec.split("x"))
    x, y = synthetic(n, dim, classes)
    x = (x - x.mean(0)) / x.std(0)
    sync()
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    grid = (c,) if c is not None else (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    probe = select_and_fit(x, y.cpu(), classes, c_grid=grid, device=DEVICE)
    sync()
    rec = probe.record
    return {"case": f"synthetic {n} x {dim}, {classes} classes", "seconds": round(time.perf_counter() - t0, 1),
            "features_gib": round(x.numel() * 4 / 2**30, 2),
            "peak_extra_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2) if cuda else None,
            "C": rec["C"], "val_iterations": rec["val_iterations"], "iterations": rec["iterations"],
            "converged": rec["converged"], "train_top1": round(rec["train_top1"], 2)}


def run_eval(run_dir: str, data_dir: str | None) -> list[dict]:
    from selfsup.protocols.eval_run import evaluate

    out = []
    for kind in ("linear", "knn"):
        sync()
        t0 = time.perf_counter()
        res = evaluate(kind, run_dir, data_dir=data_dir, device=DEVICE, out=f"/tmp/probe_gpu_{kind}.json")
        out.append({"case": f"selfsup eval {kind} --device cuda on {run_dir}", "seconds": round(time.perf_counter() - t0, 1),
                    "top1": round(res["top1"], 2), "C": res.get("C"), "converged": res.get("converged"),
                    "solver": res.get("solver")})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run")
    p.add_argument("--data-dir")
    p.add_argument("--synthetic", action="append", default=[], metavar="NxDxK")
    p.add_argument("--c", type=float, help="with --synthetic: fit this C only (no search)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    print(torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE, "torch", torch.__version__, flush=True)
    results = run_eval(args.run, args.data_dir) if args.run else []
    for r in results:
        print(json.dumps(r), flush=True)
    for spec in args.synthetic:
        results.append(run_synthetic(spec, args.c))
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
