"""Barlow Twins (Zbontar, Jing, Misra, LeCun and Deny 2021, arXiv 2103.03230).

Encoder f -> projector g (3 Linear layers, BN + ReLU between them, 8192-d at ImageNet size); the loss
pushes the cross-correlation matrix of the two views' batch-standardised projections to the identity
(Eq. 1-2, :func:`selfsup.losses.barlow_twins_loss`). Collapse is what the redundancy-reduction term
prevents: the run logs ``collapse_std`` of the projections and the spec sets ``collapse_dim``.

The two learning rates. The paper (Sec. 4, implementation details) trains the weights with LARS at
0.2 x B/256 and the biases and batch-norm parameters with plain momentum SGD at 0.0048 x B/256 (the
official ``main.py``: ``--learning-rate-weights 0.2 --learning-rate-biases 0.0048``, both on one
schedule). The core's optimiser has one learning rate for every scheduled parameter group, so this
module expresses the second rate as ``bias_lr_ratio``: before every optimiser step (the spec's
``before_optimizer_step`` hook) the gradients of the parameters with ``ndim <= 1`` are multiplied by it.
Those parameters take plain momentum-SGD steps without weight decay under ``lars`` and ``sgd``
(``selfsup.training.optim.split_decay_groups``), whose updates are linear in the gradient, so this is
exactly a learning rate of ``bias_lr_ratio x optim.lr`` for them. AdamW is invariant to the scale of a
gradient; a ratio other than 1 is refused there.

The gradient scale of the official code. ``barlow_twins_loss`` gives every rank the gradient of the
loss on the global batch; the official code all-reduces ``C`` outside autograd, so after DDP's mean
its gradient is ``1/W`` of ours on W GPUs (the loss's docstring). Its LARS steps the weights along
``g + wd * w`` rescaled by the trust ratio, so its weight decay on W GPUs is ``W * wd`` here; its
biases take plain steps ``lr_b * g``, so its bias rate is ``lr_b / W`` here. The paper trains on
W = 32 GPUs, so its recipe here is weight decay 32 x 1.5e-6 = 4.8e-5 and bias rate 0.0048 / 32 =
1.5e-4 (x B/256), i.e. ``bias_lr_ratio`` 1.5e-4 / 0.2 = 7.5e-4. (The released ``main.py`` defaults
to weight decay 1e-6 and its README trains on 16 GPUs: 1.6e-5 and a ratio of 1.5e-3 here. The code
the paper was developed with scaled the loss by 0.024 with one learning rate instead, which is
where 0.0048 = 0.2 x 0.024 comes from.)

Deviations, written down:

- The two views go through the network one after the other, as in the official code (batch norm
  sees each view's own statistics), not in one batch of 2N as this library's SimCLR and BYOL do.
- CPU default (the ``cpu`` layer, the narrow encoders): a 2048-wide projector instead of 8192 (2x the
  default encoder's 1024 features; 8192 would cost ~20x the encoder's parameters) with the core's
  single learning rate (``bias_lr_ratio`` 1) and LARS base lr 1.6 x B/256, the paper's rate at its batch
  of 2048 (0.2 x 2048/256), since a CPU run has a thousand small-batch steps. Measured: 1,000 steps on
  Fashion-MNIST at batch 256 give linear top-1 85.01% (random init 81.00%, SimCLR 86.70%, BYOL 84.75%)
  and kNN top-1 78.71% (k 200; the same encoder at random init 72.45%,
  SimCLR's CPU default 79.54%, BYOL's 75.65%), loss 1482 -> 520, ``collapse_std`` from 0.016 at the
  start to 0.0217 = 0.98/sqrt(2048) (never near the warning threshold, 0.4/sqrt(d)).
  A narrower (1024) projector was not measured.
- Computed in fp32 (the official code runs the loss under fp16 autocast).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from selfsup.data.containers import SMALL_IMAGE_MAX
from selfsup.errors import ConfigError, check_field
from selfsup.losses import barlow_twins_loss
from selfsup.losses.multicrop import symmetric_multicrop_loss
from selfsup.methods.collapse import collapse_std
from selfsup.methods.simclr import ProjectionConfig
from selfsup.methods.spec import MethodSpec, PaperRecipe, RecipeLayer
from selfsup.models.running_stats import encode_local_crops
from selfsup.views.config import ViewConfig

PAPER_GPUS = 32  # "Training is distributed across 32 V100 GPUs" (Sec. 4): the W of the official gradient scale


@dataclass
class BarlowTwinsConfig(ProjectionConfig):
    """Barlow Twins' keys (section ``barlow_twins``). Defaults: the CPU recipe's (2048-d projector)."""

    proj_hidden_dim: int | None = 2048  # paper: 8192; None: the encoder's num_features
    proj_out_dim: int = 2048  # paper: 8192
    proj_layers: int = 3  # paper: 3 Linear layers
    proj_last_bias: bool = False  # official main.py: the last Linear has no bias
    lambda_offdiag: float = 0.0051  # lambda of Eq. 1 (official --lambd 0.0051; paper text 5e-3)
    bias_lr_ratio: float = 1.0  # lr of biases and BN parameters / optim.lr (paper: 0.0048 / 0.2 / 32 GPUs)

    def validate(self, prefix: str = "barlow_twins.") -> None:
        super().validate(prefix)
        check_field(prefix + "proj_layers", self.proj_layers >= 1,
                    "must be >= 1 (the loss standardises the projector's output; paper: 3)")
        check_field(prefix + "lambda_offdiag", math.isfinite(self.lambda_offdiag) and self.lambda_offdiag >= 0,
                    "must be a finite number >= 0 (paper: 5e-3, official code 0.0051)")
        check_field(prefix + "bias_lr_ratio", math.isfinite(self.bias_lr_ratio) and self.bias_lr_ratio > 0,
                    "must be > 0 (1: the weights' learning rate; the paper's recipe: 7.5e-4)")


def scale_bias_gradients(model: nn.Module, ratio: float, optimizer_name: str) -> None:
    """Multiply the gradients of the parameters with ``ndim <= 1`` by ``ratio``: under ``lars`` and ``sgd``
    (no weight decay, no trust ratio for them) a learning rate of ``ratio x lr`` for exactly those parameters."""
    if ratio == 1.0:
        return
    if optimizer_name not in ("lars", "sgd"):
        raise ConfigError(f"bias_lr_ratio: {ratio:g} is a second learning rate expressed through the gradients, "
                          f"which {optimizer_name} ignores (scale-invariant); use optim.name=lars or sgd, or set it "
                          "to 1")
    grads = [p.grad for p in model.parameters() if p.ndim <= 1 and p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, ratio)


def bias_lr_hook(model: nn.Module, step: int, schedule) -> None:
    """The spec's ``before_optimizer_step``: the section's ``bias_lr_ratio`` applied to this step's gradients."""
    scale_bias_gradients(model, schedule.cfg.section.bias_lr_ratio, schedule.cfg.optim.name)


