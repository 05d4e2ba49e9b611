"""Methods: small nn.Modules composed of a backbone, heads and a loss.

``METHODS`` maps a method name to ``build(cfg, backbone) -> nn.Module``. Every method's
``forward(view1, view2)`` returns ``(loss, logs)`` where ``logs`` is a dict of detached scalars.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from selfsup.augment import ViewConfig
from selfsup.methods.simclr import SimCLR, build_simclr

METHODS: dict[str, Callable[..., nn.Module]] = {
    "simclr": build_simclr,
}

# Default view distributions per method, as a function of the training image size: (view 1, view 2).
VIEW_PRESETS: dict[str, Callable[[int], tuple[ViewConfig, ViewConfig]]] = {
    "simclr": lambda size: (ViewConfig.simclr(size), ViewConfig.simclr(size)),
}

__all__ = ["METHODS", "VIEW_PRESETS", "SimCLR"]
