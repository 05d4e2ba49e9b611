"""SimCLR (Chen et al. 2020): encoder f, projection head g, NT-Xent on two views."""
from __future__ import annotations

import torch
from torch import nn

from selfsup.losses import nt_xent
from selfsup.models.heads import ProjectionHead


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

    def forward(self, view1: torch.Tensor, view2: torch.Tensor):
        # One forward over both views: batch norm then sees 2N samples, as in the paper's implementation.
        h = self.backbone(torch.cat([view1, view2], dim=0))
        z = self.head(h)
        z1, z2 = z.chunk(2, dim=0)
        loss = nt_xent(z1, z2, self.temperature)
        with torch.no_grad():
            zn = torch.nn.functional.normalize(z.float(), dim=1)
            logs = {"z_std": zn.std(dim=0).mean()}
        return loss, logs

    def encoder(self) -> nn.Module:
        """The network whose output h is the representation used downstream."""
        return self.backbone


def build_simclr(cfg, backbone: nn.Module) -> SimCLR:
    if cfg.proj_layers == 0:  # "no projection head" of SimCLR Figure 8: the loss is computed on h
        return SimCLR(backbone, nn.Identity(), temperature=cfg.temperature)
    head = ProjectionHead(backbone.num_features, cfg.proj_hidden_dim or backbone.num_features, cfg.proj_out_dim,
                          num_layers=cfg.proj_layers, last_bn="scale" if getattr(cfg, "proj_last_bn", False) else False,
                          last_bias=getattr(cfg, "proj_last_bias", True))
    return SimCLR(backbone, head, temperature=cfg.temperature)
