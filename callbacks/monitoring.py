"""What the `checkpoint` and `early_stopping` sections monitor: the direction in which a metric improves, and a
monitored name checked against what the model logs."""
from errors import UserError

HIGHER_IS_BETTER = ("acc", "top5_acc", "f1", "precision", "recall", "auroc")


def improving_mode(monitor, mode: str) -> str:
    """`mode: auto` (the sections' default): "max" for an accuracy-like metric (val/acc, val/f1_macro, ...), else
    "min" (a loss). Lightning's default is always "min", which kept the worst epoch of `--checkpoint.monitor val/acc`
    as the best checkpoint and stopped early as soon as the accuracy rose."""
    if mode != "auto":
        return mode
    name = str(monitor or "").rsplit("/", 1)[-1]
    return "max" if name.startswith(HIGHER_IS_BETTER) or name.endswith("_acc") else "min"


def check_monitored(trainer, monitor, section: str) -> None:
    """After the sanity check's validation: a monitored name in a namespace the model logs (val/...) that the model
    does not log is a misspelling, one error line before training (Lightning finds it after the first epoch)."""
    logged = [key for key in trainer.callback_metrics if "/" in key]
    if not monitor or monitor in logged or monitor.split("/")[0] not in {key.split("/")[0] for key in logged}:
        return
    raise UserError(f"{section}.monitor={monitor!r} is not a metric the model logs; {monitor.split('/')[0]}/ "
                    f"metrics are: {', '.join(sorted(k for k in logged if k.startswith(monitor.split('/')[0] + '/')))}",
                    every_rank=True)
