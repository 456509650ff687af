"""Keeps DDP's gradient all-reduce in step with the set of trainable parameters.

`DistributedDataParallel` builds its reducer once, from the parameters that require a gradient when it
wraps the model (Lightning does that in `strategy.setup`, after every `setup` hook). A parameter that
becomes trainable later (staged unfreezing at a milestone, its restore on resume, any callback that
changes `requires_grad`) gets a gradient on each rank but is never all-reduced, so the ranks' copies
drift apart and only rank 0's is saved (Lightning issue #20340). A frozen one stays in the reducer,
which then waits for a gradient that never comes.
"""
import lightning.pytorch as pl
from torch.nn.parallel import DistributedDataParallel


def trainable_ids(module) -> frozenset[int]:
    return frozenset(id(p) for p in module.parameters() if p.requires_grad)


class TrainableSetSync(pl.Callback):
    """Under DDP, wraps the model again whenever its trainable parameters differ from those DDP was built with."""

    def __init__(self):
        self._wrapped: frozenset[int] = frozenset()  # what DDP's reducer was built from

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # the trainable set strategy.setup will wrap (it runs after the setup hooks)
            self._wrapped = trainable_ids(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # before the forward: a change made in any earlier hook (epoch start, fit start on resume) is caught
        # before its first gradient. Every rank changes its trainable set at the same point (the same epoch
        # or batch), so every rank wraps again here, as DDP's constructor (a collective) requires.
        strategy = trainer.strategy
        if not isinstance(strategy.model, DistributedDataParallel):
            return  # one device (or another strategy): nothing to reduce; costs one isinstance per batch
        current = trainable_ids(pl_module)
        if current == self._wrapped:
            return
        strategy.model = pl_module  # configure_ddp wraps the LightningModule itself, as in strategy.setup
        strategy.configure_ddp()  # broadcasts rank 0's parameters and buffers, builds a reducer for `current`
        self._wrapped = current