def barlow_twins_multicrop_loss(z1: torch.Tensor, z2: torch.Tensor, z_local: Sequence[torch.Tensor] = (),
                                lambda_offdiag: float = 0.0051) -> torch.Tensor:
    """Barlow Twins' loss with local crops: the mean of ``barlow_twins_loss`` over the ``1 + 2V`` pairs.

    ``z1``, ``z2`` are the global views' projections, ``z_local`` the ``V`` local crops' (each (N, d), rows
    aligned by image). The pairs are the global pair ``(z1, z2)`` and every ``(z_v, z_g)`` of a local crop with a
    global view; local crops are never paired with each other (SwAV, Caron et al. 2020, Sec. 3.2), and every pair
    weighs the same (DINO's mean over its pairs, Caron et al. 2021, Eq. 3). Each term is the whole Eq. 1 on its
    own cross-correlation matrix, so the mean keeps the two-view loss's scale (0 at the optimum, ``d`` when
    collapsed), which ``lambda_offdiag`` and the learning rates were tuned for; a sum would grow with ``V``.
    With no local crops it is ``barlow_twins_loss(z1, z2)`` exactly. Across ranks every term standardises and
    correlates over the global batch (``barlow_twins_loss``), and the mean of terms keeps that.
    """
    return symmetric_multicrop_loss(lambda a, b: barlow_twins_loss(a, b, lambda_offdiag), z1, z2, z_local)


