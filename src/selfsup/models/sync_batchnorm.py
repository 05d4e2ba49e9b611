"""Batch norm whose statistics span the global batch of every rank (SimCLR Sec. B.1: "global BN").

With data parallelism each device normally normalises by its own few samples, which for contrastive
methods leaks information (a device can recognise its own positives through the local statistics) and
makes the result depend on how the batch is split. Synchronised batch norm computes mean and variance
over the whole global batch, so N ranks with a per-rank batch B behave like one process with batch N*B.

On GPUs this is PyTorch's ``nn.SyncBatchNorm`` (fused kernels; DDP knows it). PyTorch's class refuses
CPU tensors, so on other devices (CPU with gloo: tests, laptops, CPU clusters) ``CrossRankBatchNorm``
does the same computation: one all-gather of per-rank (count, mean, M2) combined by Chan et al.'s
parallel variance formula in the forward pass, one all-reduce of two per-channel sums in the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup import distributed as dist

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

    Forward: each rank computes its count, per-channel mean and sum of squared deviations (M2), in
    fp32 (fp64 for fp64 inputs); one all-gather shares them and they combine exactly (Chan, Golub &
    LeVeque 1979): ``mean = sum n_r m_r / N``, ``M2 = sum M2_r + n_r (m_r - mean)^2``, ``var = M2 / N``.
    Backward: batch norm's input gradient needs two per-channel sums over the *global* batch,
    ``sum dy`` and ``sum dy * xhat``; one all-reduce provides them, as in PyTorch's CUDA
    ``SyncBatchNorm``. The weight and bias gradients stay local, DDP averages them like any other.
    The running variance gets the unbiased ``M2 / (N - 1)``, as in ``nn.BatchNorm``.
    """
    return _GlobalBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps)


class _GlobalBatchNorm(torch.autograd.Function):
    # Both passes lean on PyTorch's fused CPU kernels: the forward is batch norm in inference form with
    # the global statistics, the backward is inference-form batch norm's backward (which also yields
    # the local sums) plus the correction for the statistics' dependence on every rank's samples.

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        c = x.shape[1]
        dims = [0] + list(range(2, x.ndim))
        xf = x if x.dtype == torch.float64 else x.float()
        n_local = xf.numel() // c if c else 0
        if n_local:
            var_local, mean_local = torch.var_mean(xf, dims, correction=0)
        else:  # a rank with an empty batch still takes part in the collective
            var_local, mean_local = xf.new_zeros(c), xf.new_zeros(c)
        stats = torch.cat([xf.new_full((1,), float(n_local)), mean_local, var_local * n_local])
        gathered = dist.gather_no_grad(stats.unsqueeze(0))  # (W, 1 + 2C)
        counts, means, m2s = gathered[:, :1], gathered[:, 1:1 + c], gathered[:, 1 + c:]
        total = float(counts.sum())
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} in the global batch")
        mean = (counts * means).sum(0) / total
        m2 = (m2s + counts * (means - mean).pow(2)).sum(0)
        var = m2 / total
        if running_mean is not None and running_var is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((m2 / (total - 1)).to(running_var.dtype), momentum)
        w = weight.to(xf.dtype) if weight is not None else None
        y = F.batch_norm(xf, mean, var, w, bias.to(xf.dtype) if bias is not None else None, False, 0.0, eps)
        ctx.save_for_backward(xf, w, mean, var)
        ctx.total, ctx.eps, ctx.in_dtype = total, eps, x.dtype
        ctx.param_dtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else xf.dtype)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xf, w, mean, var = ctx.saved_tensors
        c = xf.shape[1]
        shape = (1, c) + (1,) * (xf.ndim - 2)
        # Inference-form backward: dx0 = dy * invstd * w, plus this rank's sum dy and sum dy * xhat.
        dx0, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy.to(xf.dtype), xf, w, mean, var, None, None, False, ctx.eps, [True, True, True])
        # The statistics depend on every rank's samples: the correction needs the global sums.
        sums = dist.all_reduce_sum(torch.cat([sum_dy, sum_dy_xhat]))
        invstd = torch.rsqrt(var + ctx.eps)
        gain = invstd if w is None else invstd * w
        mean_dy, mean_dy_xhat = sums[:c] / ctx.total, sums[c:] / ctx.total
        # dx = dx0 - gain * (mean_dy + xhat * mean_dy_xhat), with xhat = (x - mean) * invstd
        slope = gain * invstd * mean_dy_xhat
        offset = gain * mean_dy - mean * slope
        dx = None
        if ctx.needs_input_grad[0]:  # in place on the fresh dx0: two passes, no new activation-sized tensor
            dx = dx0.sub_(offset.view(shape)).addcmul_(xf, slope.view(shape), value=-1).to(ctx.in_dtype)
        grad_w = sum_dy_xhat.to(ctx.param_dtype) if ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(ctx.param_dtype) if ctx.needs_input_grad[2] else None
        return dx, grad_w, grad_b, None, None, None, None


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
