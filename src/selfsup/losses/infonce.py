"""MoCo v3's InfoNCE loss (Chen, Xie and He 2021, Sec. 3, Algorithm 1), with MoCo v2's optional queue of keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.distributed import gather_no_grad, rank
from selfsup.losses._precision import autocast_off


def infonce_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 1.0,
                 queue: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE of queries against keys: the key of the same image is the positive, every other key a negative.

    ``q`` (N, d) are the query encoder's predictions, ``k`` (N, d) the momentum encoder's keys for
    the other view of the same images; both are l2-normalised here. ``k`` is a constant (the momentum
    encoder's output): it is detached. With the keys of the global batch ``K`` (gathered from every
    rank, without gradients, as the official ``concat_all_gather``) and ``q_i``'s positive ``k_i``::

        L = 2 * t * mean_i [ -log( exp(q_i . k_i / t) / sum_j exp(q_i . k_j / t) ) ]

    i.e. ``CrossEntropy(q K^T / t, labels) * 2t`` with the labels offset by ``rank * N``, exactly the
    official ``contrastive_loss`` (facebookresearch/moco-v3 ``moco/builder.py``; Algorithm 1's ``ctr``).
    The ``2t`` factor is the official scale: it cancels the ``1/t`` the logits bring into the
    gradient. MoCo v3 is symmetrised by the caller: ``infonce_loss(q1, k2) + infonce_loss(q2, k1)``.
    The default temperature 1.0 is the official code's for ResNet-50 (``--moco-t`` default, kept by
    every ResNet-50 command of its CONFIG.md); its ViT commands use ``--moco-t=.2``.

    ``queue`` (M, d), optional, holds past keys (MoCo v2, Chen et al. 2020, arXiv 2003.04297): they
    are appended to every row's logits as extra negatives, positive for no query (normalised here too,
    detached). Unlike MoCo v2, whose logits are the positive and the queue only, the other keys of the
    current batch stay negatives as well, and the ``2t`` scale applies (MoCo v2's loss is the plain
    cross-entropy, i.e. this loss divided by ``2t``; its t is 0.2 with 65536 keys). ``enqueue_keys``
    returns the queue after a step.

    Across ranks each rank returns the mean over its own queries; the mean over ranks is the loss of
    one process on the global batch (equal per-rank batches), and DDP's mean of the ranks' gradients
    is its gradient (the keys carry none). Computed in fp32 with autocast off (the official code's
    logits come out of fp16 autocast).
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"infonce_loss expects q and k of equal shape (N, d), got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"infonce_loss needs N >= 1 queries of dimension d >= 1, got shape {tuple(q.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (MoCo v3: 1.0 for ResNet-50, 0.2 for ViT), got {temperature}")
    if queue is not None and (queue.ndim != 2 or queue.shape[1] != q.shape[1]):
        raise ValueError(f"queue must be a (M, d) tensor of past keys with d = {q.shape[1]}, got {tuple(queue.shape)}")
    n = q.shape[0]
    with autocast_off(q):
        q = F.normalize(q.float(), dim=1)
        keys = gather_no_grad(F.normalize(k.detach().float(), dim=1))  # (W*N, d), in rank order
        if queue is not None:
            keys = torch.cat([keys, F.normalize(queue.detach().float(), dim=1)])
        if keys.shape[0] < 2:
            raise ValueError("infonce_loss needs at least 2 keys (global batch plus queue): with one key the loss is 0")
        logits = q @ keys.T / temperature
        labels = torch.arange(n, device=q.device) + rank() * n
        return F.cross_entropy(logits, labels) * (2.0 * temperature)


@torch.no_grad()
def enqueue_keys(queue: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The queue after one step: this step's keys from every rank in front, the oldest keys dropped.

    ``queue`` (M, d) holds past keys, newest first; ``k`` (N, d) this rank's keys. The keys are
    l2-normalised and gathered from every rank (no gradients), so every rank gets the same queue;
    the result is ``cat([keys of ranks 0..W-1, queue])[:M]``: first in, first out, fixed size M
    (MoCo, He et al. 2020, Sec. 3.2; MoCo v2 keeps 65536 keys). If a step brings more than M keys,
    the first M are kept. Returns a new tensor with ``queue``'s dtype and device; every rank must call
    it (a collective). MoCo starts the queue from random unit vectors.
    """
    if queue.ndim != 2 or k.ndim != 2 or k.shape[1] != queue.shape[1]:
        raise ValueError(f"enqueue_keys expects a (M, d) queue and (N, d) keys with the same d, got "
                         f"{tuple(queue.shape)} and {tuple(k.shape)}")
    if queue.shape[0] < 1:
        raise ValueError("enqueue_keys needs a queue of at least one row (MoCo v2 keeps 65536)")
    keys = gather_no_grad(F.normalize(k.detach().float(), dim=1)).to(queue.dtype)
    return torch.cat([keys, queue])[:queue.shape[0]]
