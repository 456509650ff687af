"""What the figures and the shape table need from a model: its layers, their outputs, the first conv's weight.

Any nn.Module model works as is: layers are found with `named_modules()` (under `model.net` when there is one,
so names read `features.0.conv.0` or `layer4.1.conv2`) and their outputs are caught with forward hooks. A model
not built from nn.Modules is walked layer by layer when its `net` has a `layers` list (scratch.Sequential: conv and
pooling layers are recognised by class name, `*Conv2d` / `*Pool2d`, with torch's `weight` layout and attributes).
Any other model can opt in with two methods:

    def feature_maps(self, x) -> list[tuple[str, torch.Tensor]]:  # (name, (B, C, H, W)) per conv/pool layer,
        ...                                                        # in forward order; "pool" in a pooling name
    def first_conv_weight(self) -> torch.Tensor:                   # (out_channels, in_channels, kH, kW)
        ...
"""
import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class FigureSkipped(Exception):
    """A figure that does not apply to this model (e.g. feature maps of a model without convolutions)."""


@dataclass
class LayerOutput:
    name: str
    layer: Any  # the module or scratch layer (None for a model's own feature_maps)
    kind: Optional[str]  # "conv", "pool" or None
    input_shape: Optional[tuple[int, ...]]  # (B, C, H, W) of the layer's first input
    output: torch.Tensor  # (B, ...) detached


def layer_kind(layer) -> Optional[str]:
    if isinstance(layer, nn.Conv2d) or (not isinstance(layer, nn.Module) and type(layer).__name__.endswith("Conv2d")):
        return "conv"
    if isinstance(layer, POOLS) or (not isinstance(layer, nn.Module) and type(layer).__name__.endswith("Pool2d")):
        return "pool"
    return None


def root_of(model):
    """`model.net` when the model keeps its layers there (ClassificationModule subclasses), else the model."""
    net = getattr(model, "net", None)
    return net if net is not None else model


def input_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    first = next((p for p in params if p.is_floating_point()), None)
    return (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)


@contextlib.contextmanager
def evaluating(model):
    """Eval mode (BatchNorm running stats, no dropout) and no autograd; the previous mode comes back after."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _walk_layers(container, prefix: str = ""):
    for index, layer in enumerate(container.layers):
        name = f"{prefix}{index}"
        if isinstance(getattr(layer, "layers", None), list):
            yield from _walk_layers(layer, f"{name}.")
        else:
            yield name, layer


def trace(model, x: torch.Tensor, leaves_only: bool = False) -> list[LayerOutput]:
    """Runs `model(x)` once and returns the outputs of its conv and pooling layers (or of every leaf layer)."""
    if callable(getattr(model, "feature_maps", None)):
        with evaluating(model):
            maps = model.feature_maps(x)
        return [LayerOutput(name, None, "pool" if "pool" in name.lower() else "conv", None, out.detach())
                for name, out in maps]
    root = root_of(model)
    if isinstance(root, nn.Module):
        records: list[LayerOutput] = []

        def hook_for(name, module):
            def hook(_, inputs, output):
                if isinstance(output, torch.Tensor):
                    shape = tuple(inputs[0].shape) if inputs and isinstance(inputs[0], torch.Tensor) else None
                    records.append(LayerOutput(name, module, layer_kind(module), shape, output.detach()))
            return hook

        chosen = [(name, module) for name, module in root.named_modules() if name and
                  (not any(True for _ in module.children()) if leaves_only else layer_kind(module))]
        handles = [module.register_forward_hook(hook_for(name, module)) for name, module in chosen]
        try:
            with evaluating(model):
                model(x)
        finally:
            for handle in handles:
                handle.remove()
        return records
    if isinstance(getattr(root, "layers", None), list):  # scratch.Sequential: no hooks, so run it layer by layer
        records = []
        with evaluating(model):
            for name, layer in _walk_layers(root):
                out = layer(x)
                if leaves_only or layer_kind(layer):
                    records.append(LayerOutput(name, layer, layer_kind(layer), tuple(x.shape), out.detach()))
                x = out
        return records
    raise FigureSkipped(f"{type(model).__name__} exposes no layers (see visual/introspect.py for the protocol)")


def conv_pool_outputs(model, x: torch.Tensor) -> list[LayerOutput]:
    records = [r for r in trace(model, x) if r.kind and r.output.ndim == 4]
    if not records:
        raise FigureSkipped(f"{type(model).__name__} has no conv or pooling layers")
    return records


def first_conv_weight(model) -> tuple[str, torch.Tensor]:
    """(layer name, weight (out_channels, in_channels, kH, kW)) of the first convolution."""
    if callable(getattr(model, "first_conv_weight", None)):
        return "conv1", model.first_conv_weight().detach()
    root = root_of(model)
    if isinstance(root, nn.Module):
        layers = root.named_modules()
    elif isinstance(getattr(root, "layers", None), list):
        layers = _walk_layers(root)
    else:
        layers = ()
    for name, layer in layers:
        weight = getattr(layer, "weight", None)
        if layer_kind(layer) == "conv" and isinstance(weight, torch.Tensor) and weight.ndim == 4:
            return name, weight.detach()
    raise FigureSkipped(f"{type(model).__name__} has no convolution")


def parameter_count(layer) -> int:
    """The layer's own parameters (nn.Module: not its children's; scratch layer: `parameters()`)."""
    if isinstance(layer, nn.Module):
        return sum(p.numel() for p in layer.parameters(recurse=False))
    params = getattr(layer, "parameters", None)
    return sum(p.numel() for p in params()) if callable(params) else 0
