"""SGD with momentum and weight decay, the update rule of torch.optim.SGD."""

from collections.abc import Iterable

import torch


class SGD:
    """torch.optim.SGD (dampening 0, no nesterov) over tensors whose .grad our backward passes fill."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0, weight_decay: float = 0):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"SGD {name} must be >= 0, got {value}")
        self.params = list(params)  # a list, since a generator like model.parameters() would be used up
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        """Drop gradients (torch's set_to_none=True default); the next backward sets them afresh."""
        for param in self.params:
            param.grad = None

    def step(self) -> None:
        with torch.no_grad():  # updates are plain in-place tensor ops; keep them off any graph
            for i, param in enumerate(self.params):
                if param.grad is None:
                    continue  # torch skips parameters without a gradient (momentum buffer untouched)
                step = param.grad  # same shape as param
                if self.weight_decay:
                    step = step.add(param, alpha=self.weight_decay)  # L2 term folded into the gradient
                if self.momentum:
                    buffer = self.momentum_buffers[i]
                    if buffer is None:
                        buffer = self.momentum_buffers[i] = step.clone()  # torch's first step: buf = grad
                    else:
                        buffer.mul_(self.momentum).add_(step)  # buf = momentum * buf + grad
                    step = buffer
                param.add_(step, alpha=-self.lr)
