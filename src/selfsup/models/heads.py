"""Projection and prediction heads (SimCLR Sec. 2.1 / SimCLRv2 Sec. 2 / BYOL Sec. 3.3 / DINO Sec. 3.1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


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

    The same class is the head of the other methods' official code, layer for layer:

    - Barlow Twins' projector (Zbontar et al. 2021; facebookresearch/barlowtwins ``main.py``) and
      VICReg's expander (Bardes et al. 2022; facebookresearch/vicreg ``Projector``), both 8192-d:
      ``ProjectionHead(2048, 8192, 8192, num_layers=3, last_bias=False)``. VICReg's code gives its hidden
      Linears a bias, which the batch norm right after cancels (its gradient is zero in training), so
      dropping it changes nothing but the parameter count.
    - MoCo v3 (facebookresearch/moco-v3 ``_build_mlp``): the projector is ``num_layers=3`` for ViT (2 in
      the ResNet-50 code), hidden 4096, out 256, ``last_bn=True``; the predictor ``num_layers=2``,
      ``last_bias=False`` (plus ``last_bn=True`` for ViT).
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


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, Sec. 3.1; facebookresearch/dino ``DINOHead``).

    An MLP of ``num_layers`` Linear layers (GELU between them, hidden ``hidden_dim``, output
    ``bottleneck_dim``; a batch norm after each hidden Linear with ``use_bn``), then l2 normalisation, then
    ``last_layer``: a weight-normalised Linear without bias to ``out_dim`` (K) outputs, ``W = g * V / |V|``
    row by row, with ``g`` initialised to 1. With ``norm_last_layer=True`` (the official default) ``g``
    stays fixed at 1, so every output is a cosine between the bottleneck feature and a unit prototype;
    the official help text: leaving ``g`` free performs better but can make training unstable (its ViT-S
    runs use False, ViT-B True). The teacher's head always uses True there. Defaults are the paper's:
    hidden 2048, bottleneck 256, K = 65536, 3 layers, no batch norm. The MLP's Linear weights start
    from a truncated normal (std 0.02), biases 0, as in the official code; the last layer keeps
    PyTorch's default Linear init.

    The last layer is the attribute ``last_layer``, so every one of its parameter names contains
    ``"last_layer"``: DINO keeps it frozen during the first epoch (the official
    ``cancel_gradients_last_layer`` drops the gradients of the parameters with that name). Its weight norm
    is ``torch.nn.utils.parametrizations.weight_norm`` (the maintained API): ``g`` and ``V`` are
    ``last_layer.parametrizations.weight.original0`` and ``original1``; a state dict with the official
    checkpoint's ``last_layer.weight_g`` / ``weight_v`` loads into it (PyTorch converts the keys).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 (the paper's head has 3), got {num_layers}")
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                        ("bottleneck_dim", bottleneck_dim)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.in_dim, self.out_dim, self.num_layers = in_dim, out_dim, num_layers
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)
