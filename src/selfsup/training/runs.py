"""Reading a finished (or interrupted) run folder back: its config, encoder and weights."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from selfsup.data.containers import MEAN_STD, canonical_dataset_name
from selfsup.errors import CheckpointError, ConfigError
from selfsup.evaluation.preprocess import Preprocessing
from selfsup.models.backbones import build_backbone, saved_stem
from selfsup.training import checkpoint as ckpt
from selfsup.training.config import PretrainConfig, saved_config
from selfsup.training.config_io import from_dict, load_yaml
from selfsup.training.lightning_ckpt import read_lightning_checkpoint


@dataclass
class RunInfo:
    run_dir: Path
    config: PretrainConfig
    image_size: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights_path: Path
    weights: dict[str, torch.Tensor]

    @property
    def preprocessing(self) -> Preprocessing:
        """How to turn a stored image into this encoder's input: its channels, size and the statistics it
        was trained with (run folders of older releases, which did not record them: those the training
        data set's reader gives, as ``pretrain`` used them)."""
        mean, std = self.mean, self.std
        if len(mean) != self.in_channels or len(std) != self.in_channels:
            mean, std = training_statistics(self.config.dataset, self.in_channels)
        return Preprocessing(self.image_size, self.in_channels, mean, std)


def training_statistics(dataset: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the reader of ``dataset`` carries: a built-in's own, else the folders' gray or ImageNet values."""
    key = canonical_dataset_name(dataset.split("+")[0])
    key = "stl10" if key.startswith("stl10") else key
    if key in MEAN_STD and len(MEAN_STD[key][0]) == channels:
        return MEAN_STD[key]
    return MEAN_STD["gray" if channels == 1 else "imagenet"]


def run_weights(run_dir: Path, where: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """(path, tensors) of a run's final ``model.safetensors``, else of its newest checkpoint.

    ``where`` starts the error message when the run never saved weights.
    """
    final = run_dir / "model.safetensors"
    if final.is_file():
        return final, ckpt.load_weights(final)
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{where}: no model.safetensors and no checkpoint; the run never saved weights")
    path = found[-1] / "model.safetensors"
    return path, ckpt.load_weights(path)


def load_run(run_dir: str | Path) -> RunInfo:
    """Config and weights of a run folder (final weights, else the newest checkpoint).

    A pre-training run, or a fine-tuning / distillation run (``selfsup finetune`` / ``distill``): for
    those the encoder is the classifier's trained backbone, described by the run's ``run.json``, so
    ``eval``, ``embed`` and ``export`` take either kind of folder.
    """
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.suffix == ".ckpt":  # a Lightning checkpoint of a selfsup.lightning module
        config, info, weights = read_lightning_checkpoint(run_dir)
        return RunInfo(run_dir, saved_config(config), int(info["image_size"]), int(info["in_channels"]),
                       tuple(info.get("mean", ())), tuple(info.get("std", ())), run_dir, weights)
    if not run_dir.is_dir():
        raise ConfigError(f"--run {run_dir}: no such run folder")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"--run {run_dir}: no config.yaml; is this a selfsup run folder?")
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    if info.get("kind") in ("finetune", "distill"):
        # Their config.yaml is a FinetuneConfig / DistillConfig; what the encoder needs is in run.json.
        cfg = from_dict(PretrainConfig, {"backbone": info["backbone"], "backbone_width": info.get("backbone_width"),
                                         "dataset": info.get("dataset", "embedded"), "data_dir": info.get("data_dir")})
    else:
        cfg = saved_config(load_yaml(cfg_path))
    path, weights = run_weights(run_dir, f"--run {run_dir}")
    in_channels = int(info.get("in_channels") or weights["backbone.conv1.weight"].shape[1])
    image_size = int(info.get("image_size") or cfg.image_size or 32)
    mean = tuple(info.get("dataset_mean") or ())
    std = tuple(info.get("dataset_std") or ())
    return RunInfo(run_dir, cfg, image_size, in_channels, mean, std, path, weights)


def load_encoder(run: RunInfo, prefix: str = "backbone.") -> nn.Module:
    """The backbone of a run with its trained weights (strict: every tensor must match)."""
    kw = {} if run.config.backbone_width is None else {"width": run.config.backbone_width}
    kw.update(saved_stem(run.config.backbone, getattr(run.config, "small_stem", None), run.image_size))
    backbone = build_backbone(run.config.backbone, in_channels=run.in_channels, image_size=run.image_size, **kw)
    sub = {k[len(prefix):]: v for k, v in run.weights.items() if k.startswith(prefix)}
    if not sub:
        raise CheckpointError(f"{run.weights_path} holds no '{prefix}*' tensors; it is not a selfsup pre-training run")
    try:
        backbone.load_state_dict(sub, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{run.weights_path} does not fit backbone {run.config.backbone!r}: "
                                   f"{str(e).splitlines()[0]}") from None
    return backbone
