"""A multi-layer perceptron: Linear, normalization, dropout and activations only (no convolutions)."""
import math
from typing import Literal

from torch import nn

from errors import BelowOne, PositiveInt
from lightning_modules.base import ClassificationModule
from lightning_modules.layers import Activation, linear_head


class MLP(ClassificationModule):
    """Flattens the image and applies `hidden` fully connected layers."""

    def __init__(self, hidden: list[PositiveInt] = [512, 256], norm: Literal["batch", "layer", "none"] = "batch",
                 dropout: BelowOne = 0.2, activation: Activation = "relu", **kwargs):
        super().__init__(**kwargs)
        in_features = math.prod(self.hparams.input_shape)  # e.g. 3*32*32 = 3072
        self.net = nn.Sequential(nn.Flatten(), *linear_head(in_features, hidden, self.hparams.num_classes,
                                                            activation, dropout, norm))
