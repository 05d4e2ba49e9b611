"""Plumbing shared by the studies: settings, cached pre-training runs, features h and z, probes, figures.

A study writes everything into its ``--out`` folder: ``study.json`` (the settings; a rerun with other
settings into the same folder is refused, so finished cells are never mixed with cells of another
budget), one pre-training run folder per cell (reused when it already holds ``model.safetensors``),
the figures (PNG), the numbers (CSV / JSON) and ``summary.md``.

Budgets are deliberately tiny by default (minutes on a 2-core CPU): the default encoder is a
ResNet-18 at 1/8 width (8-16-32-64 channels, 64-d h) on 16 px images, and SimCLR uses the
square-root learning-rate rule (``SHORT_RUN_DEFAULTS``). ``--backbone``, ``--backbone-width``,
``--image-size``, ``--steps`` and ``--batch-size`` scale every study up; ``--set KEY=VALUE`` changes
any pre-training config key of every run.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from selfsup.artifacts.report import read_metrics
from selfsup.data.builtin import fashion_mnist_available
from selfsup.data.containers import InMemoryDataset
from selfsup.data.datasets import load_dataset
from selfsup.errors import ConfigError, CheckpointError
from selfsup.evaluation.frozen import extract_features, linear_eval
from selfsup.methods import METHODS
from selfsup.training import checkpoint as ckpt
from selfsup.training.build import build_model
from selfsup.training.config import PretrainConfig, build_config, parse_overrides, to_dict
from selfsup.training.loop import pretrain
from selfsup.training.runs import load_run
from selfsup.training.steps import resolve_device

# The studies' default encoder: ResNet-18 layout at 1/8 width (64-d h), about 4x cheaper than the
# CPU default ``resnet18_narrow`` at the same image size.
STUDY_BACKBONE = "resnet18"
STUDY_BACKBONE_WIDTH = 0.125
STUDY_IMAGE_SIZE = 16
STUDY_CHECKPOINT_EVERY = 10**9  # cells are short: only the final checkpoint is written
# Short runs at small batches: SimCLR's square-root learning-rate rule, lr = 0.075 x sqrt(B) (SimCLR
# Appendix B.1 recommends it for small batches and few epochs). Other methods keep their defaults;
# ``--set optim.lr=...`` overrides both.
SHORT_RUN_DEFAULTS: dict[str, dict] = {"simclr": {"optim": {"lr": 0.075, "lr_scaling": "sqrt"}}}


def log(msg: str) -> None:
    print(f"[selfsup analyze] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Arguments


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
    p.add_argument("--seed", type=int, default=0)
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


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"--{name.replace('_', '-')}: must be >= {minimum}, got {value}")


# ------------------------------------------------------------------------------------------------
# The study context


class StudyContext:
    """Settings of one study run and the helpers every study uses (see the module docstring)."""

    def __init__(self, study: str, args: argparse.Namespace, extra: dict[str, Any] | None = None):
        self.study = study
        self.args = args
        self.out = Path(args.out)
        self.data_dir = getattr(args, "data_dir", None)
        self.dataset = args.dataset or default_dataset(self.data_dir)
        self.seed = int(args.seed)
        self.image_size = int(args.image_size) if args.image_size else None
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"--image-size: must be >= 8 pixels (or 0 for the data set's own), got {args.image_size}")
        self.trains = hasattr(args, "train_images")
        self.overrides: dict = {}
        if self.trains:
            for name in ("steps", "batch_size", "train_images", "test_images", "seeds"):
                _positive(name, getattr(args, name, None))
            _positive("batch_size", getattr(args, "batch_size", None), 2)
            self.overrides = parse_overrides(args.overrides)
            if args.backbone is None:
                self.backbone, self.backbone_width = STUDY_BACKBONE, (args.backbone_width or STUDY_BACKBONE_WIDTH)
            else:
                self.backbone, self.backbone_width = args.backbone, args.backbone_width
            self.device = resolve_device(args.device)
        else:
            self.device = torch.device("cpu")
        self.settings = self._settings(extra or {})
        self._slices = None
        self._native_size: int | None = None
        self.t0 = time.perf_counter()

    # --- settings -----------------------------------------------------------------------------
    def _settings(self, extra: dict) -> dict:
        s: dict[str, Any] = {"study": self.study, "dataset": self.dataset, "image_size": self.image_size, "seed": self.seed}
        if self.trains:
            a = self.args
            s.update(backbone=self.backbone, backbone_width=self.backbone_width, train_images=a.train_images,
                     test_images=a.test_images, overrides=self.overrides)
            for key in ("steps", "batch_size"):
                if getattr(a, key, None) is not None:
                    s[key] = getattr(a, key)
            if (getattr(a, "seeds", 1) or 1) > 1:
                s["seeds"] = a.seeds  # only when > 1: folders of single-seed studies keep their settings
        s.update(extra)
        return json.loads(json.dumps(s))  # plain JSON types, comparable with a reloaded study.json

    def open(self) -> None:
        """Create ``--out`` and write ``study.json``; refuse a folder holding a study with other settings."""
        if self.trains:
            self.config({})  # bad flags fail here, before a study folder with their settings exists
        path = self.out / "study.json"
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = None
            if old is not None and old != self.settings:
                keys = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
                diff = ", ".join(f"{k}: {old.get(k)!r} there, {self.settings.get(k)!r} now" for k in keys)
                raise ConfigError(f"--out {self.out} holds a study with other settings ({diff}); rerun with the same "
                                  "flags to resume it, or choose a new --out")
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.settings, indent=1))

    # --- pre-training ---------------------------------------------------------------------------
    def base_layer(self) -> dict:
        a = self.args
        # The studies were measured with the CPU default's values (docs/results.md); --set recipe=NAME for another.
        layer = {"recipe": "cpu", "dataset": self.dataset, "backbone": self.backbone, "batch_size": getattr(a, "batch_size", None) or 256,
                 "steps": getattr(a, "steps", None) or 1, "seed": self.seed, "device": a.device, "knn_monitor": False, "checkpoint_every": STUDY_CHECKPOINT_EVERY,
                 "num_workers": 0, "log_every": 10}
        if self.backbone_width is not None:
            layer["backbone_width"] = self.backbone_width
        if self.image_size is not None:
            layer["image_size"] = self.image_size
        if self.data_dir:
            layer["data_dir"] = str(self.data_dir)
        return layer

    def config(self, layer: dict) -> PretrainConfig:
        """The pre-training config of one cell: study defaults < the cell's keys < ``--set``."""
        method = layer.get("method", self.overrides.get("method", PretrainConfig.method))
        return build_config(PretrainConfig, self.base_layer(), SHORT_RUN_DEFAULTS.get(method, {}), layer,
                            self.overrides)

    def pretrain(self, run_dir: Path, layer: dict) -> Path:
        """Pre-train one cell into ``run_dir``, or reuse it when it already finished; returns ``run_dir``."""
        run_dir = Path(run_dir)
        if (run_dir / "model.safetensors").is_file():
            return run_dir
        cfg = self.config(layer)
        resume = run_dir.is_dir() and bool(ckpt.list_checkpoints(run_dir))
        pretrain(cfg, run_dir, resume=resume, progress=not self.args.no_progress)
        return run_dir

    def run_cell(self, name: str, layer: dict, with_z: bool = True) -> dict:
        """Pre-train and linearly evaluate one cell, once per seed; with ``--seeds N`` the result is the
        mean over seeds ``--seed .. --seed + N - 1`` (pre-training seed; the probe slices stay fixed),
        with ``linear_h_std`` / ``linear_z_std`` (sample standard deviation) and the per-seed values."""
        n = int(getattr(self.args, "seeds", 1) or 1)
        if n == 1:
            return self._run_one(name, layer, with_z)
        runs = [self._run_one(name if k == 0 else f"{name}@seed{self.seed + k}", {**layer, "seed": self.seed + k}, with_z)
                for k in range(n)]
        out = dict(runs[0], cell=name, seconds=sum(r["seconds"] for r in runs), seeds=[self.seed + k for k in range(n)])
        for key in ("linear_h", "linear_z", "final_loss"):
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                out[key] = float(torch.tensor(values).mean())
                out[f"{key}_per_seed"] = values
                if key != "final_loss":
                    out[f"{key}_std"] = float(torch.tensor(values).std())
        return out

    def _run_one(self, name: str, layer: dict, with_z: bool) -> dict:
        """One pre-training + evaluation, kept in ``cells/NAME/result.json``; a rerun returns it without work
        (an interrupted cell resumes from its checkpoint)."""
        cell_dir = self.out / "cells" / name
        result_path = cell_dir / "result.json"
        wanted = _comparable(self.config(layer))
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            _check_same_config(cell_dir, result.get("config"), wanted)
            return result
        t0 = time.perf_counter()
        self.pretrain(cell_dir, layer)
        result = {"cell": name, **evaluate_run(self, cell_dir, with_z), "final_loss": final_loss(cell_dir),
                  "seconds": round(time.perf_counter() - t0, 1), "config": wanted}
        write_json(result_path, result)
        z = f", z {result['linear_z']:.1f}%" if with_z else ""
        log(f"{self.study} {name}: linear h {result['linear_h']:.1f}%{z} ({result['seconds']:.0f} s)")
        return result

    # --- data -----------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """The training image side: ``--image-size``, or the data set's own."""
        if self.image_size is not None:
            return self.image_size
        if self._native_size is None:
            self._native_size = load_dataset(self.dataset, "train", data_dir=self.data_dir).image_size
        return self._native_size

    def eval_slices(self):
        """(train slice, test slice) for the linear probes: seeded random subsets of the two splits.

        A data set without a test split (a flat image folder) is split in two instead.
        """
        if self._slices is None:
            self._slices = load_slices(self.dataset, self.data_dir, self.args.train_images, self.args.test_images, self.seed)
        return self._slices

    # --- outputs --------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def write_summary(self, title: str, lines: Sequence[str]) -> Path:
        path = self.out / "summary.md"
        text = [f"# {title}", ""] + list(lines) + ["", f"Settings: `{json.dumps(self.settings)}`",
                                                   f"Wall time of this invocation: {self.elapsed():.0f} s."]
        path.write_text("\n".join(text) + "\n")
        return path


