"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, Sec. 2.1, Eq. 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.distributed import gather_with_grad, rank, world_size


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent loss over a batch of positive pairs.

    ``z1[k]`` and ``z2[k]`` are the projections of two views of image ``k``; neither needs to be
    normalised. Every one of the 2N views is an anchor: its positive is the other view of the same
    image, its negatives the 2N - 2 remaining views, and ``sim(u, v) = u.v / (|u||v|)``::

        l(i, j) = -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )

    The result is the mean of ``l`` over all 2N anchors, i.e. both directions (i, j) and (j, i) as in
    the paper's Algorithm 1. When ``torch.distributed`` is initialised the negatives come from the
    global batch (views of every rank, gathered with gradients); each rank averages over its own
    anchors, so DDP's gradient averaging yields the global mean. Computed in fp32 whatever the
    autocast state, since a bf16 softmax over thousands of logits loses the positives' signal.

    Mean versus sum: the paper's Eq. (1)-(2) average over the 2N anchors, as here. The official code
    (``objective.py``) adds the two directions, each averaged over N, so its loss and gradients are
    2x ours. What that means for the hyper-parameters: under LARS (the recipes) the update's size is
    set by the trust ratio, so the learning rate carries over unchanged and the official weight decay
    ``wd`` acts like ``wd / 2`` here (the update is ``g + wd w`` with ``g`` halved); under plain SGD
    the official ``(lr, wd)`` equal our ``(2 lr, wd / 2)``; under AdamW (scale-invariant in ``g``)
    nothing changes. The recipes keep the papers' values (``selfsup.methods.recipes``).
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent expects two (N, d) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    # One collective for both views; gradients flow back to the rank that owns each row.
    z1_all, z2_all = gather_with_grad(torch.cat([z1, z2], dim=1)).chunk(2, dim=1)
    n_global = z1_all.shape[0]
    if n_global < 2:
        raise ValueError("nt_xent needs at least 2 images in the (global) batch: with one image there are no negatives")
    offset = rank() * n if world_size() > 1 else 0

    anchors = torch.cat([z1, z2], dim=0)  # (2n, d): this rank's views
    keys = torch.cat([z1_all, z2_all], dim=0)  # (2N, d): every view in the global batch
    logits = anchors @ keys.T / temperature  # (2n, 2N)

    local = torch.arange(n, device=z1.device) + offset
    self_index = torch.cat([local, local + n_global])
    positive_index = torch.cat([local + n_global, local])
    rows = torch.arange(2 * n, device=z1.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_index] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, positive_index)
