"""The run's checkpoints: the best by the monitored metric, and `last.ckpt`, always the newest completed state."""
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` is rewritten at every save point, not only beside a new best.

    Since Lightning 2.6, `save_last=True` writes `last.ckpt` only at steps where a top-k checkpoint is saved:
    with `save_top_k=1` it is a copy of the best one, so testing "last" tested the best again and a crash
    resumed epochs behind. Here, whenever Lightning's save point (a validation end or a training epoch end, or
    every_n_train_steps) passes without refreshing `last.ckpt`, it is written anyway, and once more when
    training ends. A "link" save_last writes a real file at those points (a link would point at an old best).
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._every_n_train_steps < 1 and self._train_time_interval is None:
            return  # Lightning's method would only read the trainer's state (~35 us per step of a CPU fit)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0 \
                and not self._defer_save_until_validation:
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)

    def _refresh_last(self, trainer) -> None:
        """Writes last.ckpt unless it already holds this step (or nothing may be saved now)."""
        if not self.save_last or trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING \
                or trainer.sanity_checking or getattr(self, "_last_step", None) == trainer.global_step:
            return
        mode, self.save_last = self.save_last, True
        try:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self.save_last = mode

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step = trainer.global_step
