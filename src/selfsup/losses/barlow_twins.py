"""Barlow Twins' redundancy-reduction loss (Zbontar et al. 2021, Sec. 2, Eq. 1-2)."""
from __future__ import annotations

import math

import torch

from selfsup.distributed import all_reduce_sum, gather_with_grad, world_size
from selfsup.losses._precision import autocast_off, check_embedding_pair

BATCH_NORM_EPS = 1e-5  # the official code standardises with nn.BatchNorm1d(affine=False), whose eps this is


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float = 0.0051) -> torch.Tensor:
    """Barlow Twins' loss: the cross-correlation of the two views' embeddings pushed to the identity.

    ``z1[b]`` and ``z2[b]`` are the projector outputs of two views of image ``b``, shape (N, d). Each
    dimension is standardised over the batch, ``zn = (z - mean) / sqrt(var + 1e-5)`` (the biased
    variance and eps of batch norm in training mode, which is how the official code standardises),
    then, with ``C = z1n^T z2n / N`` the (d, d) cross-correlation matrix (Eq. 2)::

        L = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2        (Eq. 1)

    The invariance term drives ``C_ii`` to 1, the redundancy-reduction term the off-diagonal entries
    to 0. Perfectly correlated, decorrelated dimensions (``z2 = z1`` with orthogonal standardised
    columns) give the minimum, ~0; collapsed embeddings (a constant column standardises to 0) give
    ``C = 0``, i.e. ``d``. ``lambda_offdiag`` defaults to the official code's 0.0051
    (facebookresearch/barlowtwins ``main.py``, ``--lambd``); the paper's implementation details state
    5e-3.

    Across ranks (``torch.distributed`` initialised) the means, variances and ``C`` are those of the
    global batch, as in the official code (SyncBatchNorm, then an all-reduce of ``C``). Every rank
    returns the same value, the global loss ``L``, and its rows receive ``W * dL/dz`` (W ranks, each
    with the same loss): DDP's mean over ranks then gives ``dL/dtheta``, the gradient of one process
    on the global batch. Only statistics travel (d-vectors and one (d, d) all-reduce); each rank
    multiplies only its own rows. Ranks may hold different batch sizes. Computed in fp32 with autocast
    off, since ``C_ii`` sits near 1 and a bf16 product loses the deviation the loss is made of.

    Deviations from the official code: (1) it all-reduces ``C`` outside autograd, so each rank
    back-propagates only its own loss and, after DDP's mean, its gradient is ``dL/dtheta / W``
    where ours is ``dL/dtheta`` (its README trains the 2048 batch on W = 16 GPUs, the paper on 32).
    Its LARS steps the weights along ``g + wd * w`` (rescaled by the trust ratio), so its ``wd`` on
    W GPUs is ``W * wd`` here; the biases and batch-norm parameters take plain steps ``lr_b * g`` (no
    LARS, no decay), so its ``lr_b`` is ``lr_b / W`` here. (2) It runs under fp16 autocast; here fp32.
    """
    check_embedding_pair("barlow_twins_loss", z1, z2, world_size(), "to standardise each dimension")
    n, d = z1.shape
    if not (math.isfinite(lambda_offdiag) and lambda_offdiag >= 0):
        raise ValueError(f"lambda_offdiag must be a finite number >= 0 (the paper's is 5e-3), got {lambda_offdiag}")
    with autocast_off(z1):
        z = torch.cat([z1, z2], dim=1).float()  # (n, 2d): both views' statistics in one collective
        # Global sums and row count in one gather (with gradients: every row moves the global mean).
        totals = gather_with_grad(torch.cat([z.sum(dim=0), z.new_tensor([n])])[None]).sum(dim=0)
        count = totals[-1].detach()
        centred = z - totals[:-1] / count
        var = gather_with_grad(centred.pow(2).sum(dim=0)[None]).sum(dim=0) / count  # biased, as batch norm
        zn = centred / torch.sqrt(var + BATCH_NORM_EPS)
        c = _sum_over_ranks_same_loss(zn[:, :d].T @ zn[:, d:] / count)  # (d, d), Eq. 2
        diag = torch.diagonal(c)
        on_diag = (1.0 - diag).pow(2).sum()
        off_diag = c.pow(2).sum() - diag.pow(2).sum()  # sum over i != j of C_ij^2 without a (d, d) mask
        return on_diag + lambda_offdiag * off_diag


def _sum_over_ranks_same_loss(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, for a loss that every rank computes identically from this sum.

    Forward: one all-reduce. Backward: ``W * grad`` into the local ``x``. That is what an all-reduce of
    the ranks' gradients would deliver, since every rank's loss is the same function of the sum and so
    has the same gradient with respect to it, without a second (d, d) collective. ``x - x.detach()``
    is zero in value and the identity in gradient.
    """
    if world_size() == 1:
        return x
    return all_reduce_sum(x) + world_size() * (x - x.detach())
