"""Methods: small nn.Modules composed of a backbone, heads and a loss.

``METHODS`` maps a method name to ``build(cfg, backbone) -> nn.Module``. Every method's
``forward(view1, view2)`` returns ``(loss, logs)`` where ``logs`` is a dict of detached scalars.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from selfsup.methods.byol import BYOL, BYOL_DEFAULTS, build_byol
from selfsup.methods.simclr import SimCLR, build_simclr
from selfsup.methods.supervised import Supervised, build_supervised
from selfsup.views.config import ViewConfig

METHODS: dict[str, Callable[..., nn.Module]] = {
    "simclr": build_simclr,
    "byol": build_byol,
    "simclrv2": build_simclr,  # SimCLR with SimCLRv2's 3-layer projection head (Chen et al. 2020b, Sec. 2)
    "supervised": build_supervised,  # the baseline: the same encoder trained with labels (the ceiling)
}

# Methods whose forward takes the batch's labels as a third argument; their builder takes ``num_classes``.
LABELLED_METHODS: tuple[str, ...] = ("supervised",)

# Per-method config defaults, applied by ``config.build_config`` only to keys the user did not give.
# SimCLR's LARS base lr 2.0 (x B/256) is the CPU default's, tuned for short runs
# (benchmarks/cpu_default_search.py); the paper uses 0.3 on ImageNet and 0.5-1.5 on CIFAR.
METHOD_DEFAULTS: dict[str, dict] = {
    "simclr": {"optim": {"lr": 2.0}},
    "byol": BYOL_DEFAULTS,
    "simclrv2": {"proj_layers": 3, "optim": {"lr": 2.0}},
    "supervised": {"optim": {"lr": 2.0}},  # SimCLR's CPU default optimiser, so only the loss differs
}

# Default view distributions per method, as a function of the training image size: (view 1, view 2).
VIEW_PRESETS: dict[str, Callable[[int], tuple[ViewConfig, ViewConfig]]] = {
    "simclr": lambda size: (ViewConfig.simclr(size), ViewConfig.simclr(size)),
    "byol": lambda size: (ViewConfig.byol(size, 1), ViewConfig.byol(size, 2)),
    "simclrv2": lambda size: (ViewConfig.simclr(size), ViewConfig.simclr(size)),
    "supervised": lambda size: (ViewConfig.simclr(size), ViewConfig.simclr(size)),  # the default SimCLR run's views
}

__all__ = ["METHODS", "METHOD_DEFAULTS", "VIEW_PRESETS", "LABELLED_METHODS", "SimCLR", "BYOL", "Supervised"]
