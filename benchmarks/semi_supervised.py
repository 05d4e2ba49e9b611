"""SimCLRv2's semi-supervised table, in kind (Chen et al. 2020b, Table 3 / Figure 1): top-1 on the test
split with 1% and 10% of the labels for

    (a) the same network trained from scratch on the labeled subset only,
    (b) SimCLRv2 pre-training (3-layer head) fine-tuned from head layer 0 (the backbone output),
    (c) ... fine-tuned from head layer 1 (the paper's choice),
    (d) a smaller student distilled from (c) on every training image (T = 1),
    (e) a student of the same architecture, initialised from its own pre-training, self-distilled from (c) (T = 0.1).

Paper, in kind: (b) and (c) clearly above (a); (c) >= (b) at 1%; (e) >= (c).

    # short version (minutes, fits a shared 2-core CPU): short pre-training and short fine-tunes
    python benchmarks/semi_supervised.py --budget short
    # medium: the demo's 8 minutes of pre-training, 150-step fine-tunes and distillations
    python benchmarks/semi_supervised.py --budget medium
    # ten: the 10-minute pre-training of the CPU target run, the paper's fine-tuning epochs, 1 distillation epoch
    python benchmarks/semi_supervised.py --budget ten
    # the full budget: 60 minutes of pre-training, the paper's fine-tuning epochs, 10 distillation epochs
    python benchmarks/semi_supervised.py --budget full [--device cuda]

Every run is an ordinary run folder under --out (reused when its results.json exists, so an interrupted
benchmark continues where it stopped); the table is printed as markdown and written to OUT/table.md,
all numbers to OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from selfsup.models.backbones import CPU_DEFAULT_BACKBONE
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import build_config
from selfsup.protocols.distill import DistillConfig, distill
from selfsup.protocols.finetune import FinetuneConfig, finetune
from selfsup.training.loop import pretrain

BUDGETS = {
    # pretrain_minutes: SimCLRv2 pre-training wall-clock; finetune/distill: fixed step counts (None: the
    # paper's epochs for fine-tuning, distill_epochs for distillation).
    "short": {"pretrain_minutes": 3.0, "finetune_steps": 60, "distill_steps": 60, "distill_epochs": None,
              "batch_size": 128},
    "medium": {"pretrain_minutes": 8.0, "finetune_steps": 150, "distill_steps": 150, "distill_epochs": None,
               "batch_size": 128},
    # a 10-minute pre-training run, the paper's fine-tuning epochs, 1 distillation epoch
    "ten": {"pretrain_minutes": 10.0, "finetune_steps": None, "distill_steps": None, "distill_epochs": 1.0,
            "batch_size": 128},
    "full": {"pretrain_minutes": 60.0, "finetune_steps": None, "distill_steps": None, "distill_epochs": 10.0,
             "batch_size": 256},
}
ROWS = {
    "a": "(a) from scratch, labeled subset only",
    "b": "(b) SimCLRv2, fine-tuned from head layer 0",
    "c": "(c) SimCLRv2, fine-tuned from head layer 1",
    "d": "(d) distilled into a smaller student (width x1/2)",
    "e": "(e) self-distilled (same architecture)",
}


def machine_note() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def _run(kind: str, out: Path, fn, reuse: bool) -> dict:
    res_path = out / "results.json"
    if reuse and res_path.is_file():
        result = json.loads(res_path.read_text())
        print(f"[semi_supervised] reusing {out}", file=sys.stderr, flush=True)
        return result
    if out.exists():  # an interrupted run: continue it
        from selfsup.training.checkpoint import list_checkpoints

        resume = bool(list_checkpoints(out))
    else:
        resume = False
    t0 = time.perf_counter()
    result = fn(out, resume)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    res_path.write_text(json.dumps(result, indent=1))
    print(json.dumps({"run": kind, "top1": result.get("top1"), "top5": result.get("top5"),
                      "wall_seconds": result["wall_seconds"]}), flush=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="short")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--fractions", default="0.01,0.1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_semi_supervised"))
    ap.add_argument("--no-reuse", action="store_true", help="retrain runs whose results already exist")
    args = ap.parse_args(argv)
    budget = BUDGETS[args.budget]
    reuse = not args.no_reuse
    fractions = [float(f) for f in args.fractions.split(",")]
    out = args.out / args.budget
    out.mkdir(parents=True, exist_ok=True)
    started = machine_note()
    print(f"[semi_supervised] budget {args.budget} {budget}; {started}", file=sys.stderr, flush=True)
    t_all = time.perf_counter()
    common = {"seed": args.seed, "device": args.device, "log_every": 5, "checkpoint_every": 10**6}

    # SimCLRv2 pre-training: SimCLR with the 3-layer head (`selfsup pretrain --method simclrv2`).
    pre_dir = out / "pretrain"

    def run_pretrain(d: Path, resume: bool) -> dict:
        cfg = build_config(PretrainConfig, {"method": "simclrv2", "dataset": args.dataset, "seed": args.seed,
                                            "device": args.device, "minutes": budget["pretrain_minutes"],
                                            "knn_monitor": False, "checkpoint_every": 10**6})
        pretrain(cfg, d, resume=resume, progress=False)
        summary = json.loads((d / "run.json").read_text())
        return {"top1": None, "top5": None, "steps": summary["total_steps"], "run": str(d)}

    pre = _run("pretrain", pre_dir, run_pretrain, reuse)
    results: dict = {"pretrain": pre, "budget": args.budget, **{k: {} for k in ROWS}}

    for f in fractions:
        tag = f"{f:g}"
        ft = {"dataset": args.dataset, "label_fraction": f, "batch_size": budget["batch_size"],
              "steps": budget["finetune_steps"], **common}

        def run_ft(k: int | None):
            def go(d: Path, resume: bool) -> dict:
                extra = {"run": str(pre_dir), "from_head_layer": k} if k is not None else {"backbone": CPU_DEFAULT_BACKBONE}
                return finetune(FinetuneConfig(**ft, **extra), d, resume=resume, progress=False)
            return go

        results["b"][tag] = _run(f"b@{tag}", out / f"ft_k0_{tag}", run_ft(0), reuse)
        results["c"][tag] = _run(f"c@{tag}", out / f"ft_k1_{tag}", run_ft(1), reuse)
        results["a"][tag] = _run(f"a@{tag}", out / f"scratch_{tag}", run_ft(None), reuse)
        teacher = out / f"ft_k1_{tag}"
        dist_common = {"teacher": str(teacher), "batch_size": budget["batch_size"], "steps": budget["distill_steps"],
                       "epochs": budget["distill_epochs"], **common}

        def run_distill(**kw):
            def go(d: Path, resume: bool) -> dict:
                return distill(DistillConfig(**dist_common, **kw), d, resume=resume, progress=False)
            return go

        results["d"][tag] = _run(f"d@{tag}", out / f"distill_small_{tag}", run_distill(
            student=CPU_DEFAULT_BACKBONE, student_width=0.125), reuse)
        results["e"][tag] = _run(f"e@{tag}", out / f"distill_self_{tag}", run_distill(student_init=str(pre_dir)), reuse)

    results["machine_at_start"] = started
    results["machine_at_end"] = machine_note()
    results["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    header = "| run | " + " | ".join(f"{100 * f:g}% labels: top-1 (top-5)" for f in fractions) + " |"
    lines = [header, "|---|" + "---|" * len(fractions)]
    for key, title in ROWS.items():
        cells = []
        for f in fractions:
            r = results[key].get(f"{f:g}", {})
            cells.append(f"{r['top1']:.2f} ({r['top5']:.2f})" if r.get("top1") is not None else "-")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"[semi_supervised] done in {results['wall_seconds']:.0f} s; {results['machine_at_end']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
