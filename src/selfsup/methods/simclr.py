"""SimCLR (Chen et al. 2020): encoder f, projection head g, NT-Xent on two views; its spec, config section and recipe."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from selfsup.data.containers import SMALL_IMAGE_MAX
from selfsup.errors import check_field
from selfsup.losses import nt_xent
from selfsup.losses.multicrop import symmetric_multicrop_loss
from selfsup.methods.spec import MethodSpec, PaperRecipe, RecipeLayer
from selfsup.models.heads import ProjectionHead
from selfsup.models.running_stats import encode_local_crops
from selfsup.views.config import ViewConfig

MAX_DIM = 65536  # wider heads cannot be trained in memory; refused before any work


@dataclass
class ProjectionConfig:
    """The projection head g: ``proj_layers`` Linear layers (BN + ReLU between them) to ``proj_out_dim``."""

    proj_hidden_dim: int | None = None  # None: the backbone's num_features (official code)
    proj_out_dim: int = 128
    proj_layers: int = 2  # 0: no head, z = h (SimCLR Figure 8 ablation); 1: linear head
    proj_last_bn: bool = False  # the head ends in BN with a scale and no bias (official SimCLR/SimCLRv2 code)
    proj_last_bias: bool = True  # bias of the head's last Linear (official BYOL code: false)

    def validate(self, prefix: str) -> None:
        check_field(prefix + "proj_out_dim", 1 <= self.proj_out_dim <= MAX_DIM, f"must be in [1, {MAX_DIM}]")
        check_field(prefix + "proj_hidden_dim", self.proj_hidden_dim is None or 1 <= self.proj_hidden_dim <= MAX_DIM,
                    f"must be in [1, {MAX_DIM}]")
        check_field(prefix + "proj_layers", self.proj_layers >= 0, "must be >= 0 (0: no projection head, z = h)")

    def head(self, in_dim: int) -> nn.Module:
        """The head on ``in_dim`` features (``nn.Identity`` for ``proj_layers = 0``)."""
        if self.proj_layers == 0:  # "no projection head" of SimCLR Figure 8: the loss is computed on h
            return nn.Identity()
        return ProjectionHead(in_dim, self.proj_hidden_dim or in_dim, self.proj_out_dim, num_layers=self.proj_layers,
                              last_bn="scale" if self.proj_last_bn else False, last_bias=self.proj_last_bias)


@dataclass
class SimCLRConfig(ProjectionConfig):
    """SimCLR's keys (section ``simclr``). Defaults: the CPU recipe's (temperature 0.2)."""

    temperature: float = 0.2  # NT-Xent's tau (paper: 0.1 at ImageNet size, 0.5 at CIFAR size)

    def validate(self, prefix: str = "simclr.") -> None:
        super().validate(prefix)
        check_field(prefix + "temperature", self.temperature > 0 and math.isfinite(self.temperature), "must be > 0")


class SimCLR(nn.Module):
    """``h = f(x)``, ``z = g(h)``; the loss is NT-Xent between the two views' z (SimCLR Sec. 2.1).

    With ``head.num_layers == 3`` this is SimCLRv2's pre-training model (Chen et al. 2020b, Sec. 2).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.backbone = backbone
        self.head = head
        self.temperature = temperature

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *local_views: torch.Tensor):
        """The loss of two global views and any number of local crops after them (multi-crop).

        Two views: ``nt_xent(z1, z2)``, the paper's loss. With ``V`` local crops (SwAV, Caron et al. 2020,
        Sec. 3.2: each crop is compared with the global views only; its App. applies multi-crop to SimCLR) the loss
        is the mean of ``1 + 2V`` NT-Xent terms, each over the batch and both directions: the global pair
        ``(z1, z2)`` and every pair ``(z_v, z_g)`` of a local crop ``v`` with a global view ``g``; local crops
        are never paired with each other. The negatives of a term are the other images' crops of that term's
        two crops. The mean over pairs follows DINO's loss (Caron et al. 2021, Eq. 3), which averages over
        every (global, other crop) pair. With no local crops the computation is exactly the two-view one.
        """
        # One forward over both views: batch norm then sees 2N samples, as in the paper's implementation. Local
        # crops (another resolution) get their own encoder pass, and the head runs once on every crop, as in
        # DINO's MultiCropWrapper.
        h = self.backbone(torch.cat([view1, view2], dim=0))
        if local_views:
            h = torch.cat([h, encode_local_crops(self.backbone, local_views)], dim=0)
        z = self.head(h)
        z1, z2, *z_local = z.chunk(2 + len(local_views), dim=0)
        loss = symmetric_multicrop_loss(lambda a, b: nt_xent(a, b, self.temperature), z1, z2, z_local)
        with torch.no_grad():
            zn = torch.nn.functional.normalize(z[:2 * view1.shape[0]].float(), dim=1)
            logs = {"z_std": zn.std(dim=0).mean()}
        return loss, logs

    def encoder(self) -> nn.Module:
        """The network whose output h is the representation used downstream."""
        return self.backbone


