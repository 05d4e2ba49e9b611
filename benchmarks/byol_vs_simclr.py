"""BYOL beside SimCLR under the same wall-clock pre-training budget, default CPU config, linear probe.

The setting: Fashion-MNIST, 10 minutes of pre-training on a 2-core machine, BYOL's linear-probe
top-1 reported beside SimCLR's.

    python benchmarks/byol_vs_simclr.py                # short: embedded sample, 2 minutes each
    python benchmarks/byol_vs_simclr.py --full         # Fashion-MNIST, 10 minutes each
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from byol_common import add_common_args, machine_note, markdown_table, pretrain_and_probe, random_init_probe  # noqa: E402

SHORT = {"dataset": "embedded", "minutes": 2.0}
FULL = {"dataset": "fashion-mnist", "minutes": 10.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--dataset")
    ap.add_argument("--minutes", type=float)
    ap.add_argument("--methods", default="byol,simclr")
    ap.add_argument("--steps", help="fixed step counts instead of --minutes, e.g. byol=750,simclr=1000 (the steps "
                    "each method reaches in the CPU budget, to rerun the comparison on a faster device)")
    add_common_args(ap, "runs/bench_byol_vs_simclr")
    args = ap.parse_args(argv)
    from selfsup.training.config_io import merge, parse_overrides

    preset = dict(FULL if args.full else SHORT)
    for k in ("dataset", "minutes"):
        if getattr(args, k) is not None:
            preset[k] = getattr(args, k)
    print(f"[byol_vs_simclr] {preset} {args.overrides}; {machine_note()}", flush=True)
    steps = dict(kv.split("=") for kv in args.steps.split(",")) if args.steps else {}
    rows = []
    for method in args.methods.split(","):
        length = {"steps": int(steps[method])} if method in steps else {"minutes": preset["minutes"]}
        layer = merge({"method": method, "dataset": preset["dataset"], **length, "seed": args.seed,
                       "checkpoint_every": 10**9}, parse_overrides(args.overrides))
        r = pretrain_and_probe(layer, args.out / method, reuse=args.reuse)
        rows.append(r)
        print(json.dumps({k: r[k] for k in ("method", "steps", "images_seen", "linear_top1", "final_loss",
                                             "train_seconds", "images_per_sec")}), flush=True)
    print()
    print(markdown_table(rows, [("method", "method"), ("steps", "steps"), ("images_seen", "images"),
                                ("linear_top1", "linear top-1 %"), ("train_seconds", "train s"),
                                ("images_per_sec", "img/s")]))
    floor = random_init_probe(preset["dataset"], rows[0]["layer"].get("backbone_width"), args.seed)
    print(f"\nreference: the untrained encoder (seed {args.seed}) gives {floor:.2f}% linear top-1")
    (args.out / "summary.json").write_text(json.dumps({"preset": preset, "rows": rows, "untrained_top1": floor}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
