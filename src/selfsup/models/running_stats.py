"""Encoding multi-crop's local crops without touching batch norm's running statistics.

A method with local crops (SwAV, Caron et al. 2020; DINO, Caron et al. 2021) sends the small crops through
the encoder in a pass of their own. In training mode batch norm normalises that pass with its own batch
statistics, as it should, but it would also fold them into the running mean and variance that eval mode
uses: with the global pass first and the local pass second, each at momentum 0.1, the running statistics
settle at about 0.47 x the global crops' and 0.53 x the local crops'. Frozen features (linear probe, kNN,
fine-tuning's start) are computed at the global size, so they would be normalised with statistics of
another resolution. :func:`encode_local_crops` keeps the running statistics those of the global crops: the
local pass is normalised by its batch, as before, and leaves every running buffer as it found it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def running_stats_frozen(module: nn.Module):
    """Inside, batch norm in ``module`` still normalises with the batch's statistics in training mode but
    does not update ``running_mean`` / ``running_var`` / ``num_batches_tracked``; on exit every layer's
    momentum and counter are as they were."""
    saved = []
    for m in module.modules():  # tracking layers always hold num_batches_tracked
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0  # running <- (1 - 0) running + 0 x batch: unchanged
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def encode_local_crops(backbone: nn.Module, local_views) -> torch.Tensor:
    """``backbone`` on the local crops, concatenated along the batch, in one pass, without changing its
    batch-norm running statistics (module docstring)."""
    with running_stats_frozen(backbone):
        return backbone(torch.cat(list(local_views), dim=0))
