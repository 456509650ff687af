"""A CNN built from scratch/ (every gradient by hand, no autograd) trained through the same CLI.

The scratch parameters are registered as non-grad nn.Parameters of this module, so Lightning moves
them between devices (in place: the scratch layers keep the same tensor objects), saves and loads
them in checkpoints, and counts them. Training is manual: forward, loss, backward and the SGD
update all run under torch.no_grad(), so no autograd graph is ever built.
"""
import torch
from torch import nn

import scratch
from errors import NonNegativeInt, PositiveInt, UserError
from lightning_modules.base import ClassificationModule


class ScratchOptimizer(torch.optim.Optimizer):
    """Presents scratch.SGD to Lightning as a torch optimizer: step counting, LR schedules, checkpoints."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        params = list(params)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.sgd = scratch.SGD(params, lr, momentum=momentum, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self, closure=None):
        self.sgd.lr = self.param_groups[0]["lr"]  # LR schedulers write into param_groups
        self.sgd.step()
        for param, buffer in zip(self.sgd.params, self.sgd.momentum_buffers):
            if buffer is not None:
                self.state[param]["momentum_buffer"] = buffer  # so it travels in checkpoints
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.sgd.momentum_buffers = [self.state[p].get("momentum_buffer") for p in self.sgd.params]


class ScratchCNN(ClassificationModule):
    """conv (-> ReLU -> max pool) blocks, flatten, linear: every layer from scratch/."""

    hand_trained = True  # its parameters need no requires_grad: our own backward computes the gradients

    def __init__(self, channels: list[PositiveInt] = [8, 16], kernel_size: PositiveInt = 3, padding: NonNegativeInt = 0,
                 pool_size: PositiveInt = 2,
                 **kwargs):
        kwargs.setdefault("optimizer", "sgd")
        super().__init__(**kwargs)
        if self.hparams.optimizer != "sgd":
            raise UserError("the scratch CNN has its own SGD only; set model.init_args.optimizer: sgd")
        self.automatic_optimization = False
        in_channels, size, _ = self.hparams.input_shape
        layers = []
        for width in channels:  # H_out = floor((H + 2P - K)/1 + 1), then floor(H_out / pool_size)
            layers += [scratch.Conv2d(in_channels, width, kernel_size, padding=padding), scratch.ReLU(),
                       scratch.MaxPool2d(pool_size)]
            in_channels, size = width, (size + 2 * padding - kernel_size + 1) // pool_size
        if size < 1:
            raise UserError(f"{len(channels)} scratch conv blocks shrink a {tuple(self.hparams.input_shape)} input "
                            "to nothing; use fewer blocks or padding")
        layers += [scratch.Flatten(), scratch.Linear(in_channels * size * size, self.hparams.num_classes)]
        self.net = scratch.Sequential(*layers)
        self.scratch_loss = scratch.CrossEntropyLoss()
        self.scratch_params = nn.ParameterDict()
        for key, tensor in self.net.named_parameters():  # e.g. "0.weight" -> the same tensor, as a Parameter
            index, name = key.split(".")
            param = nn.Parameter(tensor, requires_grad=False)
            setattr(self.net.layers[int(index)], name, param)
            self.scratch_params[key.replace(".", "_")] = param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # autocast off: the scratch kernels have no autocast rules (their matmuls would return bf16/fp16 while
        # the parameters and the hand-written backward stay float32): under mixed precision this model computes
        # in float32, its parameters' dtype (at a "-true" precision the parameters themselves are 16/64-bit)
        with torch.autocast(x.device.type, enabled=False):
            return self.net(x.to(self.scratch_params["0_weight"].dtype))  # (B, num_classes)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.trainer.world_size > 1:  # DDP cannot wrap a model without autograd parameters
            raise UserError("the scratch CNN trains on one device only (its hand-written SGD has no gradient "
                            "all-reduce); use --trainer.devices 1")

    def on_fit_start(self) -> None:
        # 16-mixed brings a GradScaler (MixedPrecision.scaler, public): this model computes in float32 with autocast
        # off and never scales a loss, and the scaler's unscale_ before each step failed ("_scale is None")
        plugin = self.trainer.precision_plugin
        if getattr(plugin, "scaler", None) is not None:
            plugin.scaler = None  # the plugin then steps the optimizer as at full precision

    def configure_optimizers(self):
        hp = self.hparams
        return self.with_schedule(ScratchOptimizer(self.scratch_params.values(), hp.lr, hp.momentum, hp.weight_decay))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        optimizer = self.optimizers()
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):  # backward too (see forward)
            logits = self(images)  # (B, num_classes)
            loss = self.scratch_loss(logits, labels)
            optimizer.zero_grad()
            self.net.backward(self.scratch_loss.backward())  # fills every param.grad
            optimizer.step()  # counts a global step, like an automatic optimizer step
        scheduler = self.lr_schedulers()
        if scheduler is not None and (self.hparams.scheduler != "step" or self.trainer.is_last_batch):
            scheduler.step()  # manual optimization steps schedules itself: per step, StepLR per epoch
        self.log_training_step(loss, logits, labels)
        return loss
