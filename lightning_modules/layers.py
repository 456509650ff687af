"""Small building blocks shared by the MLP and the CNN."""
from typing import Literal

from torch import nn

Activation = Literal["relu", "gelu", "silu", "leaky_relu", "tanh", "identity"]


def activation_layer(name: Activation) -> nn.Module:
    layers = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh,
              "identity": nn.Identity}
    return layers[name]()


def linear_head(in_features: int, hidden: list[int], num_classes: int, activation: Activation,
                dropout: float, norm: Literal["batch", "layer", "none"] = "none") -> list[nn.Module]:
    """Linear -> [norm] -> activation -> [dropout] per hidden size, then the classifier."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Linear(in_features, width))
        if norm == "batch":
            layers.append(nn.BatchNorm1d(width))
        elif norm == "layer":
            layers.append(nn.LayerNorm(width))
        layers.append(activation_layer(activation))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return layers
