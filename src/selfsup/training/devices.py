"""Devices and precision: which device a run uses and whether it computes in bf16."""

from __future__ import annotations

import contextlib

import torch

from selfsup import distributed as dist
from selfsup.errors import ConfigError




def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank() if dist.launched_by_torchrun() else 0)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} was asked for but CUDA is not available; use --set device=cpu")
    if name == "cuda":
        return torch.device("cuda", dist.local_rank() if dist.launched_by_torchrun() else torch.cuda.current_device())
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 runs natively: CUDA with bf16 units, CPUs with AVX512-BF16/AMX (oneDNN's check).

    On CPUs without them PyTorch emulates bf16 and a step gets several times slower, so ``auto``
    keeps fp32 there.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
