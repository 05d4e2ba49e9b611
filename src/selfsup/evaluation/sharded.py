"""Feature extraction split over ranks: each rank embeds a contiguous shard, every rank gets all features.

In one process this is ``evaluate.extract_features``. Under ``torchrun`` the wall time of an
evaluation (the kNN monitor during pre-training, ``selfsup eval``) drops by the number of ranks and no
rank idles in a collective while rank 0 works alone, which with NCCL's timeouts could kill a long
evaluation.
"""
from __future__ import annotations

import torch
from torch import nn

from selfsup import distributed as dist
from selfsup.evaluation.frozen import extract_features


@torch.no_grad()
def extract_features_sharded(model: nn.Module, dataset, device: torch.device | str, image_size: int,
                             indices: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract_features`` of ``dataset[indices]`` (all images if None), computed shard by shard.

    Rank ``r`` embeds ``indices.tensor_split(world)[r]``; the shards are gathered in rank order, so
    the result has the order of ``indices`` on every rank. Rank 0's buffers (batch-norm running
    statistics, the ones checkpoints store) are broadcast first, so the features are those a single
    process holding the checkpoint would compute, also when batch norm was not synchronised.
    """
    if dist.world_size() == 1:
        return extract_features(model, dataset, device, image_size, indices=indices, **kwargs)
    if indices is None:
        indices = torch.arange(len(dataset))
    dist.broadcast_buffers(model)
    mine = indices.tensor_split(dist.world_size())[dist.rank()]
    if len(mine):
        feats, labels = extract_features(model, dataset, device, image_size, indices=mine, **kwargs)
    else:  # more ranks than images: this rank contributes nothing, but must know the feature width
        probe, _ = extract_features(model, dataset, device, image_size, indices=indices[:1], **kwargs)
        feats, labels = probe[:0], torch.empty(0, dtype=torch.long)
    return dist.gather_uneven(feats), dist.gather_uneven(labels)
