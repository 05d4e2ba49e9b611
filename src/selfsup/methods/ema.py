"""Exponential moving average of a network's weights (BYOL's target network, Grill et al. 2020, Sec. 3.1) and
the cosine schedule of its rate (Sec. 3.2)."""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """In place, for every parameter: ``target <- tau * target + (1 - tau) * online``.

    ``tau = 1`` leaves the target unchanged, ``tau = 0`` makes it a copy of the online network.
    ``target`` and ``online`` must have the same architecture (matching parameter and buffer names
    and shapes); a mismatch raises ``ValueError`` before anything is changed.

    Batch-norm running statistics (and every other buffer, e.g. ``num_batches_tracked``) are
    **copied** from the online network, not averaged. Why: during training the target network runs
    in training mode, so its batch norm normalises with the statistics of the current batch (as in
    the paper) and its running statistics never enter the loss; they matter only when the target is
    used in eval mode. There, the online network's running averages are the statistics of
    activations that the online weights produce, and the target's weights are an average of recent
    online weights, so copying them is the natural choice (and the common one in public BYOL/MoCo
    code). Averaging a running average a second time would add a second, unannounced time scale,
    and the target's own train-mode forward passes would otherwise keep overwriting them with
    statistics of whatever it last saw. Copying also makes the target's whole state a deterministic
    function of the online history, which is what resume restores.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    t_params, o_params = dict(target.named_parameters()), dict(online.named_parameters())
    t_bufs, o_bufs = dict(target.named_buffers()), dict(online.named_buffers())
    for kind, t, o in (("parameters", t_params, o_params), ("buffers", t_bufs, o_bufs)):
        if t.keys() != o.keys():
            diff = sorted(set(t) ^ set(o))
            raise ValueError(f"ema_update: target and online networks have different {kind} ({diff[:3]} ...); "
                             "the target must be a copy of the online network")
        wrong = [k for k in t if t[k].shape != o[k].shape]
        if wrong:
            raise ValueError(f"ema_update: {kind} {wrong[:3]} have different shapes in target and online networks")
    if t_params:
        # tau * t + (1 - tau) * o as two in-place multi-tensor ops (one kernel each on a GPU, no temporary).
        targets = list(t_params.values())
        torch._foreach_mul_(targets, tau)
        torch._foreach_add_(targets, [o_params[name].detach() for name in t_params], alpha=1.0 - tau)
    for name, tb in t_bufs.items():
        tb.copy_(o_bufs[name])


def ema_tau(step: int, total_steps: int, base_tau: float = 0.996) -> float:
    """BYOL's target decay rate (Grill et al. 2020, Sec. 3.2): ``1 - (1 - base_tau)(cos(pi k / K) + 1) / 2``.

    Rises from ``base_tau`` at step 0 to 1 at step ``K = total_steps`` (steps past K stay at 1).
    ``base_tau = 1`` gives a fixed target (Table 5a, "constant random network"). ``base_tau = 0`` is
    the paper's "stop gradient of online" ablation, where Table 5a's footnote keeps tau = 0 constant
    throughout training; the formula would instead ramp it from 0 to 1, so that one value is returned
    as a constant 0 (the target is the online network at every step).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0.0 <= base_tau <= 1.0:
        raise ValueError(f"base_tau must be in [0, 1], got {base_tau}")
    if base_tau == 0.0:
        return 0.0
    progress = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base_tau) * (math.cos(math.pi * progress) + 1.0) / 2.0
