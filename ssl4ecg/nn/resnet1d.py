"""A 1-D ResNet encoder for ECG, registered as encoder ``"resnet1d"``.

The network is the ResNet of He et al. (2016) with every 2-D operation made 1-D: a stem
(convolution, batch norm, ReLU, optional max-pool), four stages of residual blocks with
time strides 1, 2, 2, 2, and global average pooling. ``variant = "resnet50"`` uses
bottleneck blocks 3-4-6-3 with widths 64-128-256-512 and expansion 4, i.e. a 2048-d output,
the encoder of the SimCLR baseline in the ECG-JEPA paper. ``"small"`` (one basic block per
stage, widths 32-256) is the CPU-sized default.

All leads enter as input channels of the stem; a subset of ``spec.leads`` is accepted by
zero-filling the missing lead channels (see :mod:`ssl4ecg.nn.conv_encoders`). The time axis
is only convolved and pooled, so any input length works (the token count is about
``T / 32`` with the default stem).
"""

from __future__ import annotations

import torch
from torch import nn

from ssl4ecg.interfaces import SignalSpec
from ssl4ecg.nn.conv_encoders import ConvEncoder

#: variant -> (block type, blocks per stage, default base width)
VARIANTS: dict[str, tuple[str, tuple[int, int, int, int], int]] = {
    "small": ("basic", (1, 1, 1, 1), 32),
    "resnet18": ("basic", (2, 2, 2, 2), 64),
    "resnet34": ("basic", (3, 4, 6, 3), 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64),
}


class BasicBlock1d(nn.Module):
    """Two ``k``-wide convolutions with a residual connection (expansion 1)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        out_ch = width * self.expansion
        self.conv1 = nn.Conv1d(in_ch, width, kernel_size, stride=stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, out_ch, kernel_size, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(out_ch)
        self.last_bn = self.bn2
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class Bottleneck1d(nn.Module):
    """1x1 reduce, ``k``-wide (strided) convolution, 1x1 expand (x4), residual connection."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, kernel_size: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv1d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.bn2 = nn.BatchNorm1d(width)
        self.conv3 = nn.Conv1d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm1d(out_ch)
        self.last_bn = self.bn3
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Identity, or a strided 1x1 projection with batch norm when the shape changes."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv1d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm1d(out_ch))


class ResNet1d(ConvEncoder):
    """1-D ResNet ECG encoder: tokens = final feature map ``[B, T', C]``, embed = global average pool.

    Options: ``variant`` (small | resnet18 | resnet34 | resnet50), ``width`` (base channels
    of the first stage; default per variant), ``kernel_size`` (of the block convolutions),
    ``stem_kernel``/``stem_stride``/``stem_pool`` (the input stem), ``zero_init_residual``
    (start every residual branch at zero by zeroing its last batch-norm scale).
    Missing leads are zero-filled; any input length is accepted.
    """

    def __init__(
        self,
        spec: SignalSpec,
        variant: str = "small",
        width: int | None = None,
        kernel_size: int = 5,
        stem_kernel: int = 15,
        stem_stride: int = 2,
        stem_pool: bool = True,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__(spec)
        if variant not in VARIANTS:
            from ssl4ecg.errors import did_you_mean

            raise ValueError(f"variant '{variant}' is not known.{did_you_mean(variant, VARIANTS)}")
        block_name, blocks, default_width = VARIANTS[variant]
        width = default_width if width is None else width
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        for key, value in (("kernel_size", kernel_size), ("stem_kernel", stem_kernel)):
            if value < 1 or value % 2 == 0:
                raise ValueError(f"{key} must be a positive odd integer (for symmetric padding), got {value}")
        if stem_stride < 1:
            raise ValueError(f"stem_stride must be >= 1, got {stem_stride}")
        self.variant = variant
        block = BasicBlock1d if block_name == "basic" else Bottleneck1d

        stem: list[nn.Module] = [
            nn.Conv1d(spec.n_leads, width, stem_kernel, stride=stem_stride, padding=stem_kernel // 2, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
        ]
        if stem_pool:
            stem.append(nn.MaxPool1d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)

        stages = []
        in_ch = width
        for i, n_blocks in enumerate(blocks):
            stage_width = width * 2**i
            layers = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(in_ch, stage_width, stride, kernel_size))
                in_ch = stage_width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.embed_dim = in_ch
        #: input samples per output token (the product of all strides)
        self.downsampling = stem_stride * (2 if stem_pool else 1) * 8

        for module in self.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm1d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, (BasicBlock1d, Bottleneck1d)):
                    nn.init.zeros_(module.last_bn.weight)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n_leads, T]`` -> ``[B, embed_dim, ~T / downsampling]``."""
        return self.stages(self.stem(x))


def register(registry) -> None:
    """Register encoder ``"resnet1d"``."""
    registry.add("encoder", "resnet1d", ResNet1d)