def build_simclr(section: SimCLRConfig, backbone: nn.Module, num_classes: int | None = None) -> SimCLR:
    return SimCLR(backbone, section.head(backbone.num_features), temperature=section.temperature)


def simclr_views(image_size: int) -> tuple[ViewConfig, ViewConfig]:
    """One distribution for both views (SimCLR Sec. 2.1)."""
    return ViewConfig.simclr(image_size), ViewConfig.simclr(image_size)


def simclr_paper_lr(batch_size: int) -> float:
    """App. B.1: the larger of 0.3 x B/256 and 0.075 x sqrt(B) (they agree at 4096)."""
    return max(0.3 * batch_size / 256, 0.075 * math.sqrt(batch_size))


def simclr_recipe(image_size: int, batch_size: int) -> RecipeLayer:
    """SimCLR App. B.1 and B.9: LARS, lr 0.3 x B/256 at batch >= 4096 and the square-root rule 0.075 x sqrt(B)
    below (recommended for small batches and short runs, Fig. B.1), weight decay 1e-6, temperature 0.1 (0.5 for
    images of at most 32 px, App. B.9), 10 warm-up epochs then cosine; head 2048-2048-128 on a ResNet-50 (hidden
    width = the encoder's num_features, official code) ending in BN with a scale and no bias, and the last BN
    scale of every residual block initialised to zero (official code)."""
    sqrt = batch_size < 4096
    return RecipeLayer(
        shared={"zero_init_residual": True,
                "optim": {"name": "lars", "lr": 0.075 if sqrt else 0.3, "lr_scaling": "sqrt" if sqrt else "linear",
                          "weight_decay": 1e-6, "momentum": 0.9, "warmup_epochs": 10.0, "final_lr_fraction": 0.0}},
        section={"temperature": 0.5 if image_size <= SMALL_IMAGE_MAX else 0.1, "proj_out_dim": 128,
                 "proj_hidden_dim": None, "proj_last_bn": True})


SPEC = MethodSpec(
    name="simclr", title="SimCLR",
    paper="Chen, Kornblith, Norouzi and Hinton 2020, A Simple Framework for Contrastive Learning of Visual "
          "Representations (arXiv 2002.05709)",
    config=SimCLRConfig, build=build_simclr, views=simclr_views,
    # LARS base lr 2.0 x B/256, tuned for short runs of the narrow encoders (benchmarks/cpu_default_search.py)
    cpu=RecipeLayer(shared={"optim": {"lr": 2.0}}),
    recipes=(PaperRecipe("simclr", "SimCLR paper (LARS 0.075 x sqrt(B) below batch 4096, 0.3 x B/256 from 4096, "
                         "wd 1e-6, temperature 0.1 / 0.5 at <= 32 px, 10 warm-up epochs)", simclr_recipe),),
    paper_recipe="simclr", accepts=("cpu", "simclr", "simclrv2"), paper_lr=simclr_paper_lr,
    describe=lambda section: f"temperature {section.temperature:g}", min_batch=2, multicrop=True,
)
