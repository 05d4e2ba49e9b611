"""VICReg's variance-invariance-covariance loss (Bardes, Ponce and LeCun 2022, Sec. 3, Eq. 1-6)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from selfsup.distributed import gather_with_grad, world_size
from selfsup.losses._precision import autocast_off, check_embedding_pair

VARIANCE_EPS = 1e-4  # epsilon of the regularised standard deviation S(x, eps) (Eq. 1)
STD_TARGET = 1.0  # gamma, the hinge's target standard deviation (Eq. 1)


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0) -> torch.Tensor:
    """VICReg's loss on the two views' expander outputs ``z1``, ``z2`` of shape (N, d)::

        s(Z, Z')  = mean over the N*d entries of (z - z')^2                       invariance (Eq. 5)
        v(Z)      = (1/d) sum_j relu(1 - sqrt(Var(z^j) + 1e-4))                  variance (Eq. 1-2)
        c(Z)      = (1/d) sum_{i != j} Cov(Z)_ij^2,                                covariance (Eq. 3-4)
                    Cov(Z) = (1/(N-1)) sum_b (z_b - mean)(z_b - mean)^T
        L = sim_coeff * s(Z, Z') + std_coeff * [v(Z) + v(Z')] / 2 + cov_coeff * [c(Z) + c(Z')]

    ``Var`` is the unbiased variance over the batch. Defaults are the paper's lambda = mu = 25,
    nu = 1 (the official code's too). Collapsed embeddings (every row equal, both views) give
    ``std_coeff * (1 - sqrt(1e-4)) = 25 * 0.99``: the variance hinge is the only term left, and the
    ``1e-4`` keeps its gradient finite at zero variance.

    This is the official code's form (facebookresearch/vicreg ``main_vicreg.py``), which the
    coefficients were tuned with; it differs from the paper's Eq. 5-6 in two ways: the invariance is
    the mean over the N*d entries (Eq. 5: the mean over N of the squared distance, d times larger),
    and the two views' variance terms are averaged (Eq. 6: summed).

    Across ranks (``torch.distributed`` initialised), as in the official code: the invariance term is
    the mean over this rank's pairs, while the variance and covariance terms are computed on the
    embeddings gathered from every rank with gradients, i.e. on the global batch, redundantly on each
    rank. So each rank returns ``sim_coeff * s_local + global variance and covariance terms``; the
    mean over ranks is the loss of one process on the global batch (equal per-rank batches), and DDP's
    mean of the ranks' gradients is that loss's gradient (the gather sums the ranks' gradients into
    the rows each rank owns). Computed in fp32 with autocast off (the official code runs under fp16
    autocast).
    """
    check_embedding_pair("vicreg_loss", z1, z2, world_size(), "for a variance")
    n, d = z1.shape
    for name, v in (("sim_coeff", sim_coeff), ("std_coeff", std_coeff), ("cov_coeff", cov_coeff)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0 (the paper's are 25, 25, 1), got {v}")
    with autocast_off(z1):
        z1, z2 = z1.float(), z2.float()
        invariance = F.mse_loss(z1, z2)
        # One collective for both views; the backward sums every rank's gradient into the owner's rows.
        z1_all, z2_all = gather_with_grad(torch.cat([z1, z2], dim=1)).chunk(2, dim=1)
        variance = (_variance_hinge(z1_all) + _variance_hinge(z2_all)) / 2
        covariance = _covariance_off_diagonal(z1_all) + _covariance_off_diagonal(z2_all)
        return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance


def _variance_hinge(z: torch.Tensor) -> torch.Tensor:
    """v(Z) = mean over dimensions of relu(1 - sqrt(Var + 1e-4)), Var unbiased over the batch (Eq. 1-2)."""
    std = torch.sqrt(z.var(dim=0) + VARIANCE_EPS)
    return F.relu(STD_TARGET - std).mean()


def _covariance_off_diagonal(z: torch.Tensor) -> torch.Tensor:
    """c(Z) = sum of the squared off-diagonal entries of the (d, d) covariance, divided by d (Eq. 3-4)."""
    n, d = z.shape
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / (n - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d
