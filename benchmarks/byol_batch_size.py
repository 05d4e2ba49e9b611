"""BYOL vs SimCLR batch-size robustness, in kind (BYOL Table 16).

Both methods are pre-trained for the same number of images at each batch size (lr scaled
linearly, lr x B/256, as in both papers), then linear-probed. BYOL has no negatives, so its
accuracy should drop less from the largest to the smallest batch than SimCLR's.

    # short version (minutes on a 2-core CPU): embedded sample, a 1/16-width ResNet-18
    python benchmarks/byol_batch_size.py
    # the full budget: Fashion-MNIST, CPU default backbone, 10 epochs at every batch size
    python benchmarks/byol_batch_size.py --full

Prints one line per run, then a markdown table and the drops; results land in --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from byol_common import add_common_args, machine_note, markdown_table, pretrain_and_probe, random_init_probe  # noqa: E402

SHORT = {"dataset": "embedded", "images": 10000, "backbone_width": 0.0625}
FULL = {"dataset": "fashion-mnist", "images": 600000, "backbone_width": None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="Fashion-MNIST, default backbone, 10 epochs per run")
    ap.add_argument("--dataset")
    ap.add_argument("--images", type=int, help="images seen by every run (steps = images // batch)")
    ap.add_argument("--backbone-width", type=float, help="width multiplier of the default backbone")
    ap.add_argument("--batch-sizes", default="32,64,128,256")
    ap.add_argument("--methods", default="byol,simclr")
    add_common_args(ap, "runs/bench_byol_batch")
    args = ap.parse_args(argv)
    from selfsup.training.config_io import merge, parse_overrides
    preset = dict(FULL if args.full else SHORT)
    for k in ("dataset", "images", "backbone_width"):
        if getattr(args, k) is not None:
            preset[k] = getattr(args, k)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    methods = args.methods.split(",")
    print(f"[byol_batch_size] {preset} batches={batches} methods={methods}; {machine_note()}", flush=True)

    rows = []
    for method in methods:
        for b in batches:
            layer = {"method": method, "dataset": preset["dataset"], "batch_size": b, "steps": preset["images"] // b,
                     "seed": args.seed, "knn_monitor": False, "log_every": 10, "checkpoint_every": 10**9}
            if preset["backbone_width"] is not None:
                layer["backbone_width"] = preset["backbone_width"]
            layer = merge(layer, parse_overrides(args.overrides))
            r = pretrain_and_probe(layer, args.out / f"{method}_b{b}", reuse=args.reuse)
            rows.append(r)
            print(json.dumps({k: r[k] for k in ("method", "batch_size", "steps", "linear_top1", "final_loss",
                                                 "final_collapse_std", "train_seconds", "images_per_sec")}), flush=True)

    print()
    print(markdown_table(rows, [("method", "method"), ("batch_size", "batch"), ("steps", "steps"),
                                ("linear_top1", "linear top-1 %"), ("final_loss", "final loss"),
                                ("train_seconds", "train s"), ("images_per_sec", "img/s")]))
    by = {(r["method"], r["batch_size"]): r["linear_top1"] for r in rows}
    lo, hi = min(batches), max(batches)
    drops = {m: by[(m, hi)] - by[(m, lo)] for m in methods if (m, hi) in by and (m, lo) in by}
    print()
    for m, d in drops.items():
        print(f"{m}: linear top-1 {by[(m, hi)]:.2f}% at batch {hi} -> {by[(m, lo)]:.2f}% at batch {lo} (drop {d:+.2f} points)")
    if {"byol", "simclr"} <= drops.keys():
        verdict = "yes" if drops["byol"] < drops["simclr"] else "no"
        print(f"BYOL drops less than SimCLR from {hi} to {lo}: {verdict}")
    floor = random_init_probe(preset["dataset"], preset["backbone_width"], args.seed)
    print(f"reference: the untrained encoder (seed {args.seed}) gives {floor:.2f}% linear top-1")
    (args.out / "summary.json").write_text(json.dumps({"preset": preset, "rows": rows, "drops": drops,
                                                       "untrained_top1": floor}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
