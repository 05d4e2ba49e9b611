"""Guards against known crashes below selfsup (in torch or its kernels), checked before training.

Each guard returns a reason string when the hazard applies, ``None`` otherwise; the training loop
turns the risky option off with a warning instead of crashing mid-run.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["channels_last_hazard"]


def channels_last_hazard(model: nn.Module, device: torch.device) -> str | None:
    """Why ``channels_last`` must stay off for ``model`` on ``device``, or ``None``.

    torch 2.14's oneDNN CPU kernel for the weight gradient of a 1x1 convolution with stride > 1 and
    fewer than 8 input channels corrupts the heap in channels-last layout (the process dies with
    "double free or corruption" or a segmentation fault a step or two later). Such convolutions
    appear in the ResNet downsample path of very narrow backbones (width <= 1/16 of 64 channels).
    ``tests/test_reliability.py`` runs that model once in a subprocess to see whether it still
    applies.
    """
    if device.type != "cpu":
        return None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 8
                and m.weight.requires_grad):
            return (f"{name} is a 1x1 stride-{max(m.stride)} convolution with {m.in_channels} input channels, whose "
                    "channels-last weight gradient crashes oneDNN on CPU")
    return None
