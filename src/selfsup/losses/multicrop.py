"""Multi-crop (SwAV, Caron et al. 2020, Sec. 3.2): how a two-view loss takes the terms of local crops.

Every local crop is compared with the two global views only, and every comparison weighs the same as one term of
the two-view loss: the result is the mean over all terms, so it keeps the two-view loss's scale (which its
coefficients and learning rates were tuned for) instead of growing with the number of crops.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def mean_with_local_terms(pair_sum: torch.Tensor, pair_terms: int, local_terms: Sequence[torch.Tensor],
                          local_divisor: float = 1.0) -> torch.Tensor:
    """``(pair_sum + sum(local_terms) / local_divisor) / (pair_terms + len(local_terms))``.

    ``pair_sum`` is the sum of the two-view loss's ``pair_terms`` terms (a symmetric pair loss is one term; a loss
    of two directions, e.g. ``L(p1, z2) + L(p2, z1)``, is two), ``local_terms`` the losses of the local crops'
    comparisons, each divided by ``local_divisor`` (a scale the two-view terms were already divided by).
    """
    return (pair_sum + torch.stack(list(local_terms)).sum() / local_divisor) / (pair_terms + len(local_terms))


def symmetric_multicrop_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z1: torch.Tensor,
                             z2: torch.Tensor, z_local: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The mean of a symmetric pair loss ``loss_fn(a, b)`` over the global pair ``(z1, z2)`` and every pair
    ``(z_v, z_g)`` of a local crop with a global view (``1 + 2V`` terms; local crops never paired with each
    other). With no local crops it is ``loss_fn(z1, z2)`` exactly."""
    loss = loss_fn(z1, z2)
    if z_local:
        loss = mean_with_local_terms(loss, 1, [loss_fn(zv, zg) for zv in z_local for zg in (z1, z2)])
    return loss
