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
  differences were within seed noise. See docs/benchmarks.md (BYOL section).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from selfsup.losses import byol_loss
from selfsup.methods.collapse import collapse_std
from selfsup.methods.ema import ema_update
from selfsup.models.heads import ProjectionHead

# Method defaults, applied by ``selfsup.training.config.build_config`` to keys the user did not give (the
# command line, a YAML file or ``--set``); ``config.yaml`` records the resolved values. The paper's
# ImageNet recipe is projector/predictor 4096/256, LARS lr 0.2 x B/256, weight decay 1.5e-6,
# base_tau 0.996 (Sec. 3.3 / Appendix C); base_tau keeps the paper's value (the field's default).
BYOL_DEFAULTS: dict = {
    "optim": {"lr": 3.0, "weight_decay": 1.5e-6},
}


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

    def forward(self, view1: torch.Tensor, view2: torch.Tensor):
        x = torch.cat([view1, view2], dim=0)
        z = self.projector(self.backbone(x))
        p = self.predictor(z)
        with torch.no_grad():
            z_target = self.target_projector(self.target_backbone(x))
        p1, p2 = p.chunk(2, dim=0)
        t1, t2 = z_target.chunk(2, dim=0)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        logs = {"collapse_std": collapse_std(z), "target_collapse_std": collapse_std(z_target)}
        return loss, logs

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """``xi <- tau xi + (1 - tau) theta`` for the target encoder and projector (BYOL Eq. 1)."""
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)

    def encoder(self) -> nn.Module:
        """The online encoder f, whose h is the representation evaluated downstream (BYOL Sec. 3.1)."""
        return self.backbone


def build_byol(cfg, backbone: nn.Module) -> BYOL:
    hidden = cfg.proj_hidden_dim or backbone.num_features
    last = {"last_bias": getattr(cfg, "proj_last_bias", True),
            "last_bn": "scale" if getattr(cfg, "proj_last_bn", False) else False}
    projector = ProjectionHead(backbone.num_features, hidden, cfg.proj_out_dim, num_layers=cfg.proj_layers, **last)
    predictor = None
    if cfg.predictor:
        predictor = ProjectionHead(cfg.proj_out_dim, cfg.pred_hidden_dim or hidden, cfg.proj_out_dim, num_layers=2,
                                   last_bias=last["last_bias"])
    return BYOL(backbone, projector, predictor)
