"""What a run is made of: the method around a fresh backbone, its two view distributions, its length and warm-up."""

from __future__ import annotations

from torch import nn

from selfsup.methods import LABELLED_METHODS, METHODS, VIEW_PRESETS
from selfsup.models.backbones import build_backbone, saved_stem
from selfsup.training.config import PretrainConfig
from selfsup.training.init_weights import load_init
from selfsup.views.config import ViewConfig


# ------------------------------------------------------------------------------------------------
# Building the model


def resolve_views(cfg: PretrainConfig, image_size: int) -> tuple[ViewConfig, ViewConfig]:
    """The configured view distributions, or the method's preset for this image size."""
    preset = VIEW_PRESETS.get(cfg.method, lambda size: (ViewConfig.simclr(size), ViewConfig.simclr(size)))
    p1, p2 = preset(image_size)
    v1 = cfg.view if cfg.view is not None else p1
    v2 = cfg.view2 if cfg.view2 is not None else (v1 if cfg.view is not None else p2)
    return v1, v2


def build_model(cfg: PretrainConfig, in_channels: int, image_size: int, num_classes: int | None = None,
                init: str | None = None) -> nn.Module:
    """The method around a fresh backbone; ``init`` (``--init``) loads the backbone's starting weights first,
    so a BYOL target starts as the same copy. ``model.init_record`` then says what was loaded. Labelled
    methods (``supervised``) also take ``num_classes``."""
    kw = {} if cfg.backbone_width is None else {"width": cfg.backbone_width}
    kw.update(saved_stem(cfg.backbone, cfg.small_stem, image_size))
    if cfg.zero_init_residual:
        kw["zero_init_residual"] = True
    backbone = build_backbone(cfg.backbone, in_channels=in_channels, image_size=image_size, **kw)
    record = load_init(backbone, init) if init is not None else None
    labelled = {"num_classes": num_classes} if cfg.method in LABELLED_METHODS and num_classes is not None else {}
    model = METHODS[cfg.method](cfg, backbone, **labelled)
    model.init_record = record
    return model


def total_steps_for(cfg: PretrainConfig, n: int) -> int | None:
    steps_per_epoch = n // cfg.batch_size
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        return max(1, int(round(cfg.epochs * steps_per_epoch)))
    return None  # minutes: fixed after timing the first steps


def warmup_steps_for(cfg: PretrainConfig, total_steps: int, steps_per_epoch: int) -> int:
    """``optim.warmup_epochs`` (the papers' 10 epochs) if set, else ``warmup_fraction`` of the run.

    Warm-up in epochs is capped at half the run, so a short run still has a cosine phase.
    """
    if cfg.optim.warmup_epochs is not None:
        return min(int(round(cfg.optim.warmup_epochs * steps_per_epoch)), total_steps // 2)
    return int(round(cfg.optim.warmup_fraction * total_steps))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model
