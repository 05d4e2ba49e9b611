"""A pre-trained run's method module, its representations h (encoder) and z (projection head), and the linear probe
the studies score them with."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup.errors import ConfigError, CheckpointError
from selfsup.evaluation.frozen import extract_features, linear_eval
from selfsup.training.setup import build_model
from selfsup.training.runs import load_run


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
