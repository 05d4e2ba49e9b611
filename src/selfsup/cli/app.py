"""Command line: ``selfsup pretrain | eval | demo`` (also ``python -m selfsup``).

Errors a user can fix (missing data, bad config, incompatible checkpoint) are printed as one line
naming the problem and the fix, with exit status 2, never as a traceback from inside torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from selfsup import __version__
from selfsup.analyze import add_parser as add_analyze_parser
from selfsup.artifacts.report import write_markdown_report
from selfsup.cli.artifacts import add_parsers as add_artifact_parsers
from selfsup.cli.prepare import add_parser as add_prepare_parser
from selfsup.cli.semisup import add_parsers as add_semisup_parsers
from selfsup.data.builtin import fashion_mnist_available
from selfsup.distributed import report_to_launcher
from selfsup.errors import CheckpointError, ConfigError, DataError, DataNotFoundError, TrainingError
from selfsup.protocols.eval_run import evaluate
from selfsup.protocols.linear_sgd import LinearSGDConfig
from selfsup.methods import METHODS
from selfsup.methods.recipes import RECIPES
from selfsup.training.config import PretrainConfig, migrate_saved
from selfsup.training.config_io import build_config, load_yaml, parse_overrides
from selfsup.training.dryrun import render
from selfsup.training.loop import pretrain
from selfsup.training.setup import check_run_folder, run_started

USER_ERRORS: tuple[type[BaseException], ...] = ()


def _user_errors() -> tuple[type[BaseException], ...]:
    return (ConfigError, DataNotFoundError, DataError, CheckpointError, TrainingError)


# ------------------------------------------------------------------------------------------------
# pretrain


def _add_length_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, help="number of passes over the data")
    g.add_argument("--steps", type=int, help="number of optimiser steps")
    g.add_argument("--minutes", type=float, help="wall-clock budget; the step count is fixed after timing the first steps")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file of config keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set optim.lr=0.5 (repeatable)")


def _pretrain_config(args, **defaults):
    cli = dict(defaults)
    for key in ("method", "recipe", "dataset", "data_dir", "backbone", "batch_size", "epochs", "steps", "minutes", "seed",
                "checkpoint_every", "on_bad_image", "init", "logger"):
        v = getattr(args, key, None)
        if v is not None:
            cli[key] = str(v) if key == "data_dir" else v
    file_layer = load_yaml(args.config) if getattr(args, "config", None) else {}
    return build_config(PretrainConfig, file_layer, cli, parse_overrides(args.overrides))


def cmd_pretrain(args) -> int:
    if args.resume is not None:
        check_run_folder(Path(args.resume), resume=True)  # before reading its config or any data
    if getattr(args, "dry_run", False) and args.resume is None:
        print(render(_pretrain_config(args)), end="")  # resolved and checked; no pixels read, nothing built
        return 0
    if args.out is None and args.resume is None:
        raise _config_error("--out: give the run folder (e.g. --out runs/simclr-fmnist)")
    if args.resume is not None and args.out is not None and Path(args.resume).resolve() != Path(args.out).resolve():
        raise _config_error(f"--resume {args.resume} and --out {args.out} name different folders; resume writes into the run it continues")
    saved = Path(args.resume or ".") / "config.yaml"
    if args.resume is not None and args.config is None and saved.is_file():
        layer = migrate_saved(load_yaml(saved))
        if "recipe" not in layer:  # written before recipes: made with today's CPU default values, all recorded
            layer.update(recipe="cpu", small_stem=layer.get("small_stem"))
        if any(getattr(args, k) is not None for k in ("epochs", "steps", "minutes")):
            for k in ("epochs", "steps", "minutes"):  # a length given on resume replaces the run's (extends it)
                layer.pop(k, None)
        cfg = _pretrain_config(args, **layer)  # a bare --resume RUN_DIR continues with the run's settings
    else:
        cfg = _pretrain_config(args)
    run_dir = Path(args.resume or args.out)
    if getattr(args, "dry_run", False):
        print(render(cfg), end="")
        return 0
    final = pretrain(cfg, run_dir, resume=args.resume is not None, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the job, not one per rank
        print(json.dumps({"run": str(run_dir), "weights": str(final)}))
    return 0


def _config_error(msg: str):
    return ConfigError(msg)


# ------------------------------------------------------------------------------------------------
# eval


def run_eval(kind: str, run_dir: str | Path | None, dataset: str | None = None, data_dir: str | None = None,
             batch_size: int | None = None, device: str = "auto", k: int = 200, temperature: float = 0.1,
             progress: bool = False, **protocol) -> dict:
    """Evaluate a run's frozen encoder (or ``baseline=...`` beside it); see ``selfsup.protocols.eval_run.evaluate``.

    Writes ``RUN_DIR/eval_{kind}.json`` (``eval_linear_sgd.json``, ``eval_{kind}_{baseline}.json``) and
    returns the result.
    """
    return evaluate(kind, run_dir, dataset, data_dir, batch_size, device, k, temperature, progress, **protocol)


def cmd_eval(args) -> int:
    sgd = None
    if args.protocol == "linear" and args.linear_protocol == "sgd":
        try:
            given = {"epochs": args.epochs, "batch_size": args.batch_size}
            sgd = LinearSGDConfig(lr=args.lr, seed=args.seed, **{k: v for k, v in given.items() if v is not None})
        except ValueError as e:
            raise _config_error(str(e)) from None
    elif args.protocol == "knn" and args.linear_protocol != "logreg":
        raise _config_error("--protocol sgd is a linear protocol; use selfsup eval linear --protocol sgd")
    elif args.epochs is not None or args.lr is not None:
        raise _config_error("--epochs and --lr belong to the SGD linear protocol; add --protocol sgd")
    result = run_eval(args.protocol, args.run, args.dataset, args.data_dir, args.batch_size, args.device,
                      args.k, args.temperature, progress=not args.no_progress, baseline=args.baseline,
                      linear_protocol=args.linear_protocol, solver=args.solver, sgd=sgd, seed=args.seed, out=args.out,
                      on_bad_image=args.on_bad_image)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------
# demo


# The demo's evaluations (linear probe, kNN, raw-pixel probe on full Fashion-MNIST) cost about 120 + 55
# + 100 training steps of its run (benchmarks/probe_agreement.py prints the first two); with a margin.
DEMO_EVAL_STEPS = 330


def cmd_demo(args) -> int:
    dataset = "fashion-mnist" if fashion_mnist_available(args.data_dir) else "embedded"
    if dataset == "embedded":
        print("[selfsup] Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist); "
              "using the embedded 10,000-image sample", file=sys.stderr)
    # --minutes is the whole demo: pre-training stops early enough for the three evaluations after it,
    # whose cost is measured in training steps (so the split holds on slow and fast CPUs alike)
    layer = {"method": "simclr", "dataset": dataset, "minutes": args.minutes,
             "minutes_reserve_steps": DEMO_EVAL_STEPS if dataset == "fashion-mnist" else DEMO_EVAL_STEPS // 6}
    if args.data_dir:
        layer["data_dir"] = str(args.data_dir)
    cfg = build_config(PretrainConfig, layer, parse_overrides(args.overrides))
    run_dir = Path(args.out)
    resume = args.resume and run_dir.is_dir() and run_started(run_dir)
    pretrain(cfg, run_dir, resume=resume, progress=not args.no_progress)
    lin = run_eval("linear", run_dir, progress=not args.no_progress)
    knn = run_eval("knn", run_dir, progress=not args.no_progress)
    pixels = run_eval("linear", run_dir, progress=not args.no_progress, baseline="pixels")  # what pre-training added
    report = write_markdown_report(run_dir)
    print(f"[selfsup] demo finished: linear top-1 {lin['top1']:.2f}%, kNN top-1 {knn['top1']:.2f}% on {dataset} "
          f"(raw pixels, same linear probe: {pixels['top1']:.2f}%); report: {report}", file=sys.stderr)
    print(json.dumps({"run": str(run_dir), "dataset": dataset, "linear_top1": lin["top1"], "linear_top5": lin["top5"],
                      "knn_top1": knn["top1"], "knn_top5": knn["top5"], "pixels_linear_top1": pixels["top1"],
                      "report": str(report)}))
    return 0


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfsup", description="Self-supervised visual representation learning "
                                     "(SimCLR, SimCLRv2, BYOL).")
    parser.add_argument("--version", action="version", version=f"selfsup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train an encoder without labels")
    p.add_argument("--method", help=f"{', '.join(METHODS)} (default simclr); the method's own keys are set as "
                   "--set METHOD.KEY=VALUE")
    p.add_argument("--recipe", help=f"{', '.join(RECIPES)} (default: chosen from the encoder and image size; "
                   "keys given explicitly still win)")
    p.add_argument("--dataset", help="fashion-mnist, mnist, cifar10, cifar100, stl10, embedded, imagefolder:PATH, store:PATH "
                   "(made by selfsup prepare) or hf:PATH "
                   "(a Hugging Face data set saved with save_to_disk)")
    p.add_argument("--data-dir", help="where data sets live (else $SELFSUP_DATA)")
    p.add_argument("--backbone", help="encoder name from the registry")
    p.add_argument("--out", help="run folder to create")
    _add_length_args(p)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, help="seed of the weights, data order and views (default 0)")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--on-bad-image", choices=("error", "skip"),
                   help="image folders: error (default; name bad files before training) or skip (leave them out, counted)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR")
    p.add_argument("--init", metavar="SOURCE", help="start the encoder from weights: .safetensors, a torchvision/timm "
                   ".pt/.pth state dict, or a run folder (not re-applied on --resume)")
    p.add_argument("--logger", metavar="LIST", help="experiment trackers besides metrics.jsonl, comma-separated: "
                   "tensorboard (default), csv, wandb, mlflow")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve and check the config, print it as YAML with the effective lr and steps, and exit")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="evaluate a run's frozen encoder (or a baseline) by kNN or a linear probe")
    p.add_argument("protocol", choices=("knn", "linear"))
    p.add_argument("--run", help="run folder (required unless --baseline is given)")
    p.add_argument("--baseline", choices=("pixels", "random-init"),
                   help="evaluate raw pixels, or the encoder of --run (else the default config's) at random "
                        "initialisation, with the same protocol; written beside the run as eval_KIND_BASELINE.json")
    p.add_argument("--dataset", help="labelled data set (default: the run's, else fashion-mnist)")
    p.add_argument("--data-dir", help="where data sets live (else $SELFSUP_DATA)")
    p.add_argument("--protocol", dest="linear_protocol", choices=("logreg", "sgd"), default="logreg",
                   help="linear: logreg (default; logistic regression on frozen features, C chosen on a held-out 10%%) "
                        "or sgd (the papers' protocol: SGD on crop+flip views of the frozen encoder)")
    p.add_argument("--solver", choices=("auto", "sklearn", "torch"), default="auto",
                   help="logreg solver: auto or torch (the default: every C of the search at once, float32, CPU or GPU) "
                        "or sklearn (scikit-learn's LogisticRegression one C at a time: the reference; same "
                        "objective and stopping rule)")
    p.add_argument("--epochs", type=float, help="--protocol sgd: epochs (default 90, SimCLR B.6)")
    p.add_argument("--lr", type=float, help="--protocol sgd: learning rate (default 0.1 x batch size / 256)")
    p.add_argument("--batch-size", type=int, help="feature-extraction batch (default 512); --protocol sgd: the "
                                                  "training batch (default 1024, BYOL C.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split / SGD run (and of the held-out "
                   "part of the training images when the data set has no test split)")
    p.add_argument("--on-bad-image", choices=("error", "skip"),
                   help="image folders: error or skip bad files (default: the run's own policy)")
    p.add_argument("--out", help="write the result JSON here (default: into the run folder)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--k", type=int, default=200, help="kNN neighbours (default 200)")
    p.add_argument("--temperature", type=float, default=0.1, help="kNN temperature (default 0.1)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="pre-train SimCLR on Fashion-MNIST (or the embedded sample), evaluate, report")
    p.add_argument("--minutes", type=float, default=9.0,
                   help="the whole demo's budget (default 9): pre-training stops in time for the evaluations after it")
    p.add_argument("--out", default="runs/demo", help="run folder of the demo (default runs/demo)")
    p.add_argument("--data-dir", help="where data sets live (else $SELFSUP_DATA)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key of the demo's pre-training run (repeatable)")
    p.set_defaults(func=cmd_demo)


    add_semisup_parsers(sub)


    add_analyze_parser(sub)


    add_artifact_parsers(sub)


    add_prepare_parser(sub)
    return parser


def _report_to_launcher(e: BaseException) -> None:
    """Under torchrun, make this rank's error the one its end-of-job summary shows (docs/how-to/distributed.md)."""
    report_to_launcher(e)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        _report_to_launcher(e)
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        _report_to_launcher(e)
        raise
    except KeyboardInterrupt:
        print("selfsup: interrupted; resume with --resume RUN_DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
