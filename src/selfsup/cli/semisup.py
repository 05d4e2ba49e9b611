"""``selfsup finetune`` and ``selfsup distill`` (SimCLRv2's semi-supervised steps), added to the CLI's parser.

Both print their results (top-1/top-5 on the test split) as one JSON line, the last line of stdout,
and write it to ``RUN_DIR/results.json``. Configuration: command-line flags, ``--config FILE.yaml``
and ``--set key=value`` (later wins); the resolved config is saved as ``RUN_DIR/config.yaml``.

Under torchrun, put ``--`` before the subcommand (``torchrun --nproc_per_node 2 -m selfsup -- finetune
--run ...``): torchrun's own parser would otherwise take ``--run`` for an abbreviation of ``--run-path``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from selfsup.errors import ConfigError
from selfsup.protocols.distill import DistillConfig, distill
from selfsup.protocols.finetune import SCRATCH_OPTIM, FinetuneConfig, crop_flip_view, finetune
from selfsup.training.config_io import build_config, load_yaml, merge, parse_overrides, to_dict


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR")
    p.add_argument("--data-dir", help="where data sets live (else $SELFSUP_DATA)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, help="passes over the (labeled / unlabeled) training images")
    g.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, help="seed of the run's weights, data order and views")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--config", type=Path, help="YAML file of config keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set optim.lr=0.01 (repeatable)")


def add_parsers(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pre-trained encoder (from a head layer) on a label subset",
                       description="SimCLRv2 fine-tuning: backbone + first K projection-head layers + a new linear "
                       "classifier, on a class-balanced seeded label subset; without --run, the same network from scratch.")
    p.add_argument("--run", help="pre-training run folder (omit to train from scratch)")
    p.add_argument("--dataset", help="labeled data set (default: the pre-training run's)")
    p.add_argument("--label-fraction", type=float, help="share of the training labels used, e.g. 0.01 or 0.1 (default 0.1)")
    p.add_argument("--label-seed", type=int, help="seed of the label subset (default 0)")
    p.add_argument("--label-subset", metavar="FILE",
                   help="label_subset.json of another run, or an official list (one file name per line, e.g. the 1%%/10%% "
                   "ImageNet files; image folders), to use exactly its images")
    p.add_argument("--label-balance", choices=("equal", "proportional"),
                   help="equal (default): the same number of images per class, as the papers' lists; proportional: "
                   "fraction x each class's count")
    p.add_argument("--from-head-layer", type=int, metavar="K",
                   help="0: classifier on the backbone output; K: on the K-th head layer (default 1 with a head)")
    p.add_argument("--backbone", help="encoder to train from scratch (only without --run)")
    _common(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("distill", help="distill a fine-tuned teacher into a student on unlabeled images",
                       description="SimCLRv2 distillation: the frozen teacher labels every training image; the "
                       "student minimises the cross-entropy to its temperature-scaled predictions.")
    for flag, kind, text in (
        ("--teacher", str, "fine-tuning run folder (selfsup finetune --out)"),
        ("--student", str, "student backbone (default: the teacher's, i.e. self-distillation)"),
        ("--student-width", float, "width multiplier of the student backbone"),
        ("--student-init", str, "pre-training run whose backbone initialises the student"),
        ("--dataset", str, "unlabeled images: this data set's training split (default: the teacher's)"),
        ("--temperature", float, "default 0.1 for self-distillation, else 1.0 (paper)"),
    ):
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--labeled-weight", type=float, metavar="A",
                   help="add A x cross-entropy on the teacher's label subset (default 0)")
    _common(p)
    p.set_defaults(func=cmd_distill)


def _build(cls, args, keys: dict[str, str], base: dict, complete=None):
    if args.out is None and args.resume is None:
        raise ConfigError("--out: give the run folder to create (e.g. --out runs/finetune-1pct)")
    if args.resume is not None and args.out is not None and Path(args.resume).resolve() != Path(args.out).resolve():
        raise ConfigError(f"--resume {args.resume} and --out {args.out} name different folders; "
                          "resume writes into the run it continues")
    layers = [base]
    if args.resume is not None:  # the interrupted run's settings, then anything given now (checked on resume)
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml; is this a selfsup run folder?")
        layers.append(load_yaml(saved))
    if args.config:
        layers.append(load_yaml(args.config))
    cli = {}
    for attr, key in keys.items():
        v = getattr(args, attr, None)
        if v is not None:
            cli[key] = v
    layers += [cli, parse_overrides(args.overrides)]
    data: dict = {}
    for layer in layers:
        data = merge(data, layer)
    cfg = build_config(cls, complete(data) if complete else data)
    return cfg, Path(args.resume or args.out)


_COMMON_KEYS = {"data_dir": "data_dir", "epochs": "epochs", "steps": "steps", "batch_size": "batch_size",
                "seed": "seed", "device": "device"}


def cmd_finetune(args) -> int:
    keys = {"run": "run", "dataset": "dataset", "label_fraction": "label_fraction", "label_seed": "label_seed",
            "label_subset": "label_subset", "label_balance": "label_balance", "from_head_layer": "from_head_layer", "backbone": "backbone", **_COMMON_KEYS}
    def complete(data: dict) -> dict:
        # Keys given under optim.* complete the recipe of this kind of run (from scratch: SCRATCH_OPTIM).
        if data.get("run") is None and isinstance(data.get("optim"), dict):
            data["optim"] = merge(to_dict(SCRATCH_OPTIM), data["optim"])
        if args.resume is not None:  # a run from before fine-tuning recipes resumes with the values it had
            data.setdefault("recipe", None)
        return data

    cfg, run_dir = _build(FinetuneConfig, args, keys, {"view": to_dict(crop_flip_view())}, complete)
    result = finetune(cfg, run_dir, resume=args.resume is not None, progress=not args.no_progress)
    _print_result(result)
    return 0


def cmd_distill(args) -> int:
    keys = {"teacher": "teacher", "student": "student", "student_width": "student_width",
            "student_init": "student_init", "dataset": "dataset", "temperature": "temperature",
            "labeled_weight": "labeled_weight", **_COMMON_KEYS}
    cfg, run_dir = _build(DistillConfig, args, keys, {"view": to_dict(crop_flip_view())})
    result = distill(cfg, run_dir, resume=args.resume is not None, progress=not args.no_progress)
    _print_result(result)
    return 0


def _print_result(result: dict) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, only rank 0 evaluates and reports
        print(json.dumps(result))
