"""BYOL's collapse ablation, in kind (BYOL Table 5): the predictor and the slow EMA target matter.

Runs the full method and its ablations for the same number of steps and linear-probes each:

    full            predictor, byol.base_tau 0.996 (cosine-annealed to 1)
    no_predictor    --set byol.predictor=false             (Table 5b)
    no_ema          --set byol.base_tau=0: target = online (Table 5a, "stop gradient of online")
    fixed_target    --set byol.base_tau=1: fixed target    (Table 5a, "constant random network")

Expected: without the predictor or with byol.base_tau=0 the monitor reports collapse (collapse_std
falls towards 0 and the CollapseWarning fires) and the linear probe falls well below the full
method; the fixed random target does not collapse but learns less.

    python benchmarks/byol_collapse.py           # short: embedded sample, 1/16-width ResNet-18
    python benchmarks/byol_collapse.py --full    # Fashion-MNIST, CPU default backbone, 5 epochs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from byol_common import add_common_args, machine_note, markdown_table, pretrain_and_probe, random_init_probe  # noqa: E402

VARIANTS = {
    "full": {},
    "no_predictor": {"byol": {"predictor": False}},
    "no_ema": {"byol": {"base_tau": 0.0}},
    "fixed_target": {"byol": {"base_tau": 1.0}},
}
SHORT = {"dataset": "embedded", "epochs": 1.0, "backbone_width": 0.0625, "batch_size": 64}
FULL = {"dataset": "fashion-mnist", "epochs": 5.0, "backbone_width": None, "batch_size": 256}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--dataset")
    ap.add_argument("--epochs", type=float)
    ap.add_argument("--backbone-width", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    add_common_args(ap, "runs/bench_byol_collapse")
    args = ap.parse_args(argv)
    from selfsup.training.config_io import merge, parse_overrides
    preset = dict(FULL if args.full else SHORT)
    for k in ("dataset", "epochs", "backbone_width", "batch_size"):
        if getattr(args, k) is not None:
            preset[k] = getattr(args, k)
    print(f"[byol_collapse] {preset}; {machine_note()}", flush=True)
    rows = []
    for name in args.variants.split(","):
        layer = {"method": "byol", "dataset": preset["dataset"], "epochs": preset["epochs"],
                 "batch_size": preset["batch_size"], "seed": args.seed, "knn_monitor": False, "log_every": 10,
                 "checkpoint_every": 10**9, **VARIANTS[name]}
        if preset["backbone_width"] is not None:
            layer["backbone_width"] = preset["backbone_width"]
        layer = merge(layer, parse_overrides(args.overrides))
        r = {"variant": name, **pretrain_and_probe(layer, args.out / name, reuse=args.reuse)}
        rows.append(r)
        print(json.dumps({k: r[k] for k in ("variant", "steps", "linear_top1", "final_loss", "final_collapse_std",
                                             "collapse_warning", "collapse_warning_step", "train_seconds")}), flush=True)
    print()
    print(markdown_table(rows, [("variant", "variant"), ("steps", "steps"), ("linear_top1", "linear top-1 %"),
                                ("final_loss", "final loss"), ("final_collapse_std", "final collapse_std"),
                                ("collapse_threshold_abs", "threshold"), ("collapse_warning_step", "warned at step")]))
    floor = random_init_probe(preset["dataset"], preset["backbone_width"], args.seed)
    print(f"\nreference: the untrained encoder (seed {args.seed}) gives {floor:.2f}% linear top-1")
    (args.out / "summary.json").write_text(json.dumps({"preset": preset, "rows": rows, "untrained_top1": floor}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
