"""The progress bar: Lightning's tqdm bar, which shows the training loss without a per-step host sync."""
import time

from lightning.pytorch.callbacks import TQDMProgressBar


class LossProgressBar(TQDMProgressBar):
    """tqdm, redrawn every `refresh_rate` batches but at most every `min_interval` seconds, and always at an epoch's
    last batch. Rich's per-batch redraw cost ~3% of a small model's epoch; a Lightning tqdm redraw (two terminal
    writes, the logged metrics collected twice) ~0.3 ms, 2% of a 3 ms GPU step if drawn every 5 batches. One redraw
    here writes the terminal once. Inside a 2-core CPU fit (cold caches after each backward) a redraw took ~0.7 ms:
    at tqdm's own 0.1 s that was ~0.7% of the fit, at 0.25 s (four redraws a second) ~0.3%.

    The module logs `train/loss` without `prog_bar=True`: with it, Lightning converts the value to a Python float
    after every batch (`.item()`, a wait for the GPU each step). This bar reads the tensor from
    `trainer.callback_metrics` only when it redraws.
    """

    def __init__(self, refresh_rate: int = 5, min_interval: float = 0.25, **kwargs):
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self.min_interval = min_interval
        self._drawn_at = float("-inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar, n = self.train_progress_bar, batch_idx + 1
        if not self.is_enabled or bar.disable:
            return
        now = time.monotonic()
        if n == bar.total or (n % self.refresh_rate == 0 and now - self._drawn_at >= self.min_interval):
            self._drawn_at = now
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        return {"train/loss": float(loss), **items} if loss is not None else items
