"""Projection and prediction heads (SimCLR Sec. 2.1 / SimCLRv2 Sec. 2 / BYOL Sec. 3.3)."""
from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """MLP g(.): ``num_layers`` Linear layers; every layer but the last is Linear-BN-ReLU.

    ``num_layers=2`` is SimCLR's head (and BYOL's projector / predictor), ``num_layers=3`` SimCLRv2's
    deeper head. The last layer has no ReLU; ``last_bn=True`` adds a BN without affine parameters
    after it (off by default). ``last_bn="scale"`` is the official SimCLR/SimCLRv2 code's ending: a BN
    with a learnable scale and no bias (PyTorch's affine BN with its bias frozen at zero, so state-dict
    keys and synchronised BN stay the usual ones). ``last_bias=False`` drops the last Linear's bias
    (the official BYOL code's projector and predictor). Biases are dropped where a BN follows.
    ``forward(x, return_all=True)`` returns ``[h, out_1, ..., out_L]`` where ``out_k`` is the
    output of layer k (after its ReLU), so SimCLRv2 can fine-tune from layer k (``[0]`` is the input).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool | str = False,
                 last_bias: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        for name, v in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.in_dim, self.hidden_dim, self.out_dim, self.num_layers = in_dim, hidden_dim, out_dim, num_layers
        layers = []
        dim = in_dim
        for i in range(num_layers):
            last = i == num_layers - 1
            width = out_dim if last else hidden_dim
            if last:
                block = [nn.Linear(dim, width, bias=last_bias and not last_bn)]
                if last_bn == "scale":
                    bn = nn.BatchNorm1d(width)
                    bn.bias.requires_grad_(False)  # scale only: the bias stays 0 (official code: center=False)
                    block.append(bn)
                elif last_bn:
                    block.append(nn.BatchNorm1d(width, affine=False))
            else:
                block = [nn.Linear(dim, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            layers.append(nn.Sequential(*block))
            dim = width
        self.layers = nn.ModuleList(layers)

    def layer_dim(self, k: int) -> int:
        """Width of the output of the first ``k`` layers (k=0: the input)."""
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"head layer must be in [0, {self.num_layers}], got {k}")
        if k == 0:
            return self.in_dim
        return self.out_dim if k == self.num_layers else self.hidden_dim

    def forward(self, x: torch.Tensor, return_all: bool = False):
        outs = [x]
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs if return_all else x
