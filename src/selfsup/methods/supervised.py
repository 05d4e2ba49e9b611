"""Supervised pre-training: the same encoder trained with labels, the ceiling beside an SSL run.

Not a self-supervised method: the baseline the papers compare against (SimCLR Sec. 1 / Table 8,
BYOL Table 1, "supervised" rows). Registered beside the SSL methods so that ``selfsup pretrain
--method supervised`` trains exactly the same encoder with exactly the same views, optimiser,
learning-rate schedule and number of steps as the default SimCLR run; only the loss differs:
cross-entropy through one linear classifier on h, on both views. The run folder is a normal one
(``backbone.*`` and ``classifier.*`` weights), so ``selfsup eval linear --run`` probes its frozen
encoder like any other, which makes it the ceiling the SSL runs are read against.

Deviation, written down: the papers' supervised baselines use their own supervised recipe
(e.g. crop + flip only, SGD); here the views and optimiser are the SSL run's, so that the
comparison isolates the training signal (labels vs. the SSL loss) at an equal budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.methods.simclr import simclr_paper_lr, simclr_views
from selfsup.methods.spec import MethodSpec, RecipeLayer


class Supervised(nn.Module):
    """``h = f(x)``; the loss is ``cross_entropy(W h + b, y)`` over both views of every image.

    The spec's ``needs_labels`` tells the training loop to feed each batch's labels as a third argument.
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.num_features, num_classes)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor):
        # Both views in one batch, as SimCLR does, so batch norm sees the same 2N samples.
        h = self.backbone(torch.cat([view1, view2], dim=0))
        logits = self.classifier(h)
        y = torch.cat([labels, labels], dim=0)
        loss = F.cross_entropy(logits.float(), y)
        with torch.no_grad():
            logs = {"train_top1": (logits.argmax(1) == y).float().mean() * 100}
        return loss, logs

    def encoder(self) -> nn.Module:
        """The network whose output h is probed downstream, as for the SSL methods."""
        return self.backbone


@dataclass
class SupervisedConfig:
    """The supervised baseline has no keys of its own (section ``supervised``): only the loss differs from SimCLR's run."""

    def validate(self, prefix: str = "supervised.") -> None:
        return None


def build_supervised(section: SupervisedConfig, backbone: nn.Module, num_classes: int | None = None) -> Supervised:
    """``num_classes`` comes from the training data set (the loop passes it for a spec with ``needs_labels``); no
    default, so a caller that forgets it fails instead of training a 10-way classifier on another data set."""
    if num_classes is None:
        raise ValueError("the supervised baseline needs num_classes (the training data set's number of classes)")
    return Supervised(backbone, num_classes)


SPEC = MethodSpec(
    name="supervised", title="supervised baseline",
    paper="the supervised baseline of Chen et al. 2020 (Table 8) and Grill et al. 2020 (Table 1): the same encoder "
          "trained with labels",
    config=SupervisedConfig, build=build_supervised, views=simclr_views,  # the default SimCLR run's views
    cpu=RecipeLayer(shared={"optim": {"lr": 2.0}}),  # SimCLR's CPU default optimiser, so only the loss differs
    paper_recipe="simclr", accepts=("cpu", "simclr"), paper_lr=simclr_paper_lr,
    describe=lambda section: "cross-entropy on labels", needs_labels=True,
)
