"""Base class and helpers shared by the hand-differentiated layers, plus Sequential."""

import math
from collections import OrderedDict
from collections.abc import Iterator

import torch


def pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """Torch's int-or-pair convention for kernel_size, stride and padding."""
    return (value, value) if isinstance(value, int) else tuple(value)


def reset_parameters(weight: torch.Tensor, bias: torch.Tensor, fan_in: int) -> None:
    """Draw weight then bias exactly as nn.Linear/nn.Conv2d.reset_parameters, so seeded draws match torch."""
    # kaiming_uniform_(a=sqrt(5)): gain = sqrt(2 / (1 + a^2)); same float arithmetic as torch.nn.init
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    weight_bound = math.sqrt(3.0) * (gain / math.sqrt(fan_in))  # == 1/sqrt(fan_in) up to rounding
    weight.uniform_(-weight_bound, weight_bound)  # (out, in) or (out, in, kh, kw), drawn first as torch does
    bias_bound = 1 / math.sqrt(fan_in)
    bias.uniform_(-bias_bound, bias_bound)  # (out,)


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Add grad into param.grad as autograd does; SGD.zero_grad resets it to None."""
    if param.grad is None:
        param.grad = grad  # grad is freshly computed by the caller, so it can be adopted without a copy
    else:
        param.grad += grad  # same shape as param


def _dims_match(shape: tuple[int, ...], expected: tuple) -> bool:
    return all(isinstance(want, str) or want == got for want, got in zip(expected, shape))


def shape_matches(shape: tuple[int, ...], expected: tuple) -> bool:
    """ints must equal, strings name free dims, one '*' stands for any number of dims."""
    if "*" not in expected:
        return len(shape) == len(expected) and _dims_match(shape, expected)
    star = expected.index("*")
    head, tail = expected[:star], expected[star + 1 :]
    return (
        len(shape) >= len(head) + len(tail)
        and _dims_match(shape[: len(head)], head)
        and _dims_match(shape[len(shape) - len(tail) :], tail)
    )


class Layer:
    """Base of the scratch layers: call runs forward, backward returns the input gradient."""

    param_names: tuple[str, ...] = ()  # attributes holding parameters, in torch's state_dict order
    _saved: tuple | None = None  # what forward keeps for the next backward

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # our backward computes every gradient, so never record an autograd graph, whatever the caller's mode
        for name in ("forward", "backward"):
            if name in cls.__dict__:
                setattr(cls, name, torch.no_grad()(cls.__dict__[name]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, dy: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_input(self, x: torch.Tensor, expected: tuple) -> None:
        """Raise ValueError naming the expected and received shape, or a dtype/device mismatch."""
        name = type(self).__name__
        if not shape_matches(tuple(x.shape), expected):
            want = ", ".join(str(dim) for dim in expected)
            raise ValueError(f"{name} expected input ({want}), got {tuple(x.shape)}")
        for param in self.parameters():
            if (param.dtype, param.device) != (x.dtype, x.device):
                raise ValueError(
                    f"{name} parameters are {param.dtype} on {param.device} but the input is {x.dtype} "
                    f"on {x.device}; move the model with .to(...) or convert the input"
                )

    def save(self, *tensors) -> None:
        self._saved = tensors

    def saved(self) -> tuple:
        """Hand over (and release) what forward saved; each forward serves one backward."""
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward needs a forward first (each backward frees it)")
        saved, self._saved = self._saved, None
        return saved

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.param_names:
            yield name, getattr(self, name)

    def parameters(self) -> Iterator[torch.Tensor]:
        for _, param in self.named_parameters():
            yield param

    def state_dict(self) -> OrderedDict:
        """Parameters by torch-compatible key ('weight', '0.bias', ...); tensors are shared, not copied."""
        return OrderedDict(self.named_parameters())

    def load_state_dict(self, state_dict: dict) -> None:
        """Copy tensors in place (converting dtype/device); keys and shapes must match exactly."""
        params = dict(self.named_parameters())
        missing, unexpected = sorted(params.keys() - state_dict.keys()), sorted(state_dict.keys() - params.keys())
        if missing or unexpected:
            name = type(self).__name__
            raise ValueError(f"{name}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for key, param in params.items():
            if param.shape != state_dict[key].shape:
                raise ValueError(f"{key}: expected shape {tuple(param.shape)}, got {tuple(state_dict[key].shape)}")
            with torch.no_grad():  # a source that requires grad (an nn.Module's) must not attach a graph
                param.copy_(state_dict[key])

    def to(self, *args, **kwargs) -> "Layer":
        """Move/convert parameters (and grads) like Tensor.to, in place so an optimizer's references stay valid."""
        for param in self.parameters():
            grad, param.grad = param.grad, None  # grad must follow the new dtype/device
            param.data = param.data.to(*args, **kwargs)
            param.grad = None if grad is None else grad.to(*args, **kwargs)
        return self


class Sequential(Layer):
    """Layers applied in order; backward runs them in reverse."""

    def __init__(self, *layers: Layer):
        self.layers = list(layers)

    def __getitem__(self, index: int) -> Layer:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for index, layer in enumerate(self.layers):
            for name, param in layer.named_parameters():
                yield f"{index}.{name}", param  # nn.Sequential's key format
