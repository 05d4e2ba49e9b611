"""The command-line flags the studies share, and their defaults (see :mod:`selfsup.analyze.common`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from selfsup.data.builtin import fashion_mnist_available
from selfsup.errors import ConfigError
from selfsup.methods import METHODS
from selfsup.training.runs import load_run

# The studies' default encoder: ResNet-18 layout at 1/8 width (64-d h), about 4x cheaper than the
# CPU default ``resnet18_narrow`` at the same image size.
STUDY_BACKBONE = "resnet18"
STUDY_BACKBONE_WIDTH = 0.125
STUDY_IMAGE_SIZE = 16


def add_common_args(p: argparse.ArgumentParser, study: str, *, steps: int | None = 100, batch_size: int | None = 128,
                    train_images: int = 5000, test_images: int = 2000, trains: bool = True,
                    image_size: int = STUDY_IMAGE_SIZE, seeds: bool = False) -> None:
    """The flags every study shares; ``trains=False`` for studies that never pre-train (views)."""
    p.add_argument("--out", type=Path, default=Path("runs/analyze") / study,
                   help=f"study folder (default runs/analyze/{study}); rerunning into it reuses finished cells")
    p.add_argument("--dataset", help="fashion-mnist (default when installed, else the embedded sample), mnist, "
                   "cifar10, cifar100, stl10, embedded or imagefolder:PATH")
    p.add_argument("--data-dir", help="where data sets live (else $SELFSUP_DATA)")
    p.add_argument("--image-size", type=int, default=image_size,
                   help=f"side of the training/eval images (default {image_size or 'the data set'}; 0 = the data set's own)")
    p.add_argument("--seed", type=int, default=0, help="the first seed of the study's runs (default 0)")
    if not trains:
        return
    p.add_argument("--backbone", help=f"encoder from the registry (default {STUDY_BACKBONE} at width "
                   f"{STUDY_BACKBONE_WIDTH}, a 64-d h)")
    p.add_argument("--backbone-width", type=float, help="width multiplier of --backbone")
    if steps is not None:
        p.add_argument("--steps", type=int, default=steps, help=f"pre-training steps per run (default {steps})")
    if batch_size is not None:
        p.add_argument("--batch-size", type=int, default=batch_size, help=f"pre-training batch (default {batch_size})")
    p.add_argument("--train-images", type=int, default=train_images,
                   help=f"labelled training images for the linear probes (default {train_images})")
    p.add_argument("--test-images", type=int, default=test_images,
                   help=f"test images for the linear probes (default {test_images})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="pre-training config key for every run of the study, e.g. --set optim.lr=0.5 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars inside each pre-training")
    if seeds:
        p.add_argument("--seeds", type=int, default=1, help="pre-train every cell with this many seeds and report "
                       "the mean and spread (default 1)")


def default_dataset(data_dir: str | None) -> str:
    return "fashion-mnist" if fashion_mnist_available(data_dir) else "embedded"


def parse_methods(text: str | None) -> list[str]:
    """``--methods``: comma-separated registered methods; default SimCLR, plus BYOL once it is registered."""
    if text is None:
        return [m for m in ("simclr", "byol") if m in METHODS]
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"--methods: {bad or 'empty list'} not registered; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, help="a pre-training run folder to analyse (default: pre-train one into "
                   "OUT/pretrain with this study's --method, --steps and --batch-size)")
    p.add_argument("--method", default="simclr", help="method of the run pre-trained when --run is not given")


def adopt_run_settings(args: argparse.Namespace) -> None:
    """With ``--run``, analyse on the run's own data set and image size unless told otherwise."""
    if getattr(args, "run", None) is None:
        return
    run = load_run(args.run)
    if args.dataset is None:
        args.dataset = run.config.dataset
        args.data_dir = args.data_dir or run.config.data_dir
    args.image_size = run.image_size
    args.run = Path(args.run).resolve()
