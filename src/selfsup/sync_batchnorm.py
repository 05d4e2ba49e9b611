"""Batch norm whose statistics span the global batch of every rank (SimCLR Sec. B.1: "global BN").

With data parallelism each device normally normalises by its own few samples, which for contrastive
methods leaks information (a device can recognise its own positives through the local statistics) and
makes the result depend on how the batch is split. Synchronised batch norm computes mean and variance
over the whole global batch, so N ranks with a per-rank batch B behave like one process with batch N*B.

On GPUs this is PyTorch's ``nn.SyncBatchNorm`` (fused kernels; DDP knows it). PyTorch's class refuses
CPU tensors, so on other devices (CPU with gloo: tests, laptops, CPU clusters) ``CrossRankBatchNorm``
does the same computation from one differentiable all-gather of per-rank (count, mean, M2) combined by
Chan et al.'s parallel variance formula.
"""
from __future__ import annotations

import torch
from torch import nn

from selfsup import dist

# Devices on which torch.nn.SyncBatchNorm runs.
_NATIVE_DEVICES = ("cuda", "hpu", "xpu")


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch on any device: global statistics in training mode under
    ``torch.distributed``, the running statistics in eval mode, plain batch norm in one process.
    Accepts inputs of any rank >= 2 (channels on dim 1); synchronises over the world group."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or dist.world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return global_batch_norm(input, self.weight, self.bias, self.running_mean if self.track_running_stats else None,
                                 self.running_var if self.track_running_stats else None, factor, self.eps)


def global_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float,
                      eps: float) -> torch.Tensor:
    """Training-mode batch norm over the concatenation of every rank's ``x`` (channels on dim 1).

    Each rank computes its count, per-channel mean and sum of squared deviations (M2) in fp32 (or
    fp64 for fp64 inputs); one all-gather with gradients shares them, and they combine exactly
    (Chan, Golub & LeVeque 1979): ``mean = sum n_r m_r / N``, ``M2 = sum M2_r + n_r (m_r - mean)^2``.
    Gradients reach every rank's samples through the gather's backward, with the same semantics as
    ``nt_xent``'s gather. The running variance gets the unbiased ``M2 / (N - 1)``, as in ``nn.BatchNorm``.
    """
    c = x.shape[1]
    dims = [0] + list(range(2, x.ndim))
    shape = (1, c, *([1] * (x.ndim - 2)))
    xf = x if x.dtype == torch.float64 else x.float()
    n_local = xf.numel() // c if c else 0
    if n_local:
        mean_local = xf.mean(dims)
        m2_local = (xf - mean_local.view(shape)).pow(2).sum(dims)
    else:  # a rank with an empty batch still takes part in the collective
        mean_local = xf.new_zeros(c)
        m2_local = xf.new_zeros(c)
    count = xf.new_full((1,), float(n_local))
    stats = dist.gather_with_grad(torch.cat([count, mean_local, m2_local]).unsqueeze(0))  # (W, 1 + 2C)
    counts, means, m2s = stats[:, :1], stats[:, 1:1 + c], stats[:, 1 + c:]
    total = counts.sum()
    n_total = int(total.item())
    if n_total <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {n_total} in the global batch")
    mean = (counts * means).sum(0) / total
    m2 = (m2s + counts * (means - mean).pow(2)).sum(0)
    var = m2 / total
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype).view(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).view(shape)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
            running_var.lerp_((m2.detach() / (n_total - 1)).to(running_var.dtype), momentum)
    return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Replace every batch-norm layer of ``module`` by a synchronised one sharing its parameters and buffers.

    ``nn.SyncBatchNorm`` when ``device`` (default: where ``module``'s parameters live) is a GPU,
    ``CrossRankBatchNorm`` otherwise. State-dict keys do not change, so checkpoints load into converted
    and unconverted models alike.
    """
    if device is None:
        first = next(iter(list(module.parameters()) + list(module.buffers())), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type in _NATIVE_DEVICES:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_generic(module)


def _convert_generic(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (nn.SyncBatchNorm, CrossRankBatchNorm)):
        out = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert_generic(child))
    return out
