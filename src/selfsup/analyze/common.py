"""Plumbing shared by the studies: settings, cached pre-training runs and their evaluation (features and probes in
:mod:`selfsup.analyze.probes`, files and figures in :mod:`selfsup.analyze.outputs`).

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
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from selfsup.analyze.arguments import STUDY_BACKBONE, STUDY_BACKBONE_WIDTH, default_dataset
from selfsup.analyze.outputs import write_json
from selfsup.analyze.probes import encoder_of, features_hz, linear_top1, load_method
from selfsup.artifacts.report import read_metrics
from selfsup.data.containers import InMemoryDataset
from selfsup.data.datasets import load_dataset
from selfsup.errors import ConfigError
from selfsup.evaluation.frozen import extract_features
from selfsup.methods import METHODS
from selfsup.training.setup import build_model
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import build_config, parse_overrides, to_dict
from selfsup.training.loop import pretrain
from selfsup.training.setup import run_started
from selfsup.training.devices import resolve_device

STUDY_CHECKPOINT_EVERY = 10**9  # cells are short: only the final checkpoint is written
# Short runs at small batches: SimCLR's square-root learning-rate rule, lr = 0.075 x sqrt(B) (SimCLR
# Appendix B.1 recommends it for small batches and few epochs). Other methods keep their defaults;
# ``--set optim.lr=...`` overrides both.
SHORT_RUN_DEFAULTS: dict[str, dict] = {"simclr": {"optim": {"lr": 0.075, "lr_scaling": "sqrt"}}}


def log(msg: str) -> None:
    print(f"[selfsup analyze] {msg}", file=sys.stderr, flush=True)


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"--{name.replace('_', '-')}: must be >= {minimum}, got {value}")


# ------------------------------------------------------------------------------------------------
# The study context


def mean_over_seeds(runs: Sequence[dict], keys: Iterable[str], spread: Iterable[str]) -> dict:
    """``runs[0]`` (one result per pre-training seed) with each of ``keys`` the runs hold replaced by its mean,
    the values kept as ``KEY_per_seed`` and, for the keys in ``spread``, ``KEY_std`` (sample standard deviation)."""
    out = dict(runs[0])
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = float(torch.tensor(values).mean())
            out[f"{key}_per_seed"] = values
            if key in spread:
                out[f"{key}_std"] = float(torch.tensor(values).std())
    return out


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
        # The studies were measured with the CPU default's values (docs/results/studies.md); --set recipe=NAME for another.
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
        resume = run_dir.is_dir() and run_started(run_dir)  # an interrupted cell continues (from step 0 if need be)
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
        out = mean_over_seeds(runs, ("linear_h", "linear_z", "final_loss"), spread=("linear_h", "linear_z"))
        return dict(out, cell=name, seconds=sum(r["seconds"] for r in runs), seeds=[self.seed + k for k in range(n)])

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
# Cells evaluated


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


def final_loss(run_dir: Path) -> float | None:
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    return float(losses[-1]) if losses else None


# ------------------------------------------------------------------------------------------------
# The run a single-run study analyses


def ensure_run(ctx: StudyContext, args: argparse.Namespace, seed: int | None = None) -> Path:
    """The run to analyse: ``--run``, or one pre-trained (once) into ``OUT/pretrain`` (``OUT/pretrain@seedS``
    for a pre-training ``seed`` other than ``--seed``)."""
    if args.run is not None:
        return Path(args.run)
    if args.method not in METHODS:
        raise ConfigError(f"--method: {args.method!r} is not registered; choose from {', '.join(METHODS)}")
    seed = ctx.seed if seed is None else seed
    run_dir = ctx.out / ("pretrain" if seed == ctx.seed else f"pretrain@seed{seed}")
    if not (run_dir / "model.safetensors").is_file():
        log(f"{ctx.study}: pre-training {args.method} for {args.steps} steps of {args.batch_size} into {run_dir}")
    return ctx.pretrain(run_dir, {"method": args.method, "seed": seed})
