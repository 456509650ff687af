"""A configurable CNN: conv blocks (+ optional batch norm, residual, Dropout2d, pooling) and a linear head.

Each ablation is this class with one switch changed (configs/ablations/*.yaml).
"""
from collections import OrderedDict
from typing import Literal, Optional

import torch
from torch import nn

from errors import BelowOne, NonNegativeInt, PositiveFloat, PositiveInt, UserError
from lightning_modules.base import ClassificationModule
from lightning_modules.layers import Activation, activation_layer, linear_head


def conv_unit(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
              batch_norm: bool, activation: Activation) -> nn.Sequential:
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(activation_layer(activation))
    return nn.Sequential(*layers)


class ConvBlock(nn.Module):
    """conv (in -> out), then `extra_convs` convs (out -> out) added back onto their input if `residual`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 extra_convs: int, batch_norm: bool, residual: bool, activation: Activation,
                 pool: Literal["max", "avg", "none"], pool_size: int, dropout2d: float):
        super().__init__()
        self.conv = conv_unit(in_channels, out_channels, kernel_size, stride, padding, batch_norm, activation)
        # the extra convs keep the size ("same" padding, stride 1) so the skip connection can be added
        self.extra = nn.Sequential(*[conv_unit(out_channels, out_channels, kernel_size, 1, kernel_size // 2,
                                               batch_norm, activation) for _ in range(extra_convs)])
        self.residual = residual
        pools = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
        self.pool = pools[pool](pool_size) if pool != "none" else nn.Identity()
        self.dropout = nn.Dropout2d(dropout2d) if dropout2d > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # (B, out, H', W')
        if len(self.extra):
            x = x + self.extra(x) if self.residual else self.extra(x)
        return self.dropout(self.pool(x))  # (B, out, H'/pool, W'/pool)


class CNN(ClassificationModule):
    """Conv blocks -> flatten (or global average pool) -> linear head."""

    def __init__(
        self,
        channels: list[PositiveInt] = [32, 64, 128],  # one block per entry
        kernel_size: PositiveInt = 3,
        padding: Optional[NonNegativeInt] = None,  # None: kernel_size // 2 ("same" for odd kernels)
        stride: PositiveInt = 1,
        extra_convs: NonNegativeInt = 0,  # convs after the first in each block (what `residual` skips over)
        batch_norm: bool = True,
        residual: bool = False,
        dropout2d: BelowOne = 0.0,
        activation: Activation = "relu",
        pool: Literal["max", "avg", "none"] = "max",
        pool_size: PositiveInt = 2,
        global_pool: bool = False,  # average over H, W before the head instead of flattening
        width_multiplier: PositiveFloat = 1.0,  # scales every block's channels (the "narrow" ablation uses 0.5)
        head_hidden: list[PositiveInt] = [],
        head_dropout: BelowOne = 0.0,
        channels_last: bool = False,  # NHWC memory format: ~1.3x faster MNIST-sized steps on a CPU (notebook_parity)
        **kwargs,
    ):
        super().__init__(**kwargs)
        in_channels, size, _ = self.hparams.input_shape
        padding = kernel_size // 2 if padding is None else padding
        blocks = []
        for width in channels:
            out_channels = max(1, round(width * width_multiplier))
            blocks.append(ConvBlock(in_channels, out_channels, kernel_size, stride, padding, extra_convs,
                                    batch_norm, residual, activation, pool, pool_size, dropout2d))
            in_channels = out_channels
        features = nn.Sequential(*blocks)
        try:  # H_out = floor((H_in + 2P - K)/S + 1) per conv, then // pool_size per pool
            with torch.no_grad():
                shape = features(torch.zeros(1, *self.hparams.input_shape)).shape  # (1, C, H, W)
        except (RuntimeError, ValueError):  # a conv or pool found its input smaller than its kernel
            shape = (0, 0, 0, 0)
        if min(shape[1:]) < 1:
            raise UserError(f"{len(channels)} conv blocks shrink a {tuple(self.hparams.input_shape)} input to "
                            "nothing; use fewer blocks, less pooling or padding, or --data.resize")
        flat = shape[1] if global_pool else shape[1] * shape[2] * shape[3]
        reducer = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if global_pool else [nn.Flatten()]
        head = nn.Sequential(*reducer, *linear_head(flat, head_hidden, self.hparams.num_classes, activation,
                                                    head_dropout))
        self.net = nn.Sequential(OrderedDict(features=features, head=head))
        self.feature_shape = tuple(shape[1:])  # (C, H, W) just before the flatten
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # (B, C, H, W), stored as NHWC
        return self.net(x)  # (B, num_classes)
