"""Switching autocast off inside a loss, so its matmuls run in fp32 whatever the caller's autocast state."""
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