class BarlowTwins(nn.Module):
    """``z = g(f(x))`` for each view; the loss is Barlow Twins' (Eq. 1) between the two views' z.

    Local crops after the two global views (``forward(g1, g2, *local_crops)``, multi-crop) go through the network
    in one pass together (another resolution; batch norm sees all local crops at once) and the loss is
    :func:`barlow_twins_multicrop_loss`.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, lambda_offdiag: float = 0.0051):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.lambda_offdiag = lambda_offdiag

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *local_views: torch.Tensor):
        # One view at a time, as the official code does (batch norm sees each view's statistics).
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        z_local = ()
        if local_views:
            z_local = self.projector(encode_local_crops(self.backbone, local_views)).chunk(len(local_views), dim=0)
        loss = barlow_twins_multicrop_loss(z1, z2, z_local, self.lambda_offdiag)
        return loss, {"collapse_std": collapse_std(torch.cat([z1, z2], dim=0))}

    def encoder(self) -> nn.Module:
        """The encoder f, whose output is the representation evaluated downstream (Sec. 4)."""
        return self.backbone


def build_barlow_twins(section: BarlowTwinsConfig, backbone: nn.Module, num_classes: int | None = None) -> BarlowTwins:
    return BarlowTwins(backbone, section.head(backbone.num_features), lambda_offdiag=section.lambda_offdiag)


def barlow_twins_views(image_size: int) -> tuple[ViewConfig, ViewConfig]:
    """Sec. 4: BYOL's asymmetric augmentations (official ``Transform``: blur 1.0 / 0.1, solarize 0 / 0.2)."""
    return ViewConfig.byol(image_size, 1), ViewConfig.byol(image_size, 2)


def barlow_twins_recipe(image_size: int, batch_size: int) -> RecipeLayer:
    """Sec. 4 and the official ``main.py``: LARS, lr 0.2 x B/256 for the weights and 0.0048 x B/256 for the
    biases and batch-norm parameters, weight decay 1.5e-6, 10 warm-up epochs then cosine down to 1/1000 of the
    rate, batch 2048, lambda 0.0051, projector 8192-8192-8192 without a last bias, zero-initialised residual BN
    scales (``resnet50(zero_init_residual=True)``). The official gradient is ``1/W`` of ours on its 32 GPUs, so
    the weight decay is written 32 x 1.5e-6 and the bias rate 0.0048 / 32 (``bias_lr_ratio`` 7.5e-4; module
    docstring).

    Images of at most 32 px: neither the paper nor the official code has a CIFAR recipe; the projector is
    2048-2048-2048 as in solo-learn's CIFAR configuration (``scripts/pretrain/cifar/barlow.yaml``:
    ``proj_hidden_dim``/``proj_output_dim`` 2048, lambda 0.0051). Its optimiser (LARS with eta 0.02 and
    clipped trust ratios, weight decay 1e-4, the loss scaled by 0.1) is not this library's LARS, so the
    paper's optimiser values above are kept: a derived recipe, not a published one.
    """
    width = 2048 if image_size <= SMALL_IMAGE_MAX else 8192
    return RecipeLayer(
        shared={"zero_init_residual": True,
                "optim": {"name": "lars", "lr": 0.2, "lr_scaling": "linear", "weight_decay": PAPER_GPUS * 1.5e-6,
                          "momentum": 0.9, "warmup_epochs": 10.0, "final_lr_fraction": 0.001}},
        section={"proj_hidden_dim": width, "proj_out_dim": width, "proj_layers": 3, "proj_last_bn": False,
                 "proj_last_bias": False, "lambda_offdiag": 0.0051, "bias_lr_ratio": 0.0048 / 0.2 / PAPER_GPUS})


def describe(section: BarlowTwinsConfig) -> str:
    width = section.proj_hidden_dim or "h"
    ratio = "" if section.bias_lr_ratio == 1.0 else f", bias lr x{section.bias_lr_ratio:.3g}"
    return f"lambda {section.lambda_offdiag:g}, projector {width}-{section.proj_out_dim}{ratio}"


SPEC = MethodSpec(
    name="barlow_twins", title="Barlow Twins",
    paper="Zbontar, Jing, Misra, LeCun and Deny 2021, Barlow Twins: Self-Supervised Learning via Redundancy "
          "Reduction (arXiv 2103.03230)",
    config=BarlowTwinsConfig, build=build_barlow_twins, views=barlow_twins_views,
    # LARS base lr 1.6 x B/256 (the paper's 0.2 x 2048/256: its per-step rate at its batch), 2048-d projector
    # (the config's defaults); measured in the module docstring
    cpu=RecipeLayer(shared={"optim": {"lr": 1.6}}),
    recipes=(PaperRecipe("barlow_twins", "Barlow Twins paper (LARS 0.2 x B/256, biases 0.0048 x B/256, wd 1.5e-6 "
                         "on 32 GPUs, lambda 0.0051, projector 8192 / 2048 at <= 32 px, 10 warm-up epochs, "
                         "batch 2048)", barlow_twins_recipe),),
    paper_recipe="barlow_twins", accepts=("cpu", "barlow_twins"), paper_lr=lambda batch_size: 0.2 * batch_size / 256,
    describe=describe, collapse_dim=lambda section: section.proj_out_dim, min_batch=2,
    before_optimizer_step=bias_lr_hook, multicrop=True,
)
