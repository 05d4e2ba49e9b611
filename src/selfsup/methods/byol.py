"""BYOL, Bootstrap Your Own Latent (Grill et al. 2020, arXiv 2006.07733).

Online network: encoder f -> projector g -> predictor q. Target network: a copy of f and g whose
weights are an exponential moving average of the online ones, never trained by gradients. The loss
regresses the online prediction of one view onto the target projection of the other, symmetrised.

Deviations from the paper, written down:

- Both views go through each network in one batch of 2N (as our SimCLR does), so batch norm sees
  both views' statistics; the official code applies the networks to each view separately.
- CPU defaults: projector and predictor hidden width = the encoder's ``num_features`` and 128
  out (the generic ``proj_hidden_dim`` / ``proj_out_dim`` defaults, as for SimCLR) instead of
  4096 / 256, so the heads follow the encoder. ``BYOL_DEFAULTS`` sets LARS base lr 3.0 (x B/256)
  instead of 0.2, with the paper's weight decay 1.5e-6: at batch 256 this is the paper's per-step
  LARS update at batch 4096 (0.2 x 16 = 3.2), since a CPU run has a few hundred small-batch steps,
  not ~100k large ones. In a 100-step pilot (1/16-width encoder, batch 64) lr 0.2 / 1.0 / 3.0
  reached loss 1.64 / 1.45 / 1.39 and 3.0 was stable at batch 256; the pilot's linear-probe
  differences were within seed noise.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from selfsup.errors import check_field
from selfsup.losses import byol_loss
from selfsup.losses.multicrop import mean_with_local_terms
from selfsup.methods.collapse import collapse_std
from selfsup.methods.ema import ema_tau, ema_update
from selfsup.methods.simclr import MAX_DIM, ProjectionConfig
from selfsup.methods.spec import MethodSpec, PaperRecipe, RecipeLayer
from selfsup.models.heads import ProjectionHead
from selfsup.models.running_stats import encode_local_crops
from selfsup.views.config import ViewConfig


@dataclass
class BYOLConfig(ProjectionConfig):
    """BYOL's keys (section ``byol``): the projector (``proj_*``), the predictor and the target's EMA rate."""

    predictor: bool = True  # false: BYOL without predictor (Table 5b ablation)
    pred_hidden_dim: int | None = None  # predictor proj_out_dim -> this -> proj_out_dim; None: proj_hidden_dim
    base_tau: float = 0.996  # target EMA rate at step 0, cosine-annealed to 1 (Sec. 3.2); 1: fixed target; 0: no EMA

    def validate(self, prefix: str = "byol.") -> None:
        super().validate(prefix)
        check_field(prefix + "proj_layers", self.proj_layers >= 1, "must be >= 1 (BYOL's projector has layers)")
        check_field(prefix + "pred_hidden_dim", self.pred_hidden_dim is None or 1 <= self.pred_hidden_dim <= MAX_DIM,
                    f"must be in [1, {MAX_DIM}]")
        check_field(prefix + "base_tau", 0 <= self.base_tau <= 1,
                    "must be in [0, 1] (paper: 0.996; 1 = fixed target, 0 = no EMA)")


class BYOL(nn.Module):
    """Online ``backbone -> projector -> predictor``; target ``target_backbone -> target_projector``.

    The target starts as an exact copy of the online encoder and projector. Its parameters have
    ``requires_grad=False``, so they receive no gradient and an optimiser built from the module's
    trainable parameters never holds them; they change only through ``update_target(tau)``, which
    the training loop calls after every optimiser step (``forward`` has no hidden side effects).

    ``predictor=None`` removes the predictor (BYOL Table 5b ablation: the online projection is
    regressed directly onto the target's). The loss is the paper's ``L + L~`` (Eq. 2): ``byol_loss``
    of view 1's prediction against view 2's target projection plus the same with views swapped, so
    it lies in [0, 8].
    """

    # Under DDP the target is left out of gradient reduction and buffer broadcast (selfsup.distributed.wrap_ddp):
    # ``update_target`` computes it from the online weights, which are identical on every rank.
    ddp_ignore = ("target_backbone", "target_projector")

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor if predictor is not None else nn.Identity()
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(projector)
        for p in self.target_parameters():
            p.requires_grad_(False)

    def target_parameters(self):
        yield from self.target_backbone.parameters()
        yield from self.target_projector.parameters()

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *local_views: torch.Tensor):
        """The loss of two global views and any number of local crops after them (multi-crop).

        Two views: the paper's ``byol_loss(p1, t2) + byol_loss(p2, t1)`` (Eq. 2). With ``V`` local crops the
        target network sees the global views only (SwAV, Caron et al. 2020, Sec. 3.2: every crop is compared
        with the global views only; as DINO's teacher, Caron et al. 2021, Sec. 3.1); each global view's
        prediction regresses onto the other global view's target projection, and each local crop's prediction
        onto both global views' target projections. The loss is ``2 x`` the mean of these ``2 + 2V`` terms, so
        it keeps the two-view loss's scale (``L + L~``, in [0, 8]) and with no local crops is exactly it.
        """
        x = torch.cat([view1, view2], dim=0)
        h = self.backbone(x)
        if local_views:  # another resolution: its own encoder pass, one head pass on every crop
            h = torch.cat([h, encode_local_crops(self.backbone, local_views)], dim=0)
        z = self.projector(h)
        p = self.predictor(z)
        with torch.no_grad():
            z_target = self.target_projector(self.target_backbone(x))
        p1, p2, *p_local = p.chunk(2 + len(local_views), dim=0)
        t1, t2 = z_target.chunk(2, dim=0)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        if p_local:
            terms = [byol_loss(pv, t) for pv in p_local for t in (t1, t2)]
            loss = 2 * mean_with_local_terms(loss, 2, terms)
        logs = {"collapse_std": collapse_std(z[:x.shape[0]]), "target_collapse_std": collapse_std(z_target)}
        return loss, logs

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """``xi <- tau xi + (1 - tau) theta`` for the target encoder and projector (BYOL Eq. 1)."""
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)

    def encoder(self) -> nn.Module:
        """The online encoder f, whose h is the representation evaluated downstream (BYOL Sec. 3.1)."""
        return self.backbone


def build_byol(section: BYOLConfig, backbone: nn.Module, num_classes: int | None = None) -> BYOL:
    hidden = section.proj_hidden_dim or backbone.num_features
    projector = section.head(backbone.num_features)
    predictor = None
    if section.predictor:
        predictor = ProjectionHead(section.proj_out_dim, section.pred_hidden_dim or hidden, section.proj_out_dim,
                                   num_layers=2, last_bias=section.proj_last_bias)
    return BYOL(backbone, projector, predictor)


def byol_views(image_size: int) -> tuple[ViewConfig, ViewConfig]:
    """BYOL Table 6: two asymmetric view distributions (blur 1.0 / 0.1, solarize 0 / 0.2)."""
    return ViewConfig.byol(image_size, 1), ViewConfig.byol(image_size, 2)


def byol_recipe(image_size: int, batch_size: int) -> RecipeLayer:
    """BYOL Sec. 3.3 / App. C: LARS lr 0.2 x B/256, weight decay 1.5e-6, base tau 0.996, projector and predictor
    4096-256 whose last layer has no bias (official code), 10 warm-up epochs, zero-initialised residual BN scales
    (official code)."""
    return RecipeLayer(
        shared={"zero_init_residual": True,
                "optim": {"name": "lars", "lr": 0.2, "lr_scaling": "linear", "weight_decay": 1.5e-6, "momentum": 0.9,
                          "warmup_epochs": 10.0, "final_lr_fraction": 0.0}},
        section={"proj_hidden_dim": 4096, "proj_out_dim": 256, "pred_hidden_dim": 4096, "proj_last_bias": False,
                 "base_tau": 0.996})


# The official configs' values by run length (deepmind-research byol/configs/byol.py: _LR_PRESETS,
# _WD_PRESETS, _EMA_PRESETS): epochs -> (base lr x B/256, weight decay, base tau).
LENGTH_PRESETS = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99), 1000: (0.2, 1.5e-6, 0.996)}


def byol_length_preset(epochs: float | None) -> RecipeLayer:
    """The official config's lr, weight decay and base tau for a run of ``epochs`` epochs: the preset nearest in
    log scale (the official code accepts only 40, 100, 300 and 1,000); the 1,000-epoch one (the paper's main
    setting) when the length is not known before the run."""
    nearest = 1000 if epochs is None or epochs <= 0 else min(
        LENGTH_PRESETS, key=lambda e: abs(math.log(e) - math.log(epochs)))
    lr, wd, tau = LENGTH_PRESETS[nearest]
    return RecipeLayer(shared={"optim": {"lr": lr, "weight_decay": wd}}, section={"base_tau": tau})


def byol_target_tau(section: BYOLConfig, step: int, total_steps: int | None) -> float:
    """The cosine schedule of Sec. 3.2 over the run (``base_tau`` itself while a timed run measures its pace)."""
    return ema_tau(step, total_steps, section.base_tau) if total_steps else section.base_tau


SPEC = MethodSpec(
    name="byol", title="BYOL",
    paper="Grill et al. 2020, Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning (arXiv 2006.07733)",
    config=BYOLConfig, build=build_byol, views=byol_views,
    # LARS base lr 3.0 x B/256 with the paper's weight decay (see the module docstring)
    cpu=RecipeLayer(shared={"optim": {"lr": 3.0, "weight_decay": 1.5e-6}}),
    recipes=(PaperRecipe("byol", "BYOL paper (LARS 0.2 x B/256, wd 1.5e-6, tau 0.996, heads 4096-256, "
                         "10 warm-up epochs; lr, wd and tau by run length as the official configs)", byol_recipe,
                         by_length=byol_length_preset),),
    paper_recipe="byol", accepts=("cpu", "byol"), paper_lr=lambda batch_size: 0.2 * batch_size / 256,
    describe=lambda section: f"base tau {section.base_tau:g}" + ("" if section.predictor else ", no predictor"),
    target_tau=byol_target_tau, collapse_dim=lambda section: section.proj_out_dim,
    collapse_hint="keep byol.predictor=true and 0 < byol.base_tau < 1 (paper: 0.996), or lower optim.lr", multicrop=True,
)
