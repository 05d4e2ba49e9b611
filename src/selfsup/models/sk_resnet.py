"""Selective-kernel ResNets, SimCLRv2's biggest encoders (Chen et al. 2020b, Sec. 2 and Table 1).

A selective-kernel (SK) convolution (Li et al. 2019, arXiv 1903.06586) runs several convolution paths
and mixes them per channel with softmax weights computed from the input's global context. SimCLRv2
puts one in place of the 3x3 convolution of every bottleneck block. As in SimCLRv2's released code:

- two paths, both 3x3 convolutions (computed as one convolution with twice the output channels), each
  followed by BN-ReLU. The SK paper's second path is a dilated 3x3; it has the same parameter count,
  so Table 1's counts do not tell the two apart, and we follow the released code;
- mixing weights: global average of the sum of the paths -> 1x1 conv to
  ``max(int(channels * sk_ratio), min_dim)`` channels (``sk_ratio=0.0625``, ``min_dim=32``) -> BN-ReLU
  -> 1x1 conv to ``2 x channels`` -> softmax over the two paths;
- the network otherwise is ResNet-D (He et al. 2019, "Bag of Tricks"): strided projection shortcuts
  average-pool first and then apply a stride-1 1x1 conv, and the 7x7 stem becomes three 3x3 convs
  (the small-image 3x3 stem is kept, as in the released code's CIFAR stem). ``resnet_d=False``
  turns this off. The released code also average-pools the stride-1 shortcut of the first stage (a
  2x2 window at stride 1); we leave that shortcut a plain 1x1 conv, as the ResNet-D paper does.

Parameter counts (backbone up to the average pool, ImageNet stem) match Table 1 of SimCLRv2 within 2%,
e.g. ResNet-50 1x+SK 35M and ResNet-152 3x+SK 795M: see ``tests/test_simclrv2.py``.
"""
from __future__ import annotations

import torch
from torch import nn

from selfsup.models.resnet import SMALL_IMAGE_MAX, Bottleneck, ResNet, RESNET_DEPTHS

SK_RATIO = 0.0625  # SimCLRv2's released code: mixing MLP width = channels / 16 ...
SK_MIN_DIM = 32  # ... but at least 32


class SelectiveKernelConv(nn.Module):
    """Two 3x3 paths (each Conv-BN-ReLU), mixed per channel by a softmax over paths (SK paper, Sec. 3.1)."""

    paths = 2

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, sk_ratio: float = SK_RATIO,
                 min_dim: int = SK_MIN_DIM):
        super().__init__()
        if not sk_ratio > 0:
            raise ValueError(f"sk_ratio must be > 0, got {sk_ratio} (use a plain ResNet for no selective kernels)")
        if min_dim < 1:
            raise ValueError(f"min_dim must be >= 1, got {min_dim}")
        self.out_channels = out_channels
        self.conv = nn.Conv2d(in_channels, self.paths * out_channels, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(self.paths * out_channels)
        mid = max(int(out_channels * sk_ratio), min_dim)
        self.fc1 = nn.Conv2d(out_channels, mid, 1, bias=False)
        self.fc1_bn = nn.BatchNorm2d(mid)
        self.fc2 = nn.Conv2d(mid, self.paths * out_channels, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.relu(self.bn(self.conv(x)))
        b, _, h, w = u.shape
        u = u.view(b, self.paths, self.out_channels, h, w)
        context = u.sum(dim=1).mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1): fuse, then squeeze
        logits = self.fc2(self.relu(self.fc1_bn(self.fc1(context))))
        weights = logits.view(b, self.paths, self.out_channels, 1, 1).softmax(dim=1)
        return (u * weights).sum(dim=1)


class SKBottleneck(Bottleneck):
    """Bottleneck whose 3x3 conv is selective-kernel. The SK conv ends in its own BN-ReLU per path, so
    ``bn2`` is an identity (the block's ReLU after it is then a no-op on the non-negative mix)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 conv3x3=None):
        super().__init__(inplanes, planes, stride, downsample, conv3x3=conv3x3)
        self.bn2 = nn.Identity()


def _resnet_d_shortcut(downsample: nn.Sequential) -> nn.Sequential:
    """Strided ``[conv1x1(stride s), BN]`` -> ``[AvgPool(2, s), conv1x1(stride 1), BN]`` (same weights' shapes)."""
    conv, bn = downsample[0], downsample[1]
    stride = conv.stride[0]
    if stride == 1:
        return downsample
    pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(pool, _init(nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=False)), bn)


def _deep_stem(in_channels: int, out_channels: int) -> nn.Sequential:
    """ResNet-D stem: 3x3 stride 2 -> 3x3 -> 3x3 (half, half, full width); BN-ReLU between, the
    ResNet's own ``bn1``/``relu`` after the last."""
    half = max(1, out_channels // 2)
    return nn.Sequential(
        _init(nn.Conv2d(in_channels, half, 3, 2, 1, bias=False)), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
        _init(nn.Conv2d(half, half, 3, 1, 1, bias=False)), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
        _init(nn.Conv2d(half, out_channels, 3, 1, 1, bias=False)),
    )


def _init(conv: nn.Conv2d) -> nn.Conv2d:
    # The same initialisation as the rest of the ResNet's convolutions.
    if not conv.weight.is_meta:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def build_sk_resnet(depth: int, width: float = 1.0, in_channels: int = 3, image_size: int = 224,
                    small_stem: bool | None = None, zero_init_residual: bool = False, sk_ratio: float = SK_RATIO,
                    sk_min_dim: int = SK_MIN_DIM, resnet_d: bool = True) -> ResNet:
    """ResNet-``depth`` (50/101/152) at ``width`` x channels with selective-kernel 3x3 convolutions.

    ``sk_ratio`` is the reduction ratio of the mixing MLP (SimCLRv2: 1/16, at least ``sk_min_dim``
    channels). The other options are those of the plain ResNet builders in ``selfsup.models.backbones``.
    """
    if depth not in (50, 101, 152):
        raise ValueError(f"selective kernels are defined for the bottleneck ResNets 50/101/152, got depth {depth}")
    if not sk_ratio > 0:
        raise ValueError(f"sk_ratio must be > 0, got {sk_ratio}; for no selective kernels use 'resnet{depth}'")
    if small_stem is None:
        small_stem = image_size <= SMALL_IMAGE_MAX

    def sk_conv(cin: int, cout: int, stride: int) -> nn.Module:
        return SelectiveKernelConv(cin, cout, stride, sk_ratio=sk_ratio, min_dim=sk_min_dim)

    model = ResNet(SKBottleneck, RESNET_DEPTHS[depth][1], width=width, in_channels=in_channels, small_stem=small_stem,
                   zero_init_residual=zero_init_residual, conv3x3=sk_conv)
    if resnet_d:
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            first = layer[0]
            if first.downsample is not None:
                first.downsample = _resnet_d_shortcut(first.downsample)
        if not small_stem:
            model.conv1 = _deep_stem(in_channels, model.bn1.num_features)
    model.sk_ratio = sk_ratio
    return model
