"""SimCLRv2's pre-training (Chen et al. 2020b, Sec. 2): SimCLR with a deeper (3-layer) projection head.

The model is :class:`selfsup.methods.simclr.SimCLR`; what differs is the head's depth, the recipe and
what follows pre-training (fine-tuning from the head's first layer and distillation, ``selfsup.protocols``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from selfsup.data.containers import SMALL_IMAGE_MAX
from selfsup.errors import check_field
from selfsup.methods.simclr import SimCLRConfig, build_simclr, simclr_views
from selfsup.methods.spec import MethodSpec, PaperRecipe, RecipeLayer


@dataclass
class SimCLRv2Config(SimCLRConfig):
    """SimCLRv2's keys (section ``simclrv2``): SimCLR's with a 3-layer head."""

    proj_layers: int = 3  # Sec. 2: a 3-layer head, fine-tuned from its first layer

    def validate(self, prefix: str = "simclrv2.") -> None:
        super().validate(prefix)
        check_field(prefix + "proj_layers", self.proj_layers >= 1,
                    "must be >= 1 (SimCLRv2 fine-tunes from a layer of its head; 0 is SimCLR's ablation)")


def simclrv2_recipe(image_size: int, batch_size: int) -> RecipeLayer:
    """SimCLRv2 Sec. 2 / App.: LARS lr 0.1 x sqrt(B) (6.4 at 4096), weight decay 1e-4, temperature 0.1 (0.5 at
    CIFAR size, taken from SimCLR App. B.9; the v2 paper is silent), 3-layer head ending in BN with a scale
    (official code), 10 warm-up epochs (the official code uses 5)."""
    return RecipeLayer(
        shared={"zero_init_residual": True,
                "optim": {"name": "lars", "lr": 0.1, "lr_scaling": "sqrt", "weight_decay": 1e-4, "momentum": 0.9,
                          "warmup_epochs": 10.0, "final_lr_fraction": 0.0}},
        section={"temperature": 0.5 if image_size <= SMALL_IMAGE_MAX else 0.1, "proj_out_dim": 128,
                 "proj_hidden_dim": None, "proj_layers": 3, "proj_last_bn": True})


SPEC = MethodSpec(
    name="simclrv2", title="SimCLRv2",
    paper="Chen, Kornblith, Swersky, Norouzi and Hinton 2020, Big Self-Supervised Models are Strong Semi-Supervised "
          "Learners (arXiv 2006.10029)",
    config=SimCLRv2Config, build=build_simclr, views=simclr_views,
    cpu=RecipeLayer(shared={"optim": {"lr": 2.0}}),  # SimCLR's CPU default
    recipes=(PaperRecipe("simclrv2", "SimCLRv2 paper (LARS 0.1 x sqrt(B), wd 1e-4, temperature 0.1 / 0.5 at <= 32 px, "
                         "3-layer head, 10 warm-up epochs)", simclrv2_recipe),),
    paper_recipe="simclrv2", accepts=("cpu", "simclr", "simclrv2"),
    paper_lr=lambda batch_size: 0.1 * math.sqrt(batch_size),
    describe=lambda section: f"temperature {section.temperature:g}", min_batch=2,
)
