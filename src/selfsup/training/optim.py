"""LARS (You et al. 2017) as used by SimCLR and BYOL, and the optimiser factory."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling with momentum (SimCLR Sec. 2.2 / B.1; official TF code).

    For every parameter ``w`` with gradient ``g``, not excluded::

        g <- g + weight_decay * w
        trust = eta * |w| / |g|     (1 when either norm is 0)
        v <- momentum * v + lr * trust * g
        w <- w - v

    Parameters with ``ndim <= 1`` (biases, batch-norm scales and shifts) are excluded from both the
    weight decay and the trust ratio, as in the papers; they get plain momentum SGD. A param group
    may also set ``lars_exclude=True`` explicitly.
    """

    def __init__(self, params: Iterable, lr: float = 0.3, momentum: float = 0.9, weight_decay: float = 1e-6,
                 eta: float = 0.001, exclude_1d: bool = True):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, exclude_1d=exclude_1d,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                excluded = group["lars_exclude"] or (group["exclude_1d"] and p.ndim <= 1)
                if not excluded:
                    if group["weight_decay"] != 0:
                        g = g.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    g = g * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(g, alpha=group["lr"])
                p.sub_(buf)
        return loss


def split_decay_groups(model: nn.Module) -> list[dict]:
    """Param groups: weights (decayed) and biases/norm parameters (no weight decay, no LARS adaptation).

    A method whose module names sub-modules in ``fixed_lr_modules`` (SimSiam's predictor, Chen and He 2021,
    Sec. 4.1) gets those parameters in groups marked ``fixed_lr``: the schedule leaves their learning rate
    at its starting value.
    """
    fixed = tuple(f"{name}." for name in getattr(model, "fixed_lr_modules", ()))
    groups: dict[tuple[bool, bool], list] = {(False, False): [], (True, False): [], (False, True): [], (True, True): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[(p.ndim <= 1, name.startswith(fixed))].append(p)
    out = [{"params": groups[(False, False)]}, {"params": groups[(True, False)], "weight_decay": 0.0, "lars_exclude": True}]
    if fixed:
        out += [{"params": groups[(False, True)], "fixed_lr": True},
                {"params": groups[(True, True)], "weight_decay": 0.0, "lars_exclude": True, "fixed_lr": True}]
    return out


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``lars`` (paper default), ``sgd`` or ``adamw``; biases and norm parameters are never decayed."""
    return optimizer_from_groups(name, split_decay_groups(model), lr, weight_decay, momentum)


def optimizer_from_groups(name: str, groups: list[dict], lr: float, weight_decay: float,
                          momentum: float = 0.9) -> torch.optim.Optimizer:
    """``lars``, ``sgd`` or ``adamw`` over prepared param groups (``lars_exclude`` is kept for LARS only)."""
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for g in groups:
        g.pop("lars_exclude", None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use 'lars', 'sgd' or 'adamw'")
