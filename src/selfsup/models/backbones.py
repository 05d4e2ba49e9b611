"""The backbone registry: ``BACKBONES`` maps names to builders; the CLI and the tests enumerate it.

Every encoder has one interface: ``forward(x) -> pooled features``, attribute ``num_features``.
ResNets live in ``selfsup.models.resnet``, SimCLRv2's SK ResNets in ``selfsup.models.sk_resnet`` and the
``timm:MODEL`` adapter in ``selfsup.models.timm_adapter``.
"""

from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from selfsup.models.resnet import (
    RESNET_DEPTHS, LEGACY_SMALL_IMAGE_MAX, SMALL_IMAGE_MAX, BasicBlock, Bottleneck, Conv2d, ResNet,
)
from selfsup.models.sk_resnet import build_sk_resnet
from selfsup.models.timm_adapter import TIMM_PREFIX, build_timm_backbone


def _resnet_builder(depth: int, width: float = 1.0, base_channels: int = 64, layers: list[int] | None = None,
                    block: type | None = None, stem_stride: int = 1, expand_features: int | None = None):
    default_block, default_layers = RESNET_DEPTHS[depth] if depth in RESNET_DEPTHS else (block, layers)

    def build(in_channels: int = 3, image_size: int = 224, small_stem: bool | None = None, width: float = width,
              zero_init_residual: bool = False, expand_features: int | None = expand_features, **kw) -> ResNet:
        if kw:
            raise TypeError(f"unknown backbone option(s): {', '.join(sorted(kw))}")
        if small_stem is None:
            small_stem = image_size <= SMALL_IMAGE_MAX
        return ResNet(block or default_block, layers or default_layers, width=width, in_channels=in_channels,
                      small_stem=small_stem, base_channels=base_channels, zero_init_residual=zero_init_residual,
                      stem_stride=stem_stride if small_stem else 1, expand_features=expand_features)

    return build


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _resnet_builder(18),
    "resnet34": _resnet_builder(34),
    "resnet50": _resnet_builder(50),
    "resnet101": _resnet_builder(101),
    "resnet152": _resnet_builder(152),
    # The CPU default: a ResNet-18 layout at a quarter of the width (16-32-64-128 channels) whose
    # small-image stem has stride 2 (28 px -> 14 px maps, 4x fewer FLOPs than stride 1), ending in a
    # 1x1 expansion to 1024 channels before pooling, so h is 1024-d for ~7% more FLOPs. Chosen by
    # benchmarks/cpu_default_search.py for Fashion-MNIST in 10 minutes on 2 CPU cores: the expansion
    # was worth +2.2 points of linear-probe accuracy at equal time (docs/results/speed.md).
    "resnet18_narrow": _resnet_builder(18, width=0.25, stem_stride=2, expand_features=1024),
    "resnet18_narrow_plain": _resnet_builder(18, width=0.25, stem_stride=2),
    "resnet18_narrow_x2048": _resnet_builder(18, width=0.25, stem_stride=2, expand_features=2048),
    "resnet10_narrow": _resnet_builder(0, width=0.5, layers=[1, 1, 1, 1], block=BasicBlock, stem_stride=2),
}
for _depth in (50, 101, 152):
    for _w in (2, 3):
        BACKBONES[f"resnet{_depth}_{_w}x"] = _resnet_builder(_depth, width=float(_w))


def _sk_builder(depth: int, width: float):
    """SimCLRv2's selective-kernel ResNets (``selfsup.models.sk_resnet``); options include ``sk_ratio`` and ``resnet_d``."""

    def build(**kw) -> nn.Module:
        return build_sk_resnet(depth, **{"width": width, **kw})

    return build


for _depth in (50, 101, 152):
    for _w in (1, 2, 3):
        BACKBONES[f"resnet{_depth}{'' if _w == 1 else f'_{_w}x'}_sk"] = _sk_builder(_depth, float(_w))

CPU_DEFAULT_BACKBONE = "resnet18_narrow"


def saved_stem(name: str, small_stem: bool | None, image_size: int) -> dict:
    """Builder options that rebuild a saved encoder's stem: its recorded ``small_stem``, or, for runs saved
    before the option existed (``None``), the rule they were built with (at most 64 px: small stem)."""
    if name.startswith(TIMM_PREFIX):
        return {}
    return {"small_stem": small_stem if small_stem is not None else image_size <= LEGACY_SMALL_IMAGE_MAX}


def build_backbone(name: str, **kw) -> nn.Module:
    """Build a registered encoder by name; ``kw`` are passed to its builder.

    Common options: ``in_channels`` (any number), ``image_size`` (picks the stem), ``small_stem``
    (force the stem), ``width`` (multiplier). Names of the form ``timm:MODEL`` build timm's
    ``MODEL`` without its classifier (``selfsup.models.timm_adapter``, optional extra ``selfsup[timm]``).
    """
    if name.startswith(TIMM_PREFIX):
        return build_timm_backbone(name[len("timm:"):], **kw)
    if name not in BACKBONES:
        close = difflib.get_close_matches(name, BACKBONES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown backbone {name!r}.{hint} Available: {', '.join(sorted(BACKBONES))}")
    model = BACKBONES[name](**kw)
    if not hasattr(model, "num_features"):
        raise TypeError(f"backbone {name!r} does not expose num_features")
    return model
