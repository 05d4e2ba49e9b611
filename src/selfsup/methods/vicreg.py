"""VICReg, Variance-Invariance-Covariance Regularization (Bardes, Ponce and LeCun 2022, arXiv 2105.04906).

Encoder f -> expander h (3 Linear layers, BN + ReLU between them, 8192-d at ImageNet size); the loss
(Eq. 6, :func:`selfsup.losses.vicreg_loss`) pulls the two views' embeddings together (invariance),
keeps every dimension's standard deviation above 1 over the batch (variance) and decorrelates the
dimensions (covariance). Collapse is what the variance term prevents: the run logs ``collapse_std``
of the embeddings and the spec sets ``collapse_dim``.

The official expander (facebookresearch/vicreg ``Projector``) gives its hidden Linears a bias, which the
batch norm right after cancels, and drops the last Linear's bias (``nn.Linear(f[-2], f[-1],
bias=False)``): ``ProjectionHead(..., num_layers=3, last_bias=False)`` is the same function.

Gradient scale: ``vicreg_loss`` returns on each rank what the official code's rank does (the local
invariance term plus the variance and covariance of the gathered global batch, whose gather sums the
ranks' gradients into each rank's rows), so the official learning rate and weight decay carry over
unchanged. The official LARS has one learning rate for every parameter, as the core's does.

Deviations, written down:

- CPU default (the ``cpu`` layer, the narrow encoders): a 2048-wide expander instead of 8192 (2x the
  default encoder's 1024 features) and LARS base lr 1.6 x B/256, the paper's rate at its batch of 2048
  (0.2 x 2048/256), since a CPU run has a thousand small-batch steps. Measured: 1,000 steps on
  Fashion-MNIST at batch 256 give linear top-1 87.19% (random init 81.00%, SimCLR 86.70%) and kNN top-1
  80.35% (k 200; the same encoder at random init 72.45%,
  SimCLR's CPU default 79.54%, Barlow Twins' 78.71%), loss 22.3 -> 19.3, ``collapse_std`` from 0.018 at
  the start to 0.0217 (never near the warning threshold). A
  narrower (1024) expander was not measured.
- Computed in fp32 (the official code runs under fp16 autocast).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from selfsup.data.containers import SMALL_IMAGE_MAX
from selfsup.errors import check_field
from selfsup.losses import vicreg_loss
from selfsup.losses.multicrop import symmetric_multicrop_loss
from selfsup.methods.barlow_twins import barlow_twins_views
from selfsup.methods.collapse import collapse_std
from selfsup.methods.simclr import ProjectionConfig
from selfsup.methods.spec import MethodSpec, PaperRecipe, RecipeLayer
from selfsup.models.running_stats import encode_local_crops
from selfsup.views.config import ViewConfig


@dataclass
class VICRegConfig(ProjectionConfig):
    """VICReg's keys (section ``vicreg``): the expander (``proj_*``) and the loss coefficients. Defaults: the CPU
    recipe's (2048-d expander); the coefficients are the paper's."""

    proj_hidden_dim: int | None = 2048  # paper: 8192; None: the encoder's num_features
    proj_out_dim: int = 2048  # paper: 8192
    proj_layers: int = 3  # paper: 3 Linear layers
    proj_last_bias: bool = False  # official Projector: the last Linear has no bias
    sim_coeff: float = 25.0  # lambda, invariance (Sec. 4.2; official --sim-coeff)
    std_coeff: float = 25.0  # mu, variance (Sec. 4.2; official --std-coeff)
    cov_coeff: float = 1.0  # nu, covariance (Sec. 4.2; official --cov-coeff)

    def validate(self, prefix: str = "vicreg.") -> None:
        super().validate(prefix)
        check_field(prefix + "proj_layers", self.proj_layers >= 1, "must be >= 1 (paper: a 3-layer expander)")
        for key in ("sim_coeff", "std_coeff", "cov_coeff"):
            v = getattr(self, key)
            check_field(prefix + key, math.isfinite(v) and v >= 0, "must be a finite number >= 0 (paper: 25, 25, 1)")


def vicreg_multicrop_loss(z1: torch.Tensor, z2: torch.Tensor, z_local: Sequence[torch.Tensor] = (),
                          sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0) -> torch.Tensor:
    """VICReg's loss with local crops: the mean of ``vicreg_loss`` over the ``1 + 2V`` pairs.

    ``z1``, ``z2`` are the global views' embeddings, ``z_local`` the ``V`` local crops' (each (N, d), rows aligned
    by image). The pairs are the global pair ``(z1, z2)`` and every ``(z_v, z_g)`` of a local crop with a global
    view; local crops are never paired with each other (SwAV, Caron et al. 2020, Sec. 3.2), and every pair weighs
    the same (DINO's mean over its pairs, Caron et al. 2021, Eq. 3). Each term is the whole Eq. 6 of its pair,
    variance and covariance of both its embeddings included, so a global view's regularisers enter ``1 + V`` of
    the terms and a local crop's 2. The mean keeps the two-view loss's scale (``25 x 0.99`` when collapsed) and
    the balance of the three coefficients, which were tuned for it; a sum would grow with ``V``. With no local
    crops it is ``vicreg_loss(z1, z2)`` exactly. Across ranks each term's variance and covariance are those of
    the global batch and its invariance this rank's (``vicreg_loss``); the mean of terms keeps that.
    """
    return symmetric_multicrop_loss(lambda a, b: vicreg_loss(a, b, sim_coeff, std_coeff, cov_coeff), z1, z2, z_local)


class VICReg(nn.Module):
    """``z = h(f(x))`` for each view; the loss is VICReg's (Eq. 6) between the two views' z.

    Local crops after the two global views (``forward(g1, g2, *local_crops)``, multi-crop) go through the network
    in one pass together (another resolution; batch norm sees all local crops at once) and the loss is
    :func:`vicreg_multicrop_loss`.
    """

    def __init__(self, backbone: nn.Module, expander: nn.Module, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                 cov_coeff: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.expander = expander
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *local_views: torch.Tensor):
        # One view at a time, as the official code does (batch norm sees each view's statistics).
        z1 = self.expander(self.backbone(view1))
        z2 = self.expander(self.backbone(view2))
        z_local = ()
        if local_views:
            z_local = self.expander(encode_local_crops(self.backbone, local_views)).chunk(len(local_views), dim=0)
        loss = vicreg_multicrop_loss(z1, z2, z_local, self.sim_coeff, self.std_coeff, self.cov_coeff)
        return loss, {"collapse_std": collapse_std(torch.cat([z1, z2], dim=0))}

    def encoder(self) -> nn.Module:
        """The encoder f, whose output y is the representation evaluated downstream (Sec. 3.1)."""
        return self.backbone


def build_vicreg(section: VICRegConfig, backbone: nn.Module, num_classes: int | None = None) -> VICReg:
    return VICReg(backbone, section.head(backbone.num_features), section.sim_coeff, section.std_coeff,
                  section.cov_coeff)


def vicreg_views(image_size: int) -> tuple[ViewConfig, ViewConfig]:
    """BYOL's asymmetric augmentations, as the official ``augmentations.TrainTransform`` (jitter .4/.4/.2/.1 with
    p 0.8, grayscale 0.2, blur 1.0 / 0.1, solarize 0 / 0.2)."""
    return barlow_twins_views(image_size)


def vicreg_recipe(image_size: int, batch_size: int) -> RecipeLayer:
    """Sec. 4.2 and the official ``main_vicreg.py`` / README: LARS, lr ``--base-lr`` 0.2 x B/256 (the README's
    1000-epoch command at batch 2048), weight decay 1e-6, 10 warm-up epochs then cosine down to 1/1000 of the
    rate, batch 2048, lambda = mu = 25, nu = 1, expander 8192-8192-8192 without a last bias, zero-initialised
    residual BN scales (``zero_init_residual=True``).

    Images of at most 32 px: the paper has no CIFAR recipe; the expander is 2048-2048-2048 as in solo-learn's
    CIFAR configuration (``scripts/pretrain/cifar/vicreg.yaml``: ``proj_hidden_dim``/``proj_output_dim`` 2048,
    coefficients 25 / 25 / 1). Its optimiser (LARS with eta 0.02 and clipped trust ratios, weight decay 1e-4)
    is not this library's LARS, so the paper's optimiser values above are kept: a derived recipe.
    """
    width = 2048 if image_size <= SMALL_IMAGE_MAX else 8192
    return RecipeLayer(
        shared={"zero_init_residual": True,
                "optim": {"name": "lars", "lr": 0.2, "lr_scaling": "linear", "weight_decay": 1e-6, "momentum": 0.9,
                          "warmup_epochs": 10.0, "final_lr_fraction": 0.001}},
        section={"proj_hidden_dim": width, "proj_out_dim": width, "proj_layers": 3, "proj_last_bn": False,
                 "proj_last_bias": False, "sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0})


def describe(section: VICRegConfig) -> str:
    width = section.proj_hidden_dim or "h"
    return (f"coefficients {section.sim_coeff:g} / {section.std_coeff:g} / {section.cov_coeff:g}, "
            f"expander {width}-{section.proj_out_dim}")


SPEC = MethodSpec(
    name="vicreg", title="VICReg",
    paper="Bardes, Ponce and LeCun 2022, VICReg: Variance-Invariance-Covariance Regularization for "
          "Self-Supervised Learning (arXiv 2105.04906)",
    config=VICRegConfig, build=build_vicreg, views=vicreg_views,
    # LARS base lr 1.6 x B/256 (the paper's 0.2 x 2048/256: its per-step rate at its batch), 2048-d expander
    # (the config's defaults); measured in the module docstring
    cpu=RecipeLayer(shared={"optim": {"lr": 1.6}}),
    recipes=(PaperRecipe("vicreg", "VICReg paper (LARS 0.2 x B/256, wd 1e-6, coefficients 25 / 25 / 1, expander "
                         "8192 / 2048 at <= 32 px, 10 warm-up epochs, batch 2048)", vicreg_recipe),),
    paper_recipe="vicreg", accepts=("cpu", "vicreg"), paper_lr=lambda batch_size: 0.2 * batch_size / 256,
    describe=describe, collapse_dim=lambda section: section.proj_out_dim, min_batch=2, multicrop=True,
)
