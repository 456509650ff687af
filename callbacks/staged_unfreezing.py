"""Staged unfreezing: train the head first, then let deeper blocks join at epoch milestones.

    trainer:
      callbacks:
        - class_path: callbacks.staged_unfreezing.StagedUnfreezing
          init_args: {milestones: [1, 2], stages: [[layer4], [conv1, bn1, layer1, layer2, layer3]]}

Module names are resolved under the model's `net` (ResNet18: conv1, bn1, layer1..layer4, fc).
"""
import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from torch.optim import Optimizer

from errors import PositiveFloat, PositiveInt, UserError
from lightning_modules.base import count_parameters
from lightning_modules.resnet import resolve_modules

LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # per-group values that schedulers (LambdaLR, OneCycleLR) use


class StagedUnfreezing(BaseFinetuning):
    """Freezes every stage's modules before fit; stage i joins the optimizer at epoch milestones[i]."""

    def __init__(
        self,
        milestones: list[PositiveInt] = [1, 2],  # epoch at which each stage starts training
        stages: list[list[str]] = [["layer4"], ["conv1", "bn1", "layer1", "layer2", "layer3"]],
        lr_ratio: PositiveFloat = 0.1,  # a new param group's lr = the head's (scheduled) lr * lr_ratio
    ):
        super().__init__()
        if len(milestones) != len(stages) or not stages:
            raise UserError(f"StagedUnfreezing needs one milestone per stage, got milestones {milestones} "
                            f"for {len(stages)} stages")
        if milestones[0] < 1 or any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise UserError(f"StagedUnfreezing milestones must be increasing epochs >= 1, got {milestones} "
                            "(epoch 0 trains only what no stage names)")
        if lr_ratio <= 0:
            raise UserError(f"StagedUnfreezing lr_ratio must be positive, got {lr_ratio}")
        self.milestones, self.stages, self.lr_ratio = milestones, stages, lr_ratio
        self.stage = 0  # how many stages are unfrozen; saved in checkpoints
        self._announced = None

    @staticmethod
    def _net(pl_module: pl.LightningModule):
        return getattr(pl_module, "net", pl_module)

    def _modules(self, pl_module, stages: list[list[str]]):
        return [m for names in stages for m in resolve_modules(self._net(pl_module), names)]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "stage": self.stage}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.stage = state_dict.get("stage", 0)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # testing keeps the trainable set the fit ended with (results.json counts it)
            self.stage, self._announced, self._internal_optimizer_metadata = 0, None, {}  # a resume loads them after
            super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module) -> None:
        for module in self._modules(pl_module, self.stages):
            module.requires_grad_(False)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self._restarting:  # resumed: the unfrozen stages train again; super() restores their param groups
            for module in self._modules(pl_module, self.stages[:self.stage]):
                module.requires_grad_(True)
        super().on_fit_start(trainer, pl_module)
        for optimizer in trainer.optimizers:
            self._extend_schedulers(trainer, optimizer)

    def finetune_function(self, pl_module, epoch: int, optimizer: Optimizer) -> None:
        while self.stage < len(self.stages) and epoch >= self.milestones[self.stage]:
            modules = self._modules(pl_module, [self.stages[self.stage]])
            for module in modules:
                module.requires_grad_(True)
            # by identity: BaseFinetuning.filter_on_optimizer compares values (torch.equal), which drops
            # e.g. a fresh BatchNorm's ones/zeros when another layer of the same width is already there
            known = {id(p) for group in optimizer.param_groups for p in group["params"]}
            params = list({id(p): p for m in modules for p in m.parameters() if id(p) not in known}.values())
            if params:
                head = optimizer.param_groups[0]
                extra = {k: v for k, v in head.items() if k not in optimizer.defaults and k != "params"}
                group = {**extra, "params": params}
                group.update({k: head[k] * self.lr_ratio for k in LR_KEYS if k in head})
                if "max_momentum" in head:  # OneCycleLR cycles momentum: the head's value now, not the default
                    group.update({k: head[k] for k in ("betas", "momentum") if k in head})
                optimizer.add_param_group(group)
                self._extend_schedulers(pl_module.trainer, optimizer)
            self.stage += 1

    @staticmethod
    def _extend_schedulers(trainer, optimizer: Optimizer) -> None:
        """LambdaLR keeps one base lr and one lr function per param group: new groups follow the head's."""
        for config in trainer.lr_scheduler_configs:
            scheduler, count = config.scheduler, len(optimizer.param_groups)
            if scheduler.optimizer is not optimizer:
                continue
            if len(scheduler.base_lrs) < count:
                scheduler.base_lrs += [group["initial_lr"] if "initial_lr" in group else group["lr"]
                                       for group in optimizer.param_groups[len(scheduler.base_lrs):]]
            if hasattr(scheduler, "lr_lambdas") and len(scheduler.lr_lambdas) < count:
                scheduler.lr_lambdas += [scheduler.lr_lambdas[0]] * (count - len(scheduler.lr_lambdas))

    def on_train_start(self, trainer, pl_module) -> None:
        # a resume inside an epoch (or at its end) skips on_train_epoch_start: say which stage it goes on with
        if trainer.fit_loop.restarted_mid_epoch or trainer.fit_loop.restarted_on_epoch_end:
            self._announce(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # calls finetune_function for each optimizer
        self._announce(trainer, pl_module)

    def _announce(self, trainer, pl_module) -> None:
        if self._announced == self.stage:
            return
        self._announced = self.stage
        counts = count_parameters(pl_module)
        training = [name for name, child in self._net(pl_module).named_children()
                    if any(p.requires_grad for p in child.parameters())]
        groups = [len(optimizer.param_groups) for optimizer in trainer.optimizers]
        pl_module.print(f"StagedUnfreezing: epoch {trainer.current_epoch}, stage {self.stage}/{len(self.stages)}: "
                        f"training {', '.join(training)}; {counts['trainable']:,} of {counts['total']:,} "
                        f"parameters trainable, param groups {groups}")
        for logger in trainer.loggers:
            logger.log_metrics({"stage/index": float(self.stage), "stage/trainable_params": float(counts["trainable"])},
                               step=trainer.global_step)