# Config keys that do not change what a cell computes.
_BOOKKEEPING = ("device", "num_workers", "log_every", "checkpoint_every", "keep_last", "data_dir")


def _comparable(cfg: PretrainConfig) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in _BOOKKEEPING}


def _check_same_config(cell_dir: Path, saved: dict | None, wanted: dict) -> None:
    """A finished cell is reused only if selfsup would build the same config for it today."""
    if saved is None or saved == wanted:
        return
    keys = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    raise ConfigError(f"{cell_dir} was trained with another config than this selfsup builds now (differs in "
                      f"{', '.join(keys)}; e.g. a method default changed); delete {cell_dir} to retrain that cell, "
                      "or choose a new --out")


def load_slices(dataset: str, data_dir: str | None, n_train: int, n_test: int, seed: int):
    train = load_dataset(dataset, "train", data_dir=data_dir)
    if train.labels is None:
        raise ConfigError(f"--dataset {dataset}: the studies' linear probes need labels, and this data set has none")
    try:
        test = load_dataset(dataset, "test", data_dir=data_dir)
        if test.labels is None:
            raise ValueError("unlabelled test split")
    except (ValueError, FileNotFoundError):
        test = None
    g = torch.Generator().manual_seed(seed + 101)
    if test is None:
        perm = torch.randperm(len(train), generator=g)
        n_test = min(n_test, len(train) // 2)
        return subset(train, perm[n_test:n_test + n_train]), subset(train, perm[:n_test])
    return (subset(train, torch.randperm(len(train), generator=g)[:n_train]),
            subset(test, torch.randperm(len(test), generator=g)[:n_test]))


def subset(dataset, indices: torch.Tensor):
    """An in-memory subset (streamed folders are decoded, which is fine for the studies' small slices)."""
    if hasattr(dataset, "subset"):
        return dataset.subset(indices)
    items = [dataset[int(i)] for i in indices]
    return InMemoryDataset(images=torch.stack([x for x, _ in items]), labels=torch.tensor([y for _, y in items]),
                           classes=list(dataset.classes), name=dataset.name, mean=dataset.mean, std=dataset.std)


# ------------------------------------------------------------------------------------------------
# Models, features, probes


def load_method(run_dir: str | Path) -> tuple[nn.Module, Any]:
    """The whole pre-trained method module of a run (encoder and heads) in eval mode, and its RunInfo."""
    run = load_run(run_dir)
    model = build_model(run.config, run.in_channels, run.image_size)
    try:
        model.load_state_dict(run.weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{run.weights_path} does not fit the {run.config.method} model its config.yaml "
                              f"describes: {str(e).splitlines()[0]}") from None
    return model.eval(), run


def projection_of(model: nn.Module) -> nn.Module:
    """g(.), the head whose output z the loss sees: SimCLR's ``head``, BYOL's online ``projector``."""
    for name in ("head", "projector"):
        part = getattr(model, name, None)
        if isinstance(part, nn.Module):
            return part
    raise ConfigError(f"{type(model).__name__} has no projection head (no 'head' or 'projector'); "
                      "the study needs a method with one")


def encoder_of(model: nn.Module) -> nn.Module:
    return model.encoder() if hasattr(model, "encoder") else model.backbone


@torch.no_grad()
def project(head: nn.Module, h: torch.Tensor, device, batch_size: int = 1024) -> torch.Tensor:
    """z = g(h) in eval mode (batch norm with its running statistics), float32 on CPU."""
    was = head.training
    head.eval()
    try:
        return torch.cat([head(h[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(h), batch_size)])
    finally:
        head.train(was)


def features_hz(model: nn.Module, dataset, device, image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, z, labels) of every image of ``dataset``, without augmentation."""
    model = model.to(device)
    h, y = extract_features(encoder_of(model), dataset, device, image_size, batch_size=512)
    return h, project(projection_of(model), h, device), y


def linear_top1(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, num_classes: int,
                seed: int = 0) -> float:
    """Linear evaluation (``selfsup.evaluation.frozen.linear_eval``: logistic regression fitted to convergence) top-1 in %."""
    return float(linear_eval(xtr, ytr, xte, yte, num_classes, seed=seed)["top1"])


def evaluate_run(ctx: StudyContext, run_dir: Path, with_z: bool = True) -> dict[str, float]:
    """Linear top-1 of h (and z) of a run's encoder on the study's slices."""
    model, run = load_method(run_dir)
    train, test = ctx.eval_slices()
    htr, ztr, ytr = features_hz(model, train, ctx.device, run.image_size)
    hte, zte, yte = features_hz(model, test, ctx.device, run.image_size)
    out = {"linear_h": linear_top1(htr, ytr, hte, yte, train.num_classes, ctx.seed), "h_dim": int(htr.shape[1])}
    if with_z:
        out.update(linear_z=linear_top1(ztr, ytr, zte, yte, train.num_classes, ctx.seed), z_dim=int(ztr.shape[1]))
    return out


def random_init_baseline(ctx: StudyContext) -> float:
    """Linear top-1 of h from the untrained encoder (same seed and architecture): what training must beat."""
    cfg = ctx.config({})
    train, test = ctx.eval_slices()
    size = ctx.size
    torch.manual_seed(cfg.seed)
    enc = encoder_of(build_model(cfg, train.num_channels, size)).to(ctx.device)
    htr, ytr = extract_features(enc, train, ctx.device, size)
    hte, yte = extract_features(enc, test, ctx.device, size)
    return linear_top1(htr, ytr, hte, yte, train.num_classes, ctx.seed)


def random_init_cached(ctx: StudyContext) -> float:
    """``random_init_baseline``, computed once per study folder (``random_init.json``)."""
    path = ctx.out / "random_init.json"
    if path.is_file():
        return float(json.loads(path.read_text())["linear_h"])
    value = random_init_baseline(ctx)
    write_json(path, {"linear_h": value})
    return value


def draw_baseline(ax, value: float) -> None:
    ax.axhline(value, ls=":", color="gray", label=f"untrained encoder ({value:.1f}%)")


def finish_log_axes(fig, ax, ticks: list, xlabel: str, title: str, baseline: float, path: Path, base: int = 10) -> Path:
    """The studies' common figure ending: baseline line, log x axis labelled at ``ticks``, linear top-1
    on y, grid, legend; saved to ``path`` (returned)."""
    draw_baseline(ax, baseline)
    ax.set_xscale("log", base=base)
    ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("linear top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def line(ax, xs, rows: list[dict], key: str, fmt: str, **kw) -> None:
    """``rows[key]`` against ``xs``, with error bars (one standard deviation over seeds) when there are any."""
    errs = [r.get(f"{key}_std") for r in rows]
    yerr = [e or 0.0 for e in errs] if any(e is not None for e in errs) else None
    ax.errorbar(xs, [r[key] for r in rows], yerr=yerr, fmt=fmt, capsize=3 if yerr else 0, **kw)


def final_loss(run_dir: Path) -> float | None:
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    return float(losses[-1]) if losses else None


# ------------------------------------------------------------------------------------------------
# Files and figures


def write_json(path: Path, data: Any) -> Path:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # atomic: an interrupted study never leaves half a result file
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the studies draw their figures with matplotlib, which is not installed; "
                          "pip install 'selfsup[viz]'") from None
    return plt


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return Path(path)


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def pm(row: dict, key: str) -> str:
    """``row[key]``, with ``± std`` over seeds when the study ran several."""
    std = row.get(f"{key}_std")
    return fmt(row[key]) + ("" if std is None else f" ± {std:.1f}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


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


def ensure_run(ctx: StudyContext, args: argparse.Namespace) -> Path:
    """The run to analyse: ``--run``, or one pre-trained (once) into ``OUT/pretrain``."""
    if args.run is not None:
        return Path(args.run)
    if args.method not in METHODS:
        raise ConfigError(f"--method: {args.method!r} is not registered; choose from {', '.join(METHODS)}")
    run_dir = ctx.out / "pretrain"
    if not (run_dir / "model.safetensors").is_file():
        log(f"{ctx.study}: pre-training {args.method} for {args.steps} steps of {args.batch_size} into {run_dir}")
    return ctx.pretrain(run_dir, {"method": args.method})
