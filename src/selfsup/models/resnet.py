"""ResNet encoders (He et al. 2016) with the small-image stem and the fast convolution paths.

The one backbone interface: ``forward(x) -> pooled features``, attribute ``num_features``; the registry
that builds them by name is ``selfsup.models.backbones``.
The ResNets use torchvision's module names (``conv1``, ``bn1``, ``layer1.0.conv1``, ...), so a 1x
backbone's state dict loads into ``torchvision.models.resnet50()`` (with ``fc`` replaced by Identity).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

SMALL_IMAGE_MAX = 32  # inputs of at most this many pixels get the small-image stem (the official code's cut-off)
LEGACY_SMALL_IMAGE_MAX = 64  # the cut-off before; runs saved without a ``small_stem`` entry were built with it


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


# For a 3x3, padding-1 convolution on a 2x2 map, input position p reaches output position o through
# kernel tap (p - o + 1); every tap index is in range, so the convolution is one dense matrix.
_POS = [(0, 0), (0, 1), (1, 0), (1, 1)]
_TAP_H = torch.tensor([[p[0] - o[0] + 1 for o in _POS] for p in _POS])
_TAP_W = torch.tensor([[p[1] - o[1] + 1 for o in _POS] for p in _POS])


def _plain_graph() -> bool:
    """True while tracing, exporting or compiling: those see the ordinary convolution."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state dict) with exact CPU fast paths for tiny maps.

    On small images the last ResNet stage runs on 2x2 maps, where oneDNN's CPU weight-gradient
    kernel for a 3x3 convolution is ~5x slower than its forward. Such a convolution is exactly a
    matrix multiply of the flattened map, ``(N, 4*C_in) @ (4*C_in, 4*C_out)``, with the matrix
    gathered from the kernel (a 3x3 kernel on a 2x2 map touches each input position with one tap),
    and a 1x1 convolution is a linear layer over positions. On this project's CPU default encoder
    both together make a training step ~10% faster (``docs/results/speed.md``). The results agree with
    the convolution's to fp32 rounding (summation order). Only training steps take these paths: in
    eval mode, without gradients, on other devices and while tracing, exporting or compiling it is
    the plain convolution, so extracted features equal torchvision's bit for bit.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training and torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 4 and self.groups == 1 and self.dilation == (1, 1)
                and self.padding_mode == "zeros" and self.stride == (1, 1) and not _plain_graph()):
            n, c, h, w = x.shape
            rows = x.permute(0, 2, 3, 1)  # (N, H, W, C): free for channels-last input
            if self.kernel_size == (3, 3) and self.padding == (1, 1) and (h, w) == (2, 2):
                # rows of the matrix: (input position, input channel); columns: (output position, output channel)
                mat = self.weight[:, :, _TAP_H, _TAP_W].permute(2, 1, 3, 0).reshape(4 * c, 4 * self.out_channels)
                return self._to_map(rows.reshape(n, 4 * c) @ mat, x)
            if self.kernel_size == (1, 1) and self.padding == (0, 0) and h * w <= 4:
                return self._to_map(rows.reshape(n * h * w, c) @ self.weight.reshape(self.out_channels, c).t(), x)
        return super().forward(x)

    def _to_map(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        y = y.view(n, h, w, self.out_channels)
        if self.bias is not None:
            y = y + self.bias
        y = y.permute(0, 3, 1, 2)  # channels-last strides, no copy
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, **_):
        super().__init__()
        self.conv1 = Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv, as torchvision and SimCLR's code)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 conv3x3: Callable[[int, int, int], nn.Module] | None = None):
        super().__init__()
        self.conv1 = Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = (conv3x3 or _plain_conv3x3)(planes, planes, stride)
        self.bn2 = _bn(planes)
        self.conv3 = Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _bn(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _plain_conv3x3(cin: int, cout: int, stride: int) -> nn.Module:
    return Conv2d(cin, cout, 3, stride, 1, bias=False)


class ResNet(nn.Module):
    """ResNet encoder with a width multiplier and a stem chosen for the input size.

    ``width`` multiplies every channel count (SimCLR's 2x/4x, SimCLRv2's 2x/3x), unlike torchvision's
    ``wide_resnet`` which widens only the bottleneck. ``small_stem`` (3x3 stride-1 conv, no max-pool;
    SimCLR Appendix B.9 for CIFAR) replaces the 7x7 stride-2 conv + max-pool; by default it is used for
    inputs of at most 32 px (the official SimCLR code's cut-off; 64-96 px inputs such as STL-10 get the
    ImageNet stem unless ``small_stem=True``). The classifier is removed: ``forward`` returns the global-average-pooled
    features h, of size ``num_features``.
    """

    def __init__(self, block: type, layers: list[int], width: float = 1.0, in_channels: int = 3,
                 small_stem: bool = False, base_channels: int = 64, zero_init_residual: bool = False,
                 conv3x3: Callable[[int, int, int], nn.Module] | None = None, stem_stride: int = 1,
                 expand_features: int | None = None):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width multiplier must be > 0, got {width}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        widths = [max(1, int(round(base_channels * width * 2**i))) for i in range(4)]
        self.inplanes = widths[0]
        self.small_stem = small_stem
        if small_stem:
            self.conv1 = Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = _bn(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self._conv3x3 = conv3x3
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[3] * block.expansion
        # Optional MobileNetV2-style final 1x1 expansion (conv-BN-ReLU) before pooling: a wide h for
        # the price of one 1x1 conv at the lowest resolution. Off for the standard ResNets.
        self.expand = None
        if expand_features:
            self.expand = nn.Sequential(Conv2d(self.num_features, expand_features, 1, bias=False),
                                        _bn(expand_features), nn.ReLU(inplace=True))
            self.num_features = expand_features
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if not m.weight.is_meta:  # meta tensors hold no values; skipping keeps meta builds fast
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                last_bn = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else getattr(m, "bn2", None) if isinstance(m, BasicBlock) else None
                if last_bn is not None:
                    nn.init.zeros_(last_bn.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       _bn(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, conv3x3=self._conv3x3)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, conv3x3=self._conv3x3) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x if self.expand is None else self.expand(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)


RESNET_DEPTHS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}
