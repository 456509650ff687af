"""torchvision's ResNet-18 for transfer learning: ImageNet weights, a new head, frozen modules.

Frozen modules (`freeze`, or those callbacks.staged_unfreezing has not unfrozen yet) have requires_grad
False, and their BatchNorm layers stay in eval mode during training: they normalize with the pretrained
running statistics and keep them, instead of re-estimating them from the new dataset's batches (which
would shift the features that the frozen convolutions after them were trained on). A BatchNorm layer
trains normally again as soon as its weight and bias are trainable.
"""
import os
from typing import Iterable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import ResNet18_Weights, resnet18

from errors import UserError
from lightning_modules.base import ClassificationModule


def resolve_modules(net: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The submodules of `net` named by dotted paths ("layer4", "layer4.1.bn2"), everything under them included."""
    modules = []
    for name in names:
        try:
            if not name:
                raise AttributeError(name)
            modules.append(net.get_submodule(name))
        except AttributeError:
            valid = ", ".join(child for child, _ in net.named_children())
            raise UserError(f"no module named {name!r} to freeze or unfreeze; valid names: {valid} "
                            "(or a dotted path such as layer4.1)") from None
    return modules


def load_resnet18(weights: Optional[str]) -> nn.Module:
    """torchvision's resnet18 with `weights` from $TORCH_HOME/hub/checkpoints (downloaded there if missing)."""
    if weights is None:
        return resnet18(weights=None)
    try:
        weights_enum = ResNet18_Weights.verify(weights)
    except (KeyError, ValueError):
        raise UserError(f"unknown ResNet-18 weights {weights!r}; use IMAGENET1K_V1 (DEFAULT), "
                        "or null to train from scratch") from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights_enum.url))
    try:
        return resnet18(weights=weights_enum)
    except Exception as error:  # offline: URLError; a truncated file: RuntimeError from torch.load
        problem = "cannot be read (delete it)" if os.path.isfile(path) else "are missing and could not be downloaded"
        home = os.path.dirname(torch.hub.get_dir())  # $TORCH_HOME, default ~/.cache/torch
        raise UserError(f"ResNet-18 {weights_enum.name} weights {path} {problem} ({type(error).__name__}); "
                        f"on a machine with internet run: TORCH_HOME={home} python -m datamodules.download resnet18 "
                        "and set TORCH_HOME to that folder here, or pass --model.init_args.weights null") from None


class ResNet18(ClassificationModule):
    """torchvision's ResNet-18 with a new `fc` for num_classes, optional ImageNet weights and frozen modules."""

    def __init__(
        self,
        weights: Optional[str] = "IMAGENET1K_V1",  # null: random init (train from scratch)
        freeze: list[str] = [],  # module names kept fixed, e.g. [conv1, bn1, layer1]; see configs/freeze/
        channels_last: bool = False,  # NHWC memory format: faster convolutions with mixed precision on GPUs
        **kwargs,
    ):
        super().__init__(**kwargs)
        channels = self.hparams.input_shape[0]
        if channels != 3:
            raise UserError(f"ResNet18 needs 3-channel input, the data gives {channels}; "
                            "set data.init_args.channels: 3")
        net = load_resnet18(weights)
        net.fc = nn.Linear(net.fc.in_features, self.hparams.num_classes)  # (B, 512) -> (B, num_classes)
        for module in resolve_modules(net, freeze):
            module.requires_grad_(False)
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # (B, 3, H, W), stored as NHWC
        return self.net(x)  # (B, num_classes)

    def train(self, mode: bool = True) -> "ResNet18":
        super().train(mode)
        if mode:
            for module in self.net.modules():
                if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters()):
                    module.eval()  # frozen: normalize with, and keep, the running statistics
        return self

    # Lightning never calls train() during fit (it only restores the modes it saw before validation):
    def on_train_start(self) -> None:
        super().on_train_start()
        self.train()  # also covers a mid-epoch resume, which skips on_train_epoch_start

    def on_train_epoch_start(self) -> None:
        self.train()  # the frozen set may just have changed (StagedUnfreezing's hook runs before this one)
