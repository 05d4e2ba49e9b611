"""What the losses share: autocast switched off inside a loss (its matmuls in fp32 whatever the caller's autocast
state), and the check of a pair of embedding batches."""
from __future__ import annotations

import contextlib

import torch


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which autocast is disabled for ``x``'s device type.

    Casting the inputs with ``.float()`` is not enough: under autocast a matmul of fp32 tensors still
    runs in bf16/fp16. Gradients flow through the context unchanged (back to the inputs' dtype).
    """
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def check_embedding_pair(name: str, z1: torch.Tensor, z2: torch.Tensor, world: int, why: str) -> None:
    """``ValueError`` naming the loss unless ``z1`` and ``z2`` are (N, d) batches of equal shape with d >= 1 and at
    least 2 rows over the ``world`` processes (``why``: what the loss needs them for)."""
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"{name} expects two (N, d) tensors of equal shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    n, d = z1.shape
    if d < 1:
        raise ValueError(f"{name} needs embeddings with at least one dimension, got d = 0")
    if n < 1 or n * world < 2:
        raise ValueError(f"{name} needs at least 2 images in the (global) batch {why}, got {n} on each of {world} "
                         "process(es)")
