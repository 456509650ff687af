"""Early stopping whose stop survives a resume."""
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from callbacks.monitoring import check_monitored
from errors import UserError


class StayingEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping (the `early_stopping` config section), plus: a fit resumed from a checkpoint saved
    after early stopping ended the run trains nothing, as one resumed after max_epochs does.

    Lightning 2.6 restores the callback's counters but not `trainer.should_stop`, so such a resume trained another
    epoch, and more whenever that epoch improved the monitored value (Lightning issue #8278, closed as won't fix):
    a requeued SLURM job whose node died while it tested the checkpoints changed `last.ckpt` and its results."""

    @property
    def state_key(self) -> str:
        # Lightning's own key (its class name): checkpoints written before this class existed keep their state
        return f"EarlyStopping{repr({'monitor': self.monitor, 'mode': self.mode})}"

    def on_train_start(self, trainer, pl_module) -> None:
        # stopped_epoch too: under DDP only the rank that decided records a reason, rank 0's checkpoint may not
        if self.stopping_reason != EarlyStoppingReason.NOT_STOPPED or self.stopped_epoch > 0:
            trainer.should_stop = True  # the fit loop checks it before its first epoch
            why = f" ({self.stopping_reason_message})" if self.stopping_reason_message else ""
            pl_module.print(f"Early stopping had ended this run at epoch {self.stopped_epoch}{why}: nothing left to train")

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._validated = False

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            check_monitored(trainer, self.monitor, "early_stopping")
        self._validated = self._validated or not trainer.sanity_checking
        super().on_validation_end(trainer, pl_module)

    def _validate_condition_metric(self, logs) -> bool:
        try:
            return super()._validate_condition_metric(logs)
        except RuntimeError as error:  # a monitored name nothing logs: one line, not a traceback
            raise UserError(f"early_stopping.monitor={self.monitor!r}: {error}", every_rank=True) from None

    def _run_early_stopping_check(self, trainer) -> None:
        # a metric of validation before any validation ran (`limit_val_batches: 0`, or `max_steps` ending the fit
        # within its first epoch) is nothing to judge yet, as Lightning's ModelCheckpoint treats it; Lightning's
        # EarlyStopping raised at the epoch's end. A misspelt monitor still fails after the first validation.
        if self.monitor not in trainer.callback_metrics and not getattr(self, "_validated", True):
            return
        super()._run_early_stopping_check(trainer)
