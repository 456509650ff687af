"""Linear, ReLU and Flatten with hand-written backward passes (no autograd)."""

import torch

from scratch.module import Layer, accumulate_grad, reset_parameters


class Linear(Layer):
    """Fully connected layer y = x W^T + b with nn.Linear's parameter layout and initialisation."""

    param_names = ("weight", "bias")

    def __init__(self, in_features: int, out_features: int, *, device=None, dtype=None):
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.empty(out_features, in_features, device=device, dtype=dtype)  # (O, I)
        self.bias = torch.empty(out_features, device=device, dtype=dtype)  # (O,)
        reset_parameters(self.weight, self.bias, fan_in=in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, ("*", self.in_features))
        rows = x.reshape(-1, self.in_features)  # (N, I), N = product of the leading dims
        self.save(rows, x.shape)
        y = torch.addmm(self.bias, rows, self.weight.t())  # (N, O)
        return y.view(*x.shape[:-1], self.out_features)  # (*, O)

    def backward(self, dy: torch.Tensor) -> torch.Tensor:
        rows, x_shape = self.saved()  # (N, I)
        dy = dy.reshape(-1, self.out_features)  # (N, O)
        accumulate_grad(self.weight, dy.t() @ rows)  # (O, I)
        accumulate_grad(self.bias, dy.sum(0))  # (O,)
        return (dy @ self.weight).view(x_shape)  # (*, I)


class ReLU(Layer):
    """max(x, 0) elementwise; the gradient passes where the output is positive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clamp_min(0)  # (*)
        self.save(y)  # the output (not a mask) is kept: it already exists, so no extra memory
        return y

    def backward(self, dy: torch.Tensor) -> torch.Tensor:
        (y,) = self.saved()  # (*)
        # sign(y) is 1 where x > 0 and 0 where it was clipped (x == 0 included, as torch); on CPU a
        # float multiply is much faster than masked_fill/where with a bool mask
        return y.sign().mul_(dy)  # (*)


class Flatten(Layer):
    """(B, C, H, W) -> (B, C*H*W), i.e. nn.Flatten(start_dim=1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, ("B", "D", "*"))
        self.save(x.shape)
        return x.flatten(1)  # (B, D*...)

    def backward(self, dy: torch.Tensor) -> torch.Tensor:
        (x_shape,) = self.saved()
        return dy.reshape(x_shape)  # (B, D, ...)
