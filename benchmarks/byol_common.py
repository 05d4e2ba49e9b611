"""Shared helper of the BYOL benchmarks: pre-train one config, then linear-probe its frozen encoder.

Each run writes a normal run folder (config.yaml, metrics.jsonl, model.safetensors, eval_linear.json),
so every figure can be rechecked with ``selfsup eval linear --run RUN_DIR``.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import torch

from cells import markdown_table  # noqa: F401  (the BYOL benchmarks import it from here)


def add_common_args(ap, out_default: str) -> None:
    """The options every BYOL benchmark takes: --seed, --set KEY=VALUE, --out, --reuse."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config key for every run (e.g. device=cuda)")
    ap.add_argument("--out", type=Path, default=Path(out_default))
    ap.add_argument("--reuse", action="store_true", help="read back runs in --out with the same config instead "
                    "of retraining (only valid if the code did not change in between)")


def machine_note() -> str:
    """Threads and load average at the time of measuring (the CPU is shared)."""
    try:
        load = os.getloadavg()
        load_s = f"load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"
    except OSError:
        load_s = "load average n/a"
    return f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, {load_s}"


def pretrain_and_probe(layer: dict, run_dir: Path, reuse: bool = False) -> dict:
    """Pre-train ``layer`` (config keys, method defaults applied) into ``run_dir``, linear-probe it.

    Returns the linear top-1, the last logged loss and collapse_std, whether the collapse warning
    fired, and timings. With ``reuse`` a finished run of the same config in ``run_dir`` is read back
    instead of being trained again (so an interrupted benchmark can be resumed cheaply); the caller
    must know the code did not change in between.
    """
    from selfsup.cli.app import run_eval
    from selfsup.methods.collapse import CollapseWarning
    from selfsup.training.config import PretrainConfig
    from selfsup.training.config_io import build_config
    from selfsup.training.loop import pretrain

    run_dir = Path(run_dir)
    result_path = run_dir / "benchmark_result.json"
    if reuse and result_path.is_file():
        old = json.loads(result_path.read_text())
        if old.get("layer") == layer:
            return old
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cfg = build_config(PretrainConfig, layer)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CollapseWarning)
        pretrain(cfg, run_dir, progress=False)
    train_s = time.perf_counter() - t0
    collapse_warned = any(issubclass(w.category, CollapseWarning) for w in caught)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    last = steps[-1] if steps else {}
    t1 = time.perf_counter()
    lin = run_eval("linear", run_dir)
    eval_s = time.perf_counter() - t1
    summary = json.loads((run_dir / "train_summary.json").read_text())
    run_info = json.loads((run_dir / "run.json").read_text())
    result = {
        "run": str(run_dir), "method": cfg.method, "batch_size": cfg.batch_size, "steps": summary["steps"],
        "images_seen": summary["steps"] * cfg.batch_size, "linear_top1": lin["top1"], "final_loss": last.get("loss"),
        "final_collapse_std": last.get("collapse_std"), "collapse_warning": collapse_warned,
        "collapse_warning_step": summary.get("collapse_warning_step"),
        "collapse_threshold_abs": cfg.collapse_threshold / cfg.section.proj_out_dim ** 0.5,
        "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "images_per_sec": round(summary["steps"] * cfg.batch_size / max(summary["train_seconds_this_session"], 1e-9), 1),
        "feature_dim": lin.get("feature_dim"), "backbone": cfg.backbone,
        "precision": run_info.get("precision"), "machine": machine_note(), "layer": layer,
    }
    result_path.write_text(json.dumps(result, indent=1))
    return result


def random_init_probe(dataset: str, backbone_width: float | None, seed: int = 0) -> float:
    """Linear-probe top-1 of the untrained default backbone (the floor pre-training must beat)."""
    from selfsup.models.backbones import CPU_DEFAULT_BACKBONE, build_backbone
    from selfsup.data.datasets import load_dataset
    from selfsup.evaluation.frozen import extract_features, linear_eval

    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    torch.manual_seed(seed)
    kw = {} if backbone_width is None else {"width": backbone_width}
    enc = build_backbone(CPU_DEFAULT_BACKBONE, in_channels=train.num_channels, image_size=train.image_size, **kw)
    ftr, ytr = extract_features(enc, train, "cpu", train.image_size)
    fte, yte = extract_features(enc, test, "cpu", train.image_size)
    return linear_eval(ftr, ytr, fte, yte, train.num_classes)["top1"]
