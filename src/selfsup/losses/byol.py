"""BYOL's regression loss (Grill et al. 2020, Sec. 3.1, Eq. 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``|p/|p| - z/|z||^2 = 2 - 2 cos(p, z)``.

    ``p`` is the online network's prediction for one view, ``z`` the target network's projection
    of the other view. ``z`` is a constant (the paper's stop-gradient, ``sg(z')``): no gradient
    flows into it even if it requires grad. The value lies in [0, 4]. BYOL's total loss is the sum
    of this loss and its symmetrised twin with the views swapped (``BYOL.forward``). Computed in
    fp32 whatever the autocast state.
    """
    if p.ndim != 2 or p.shape != z.shape:
        raise ValueError(f"byol_loss expects two (N, d) tensors of equal shape, got {tuple(p.shape)} and {tuple(z.shape)}")
    if p.shape[0] == 0:
        raise ValueError("byol_loss needs at least one pair, got an empty batch")
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.detach().float(), dim=1)
    return (2.0 - 2.0 * (p * z).sum(dim=1)).mean()
