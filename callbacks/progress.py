"""The progress bar: Lightning's tqdm bar, which shows the training loss without a per-step host sync."""
from lightning.pytorch.callbacks import TQDMProgressBar


class LossProgressBar(TQDMProgressBar):
    """tqdm, redrawn every `refresh_rate` batches (Rich's per-batch redraw cost ~3% of a small model's epoch).

    The module logs `train/loss` without `prog_bar=True`: with it, Lightning converts the value to a Python float
    after every batch (`.item()`, a wait for the GPU each step). This bar reads the tensor from
    `trainer.callback_metrics` only when it redraws.
    """

    def __init__(self, refresh_rate: int = 5, **kwargs):
        super().__init__(refresh_rate=refresh_rate, **kwargs)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        return {"train/loss": float(loss), **items} if loss is not None else items
