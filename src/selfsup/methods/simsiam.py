"""SimSiam (Chen and He 2021, Exploring Simple Siamese Representation Learning, arXiv 2011.10566;
facebookresearch/simsiam).

Encoder f = backbone + projection MLP; prediction MLP h on top. Algorithm 1:
``L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2`` with ``D(p, z) = -cos(p, z)`` and ``sg`` the stop-gradient; no
negatives, no momentum encoder. The stop-gradient is what keeps it from collapsing (Sec. 4.1), so the collapse
monitor watches the std of the l2-normalised projections z (``collapse_std``, Sec. 4.1 / Figure 2: about
``1/sqrt(d)`` when healthy, 0 when collapsed).

Heads, as the official ``simsiam/builder.py`` builds them:

- projector: 3 layers ``num_features -> num_features -> num_features -> 2048``, Linear-BN-ReLU twice, then a
  Linear followed by BN without affine parameters (the official code freezes that Linear's bias, which the BN
  cancels anyway; here it has none). The paper's CIFAR section uses 2 layers (``proj_layers: 2``).
- predictor: the bottleneck ``2048 -> 512 -> 2048``, Linear-BN-ReLU then a Linear with bias.

Optimisation (Sec. 4 / official ``main_simsiam.py``): SGD lr 0.05 x B/256, weight decay 1e-4, momentum 0.9, cosine
decay without warm-up, the predictor's learning rate fixed at its starting value (``--fix-pred-lr``, the
official command; ``fix_pred_lr`` here).

Deviations, written down:

- selfsup's SGD is Nesterov (the official one is not), and biases and batch-norm parameters are never decayed
  (the official SGD decays every parameter).
- ``D`` is computed through ``selfsup.losses.byol_loss`` (``2 - 2 cos``, fp32, target detached):
  ``D(p, sg(z)) = byol_loss(p, z) / 2 - 1``, the same value and gradient.
- CPU defaults (the ``cpu`` recipe, measured on Fashion-MNIST with the narrow ResNet-18, batch 256, 1,000 steps,
  one CPU thread): SGD lr 0.4 x B/256 with weight decay 5e-4 (the CIFAR value) and the 2-layer CIFAR projector
  gave linear top-1 86.85 / kNN 80.40 (collapse_std 0.0215 at the end, healthy 1/sqrt(2048) = 0.0221); the
  paper's ImageNet values (0.05 x B/256, wd 1e-4, 3 layers) gave 79.41 / 72.27: 1,000 steps of a small batch need a
  larger step than 0.05 (as BYOL's and SimCLR's CPU defaults). No warm-up, as the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfsup.data.containers import SMALL_IMAGE_MAX
from selfsup.errors import check_field
from selfsup.losses import byol_loss
from selfsup.losses.multicrop import mean_with_local_terms
from selfsup.methods.collapse import collapse_std
from selfsup.methods.simclr import MAX_DIM
from selfsup.methods.spec import MethodSpec, PaperRecipe, RecipeLayer
from selfsup.models.heads import ProjectionHead
from selfsup.models.running_stats import encode_local_crops
from selfsup.views.config import ViewConfig


@dataclass
class SimSiamConfig:
    """SimSiam's keys (section ``simsiam``). Defaults: the CPU recipe's 2-layer projector (the paper's CIFAR one;
    the ``simsiam`` recipe sets 3 at ImageNet size), the paper's widths otherwise."""

    proj_hidden_dim: int | None = None  # None: the backbone's num_features (official: prev_dim, 2048 on ResNet-50)
    proj_out_dim: int = 2048  # official --dim
    proj_layers: int = 2  # the CIFAR section's (and the CPU recipe's); ImageNet (Sec. 3, official code): 3
    pred_hidden_dim: int | None = None  # the bottleneck; None: proj_out_dim // 4 (official --pred-dim 512)
    fix_pred_lr: bool = True  # the predictor keeps its starting lr (Sec. 4.1, official --fix-pred-lr)

    def validate(self, prefix: str = "simsiam.") -> None:
        check_field(prefix + "proj_out_dim", 1 <= self.proj_out_dim <= MAX_DIM, f"must be in [1, {MAX_DIM}]")
        for key in ("proj_hidden_dim", "pred_hidden_dim"):
            value = getattr(self, key)
            check_field(prefix + key, value is None or 1 <= value <= MAX_DIM, f"must be in [1, {MAX_DIM}]")
        check_field(prefix + "proj_layers", self.proj_layers >= 1, "must be >= 1 (paper: 3; CIFAR: 2)")


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``D(p, sg(z)) = -mean_i cos(p_i, z_i)`` (SimSiam Eq. 1 with Eq. 3's stop-gradient), in fp32."""
    return byol_loss(p, z) / 2 - 1


class SimSiam(nn.Module):
    """``z = projector(backbone(x))``, ``p = predictor(z)``; the loss is Algorithm 1's symmetric ``D``.

    Each view goes through the network separately, as in the official code (batch norm sees one view at a time).
    ``fixed_lr_modules`` puts the predictor's parameters in fixed-learning-rate groups (``fix_pred_lr``).
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module, fix_pred_lr: bool = True):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        self.fixed_lr_modules = ("predictor",) if fix_pred_lr else ()

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *local_views: torch.Tensor):
        """The loss of two global views and any number of local crops after them (multi-crop).

        Two views: Algorithm 1's ``D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2``. With ``V`` local crops (SwAV, Caron
        et al. 2020, Sec. 3.2: every crop is compared with the global views only) each local crop's prediction
        ``p_v`` is pulled towards the stop-gradient projections of both global views, ``D(p_v, sg(z_g))``; local
        crops are never targets. The loss is the mean of these ``2 + 2V`` terms, so it stays in [-1, 1] as the
        two-view loss (itself the mean of its two terms) and with no local crops is exactly it. The local crops
        (another resolution) go through the network in one pass together (batch norm sees all of them at once).
        Multi-crop is this library's extension of SimSiam, SwAV's scheme applied as for SimCLR and BYOL.
        """
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
        if local_views:
            p_local = self.predictor(self.projector(encode_local_crops(self.backbone, local_views)))
            terms = [negative_cosine(pv, z) for pv in p_local.chunk(len(local_views), dim=0) for z in (z1, z2)]
            loss = mean_with_local_terms(2 * loss, 2, terms)
        return loss, {"collapse_std": collapse_std(torch.cat([z1, z2]))}

    def encoder(self) -> nn.Module:
        """The backbone, whose features are evaluated downstream (SimSiam Sec. 4)."""
        return self.backbone


def build_simsiam(section: SimSiamConfig, backbone: nn.Module, num_classes: int | None = None) -> SimSiam:
    out = section.proj_out_dim
    projector = ProjectionHead(backbone.num_features, section.proj_hidden_dim or backbone.num_features, out,
                               num_layers=section.proj_layers, last_bn=True)
    predictor = ProjectionHead(out, section.pred_hidden_dim or max(1, out // 4), out, num_layers=2)
    return SimSiam(backbone, projector, predictor, fix_pred_lr=section.fix_pred_lr)


def simsiam_views(image_size: int) -> tuple[ViewConfig, ViewConfig]:
    """MoCo v2's augmentation, as the official code (``main_simsiam.py``): crop 0.2-1, jitter .4/.4/.4/.1 with
    p 0.8, grayscale 0.2, blur p 0.5 (off for images <= 32 px, as SimCLR's CIFAR views), flip; both views alike."""
    view = ViewConfig(crop_scale=(0.2, 1.0), jitter_brightness=0.4, jitter_contrast=0.4, jitter_saturation=0.4,
                      jitter_hue=0.1, blur_p=0.0 if image_size <= SMALL_IMAGE_MAX else 0.5)
    return view, view


def simsiam_recipe(image_size: int, batch_size: int) -> RecipeLayer:
    """ImageNet size (Sec. 4 and the official ``main_simsiam.py`` with ``--fix-pred-lr``): SGD lr 0.05 x B/256,
    weight decay 1e-4, momentum 0.9, batch 512, 100 epochs, cosine decay without warm-up, the predictor's lr fixed,
    projector 2048-2048-2048 (3 layers), predictor 2048-512-2048, zero-initialised residual BN scales
    (``zero_init_residual=True`` in the official builder).

    CIFAR size (<= 32 px; the paper's CIFAR appendix): SGD lr 0.03 x B/256, weight decay 5e-4, momentum 0.9,
    batch 512, 800 epochs, a 2-layer projector to 2048, the same predictor. The predictor's fixed lr and the
    absence of warm-up are carried over from the ImageNet recipe."""
    small = image_size <= SMALL_IMAGE_MAX
    return RecipeLayer(
        shared={"zero_init_residual": True,
                "optim": {"name": "sgd", "lr": 0.03 if small else 0.05, "lr_scaling": "linear",
                          "weight_decay": 5e-4 if small else 1e-4, "momentum": 0.9, "warmup_epochs": 0.0,
                          "final_lr_fraction": 0.0}},
        section={"proj_hidden_dim": None, "proj_out_dim": 2048, "proj_layers": 2 if small else 3,
                 "pred_hidden_dim": 512, "fix_pred_lr": True})


SPEC = MethodSpec(
    name="simsiam", title="SimSiam",
    paper="Chen and He 2021, Exploring Simple Siamese Representation Learning (arXiv 2011.10566)",
    config=SimSiamConfig, build=build_simsiam, views=simsiam_views,
    # SGD 0.4 x B/256, wd 5e-4, no warm-up, with the section's 2-layer projector; measured: module docstring
    cpu=RecipeLayer(shared={"optim": {"name": "sgd", "lr": 0.4, "weight_decay": 5e-4, "warmup_fraction": 0.0}}),
    recipes=(PaperRecipe("simsiam", "SimSiam paper (SGD 0.05 x B/256, wd 1e-4, no warm-up, fixed predictor lr; "
                         "CIFAR size: 0.03 x B/256, wd 5e-4, 2-layer projector)", simsiam_recipe),),
    paper_recipe="simsiam", accepts=("cpu", "simsiam"), paper_lr=lambda batch_size: 0.05 * batch_size / 256,
    describe=lambda section: f"{section.proj_layers}-layer projector to {section.proj_out_dim}"
                             + (", fixed predictor lr" if section.fix_pred_lr else ""),
    collapse_dim=lambda section: section.proj_out_dim, min_batch=2, multicrop=True,
)
