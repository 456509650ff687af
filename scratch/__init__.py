"""A small deep-learning stack with every gradient written by hand (no autograd).

Parameters are plain tensors (requires_grad=False) in torch's layout and initialisation.
`layer(x)` runs forward and keeps what backward needs; `layer.backward(dy)` returns the
input gradient and ACCUMULATES parameter gradients into `param.grad`, as autograd does;
`SGD.zero_grad()` resets them to None.
"""

from scratch.conv import Conv2d, MaxPool2d
from scratch.layers import Flatten, Linear, ReLU
from scratch.loss import CrossEntropyLoss
from scratch.module import Layer, Sequential
from scratch.optim import SGD

__all__ = ["Conv2d", "CrossEntropyLoss", "Flatten", "Layer", "Linear", "MaxPool2d", "ReLU", "SGD", "Sequential"]
