"""results.json: the one file per run that the report command reads (schema in ARCHITECTURE.md)."""
import contextlib
import datetime
import json
import os

import lightning.pytorch as pl

from errors import disk_error
from lightning_modules.base import count_parameters
from reporting.runs import run_directory  # noqa: F401  (there: report.py reads it without Lightning)

METRIC_KEYS = ("acc", "precision_macro", "recall_macro", "f1_macro", "loss")


class ResultsFile(pl.Callback):
    """Collects the test metrics of each evaluated checkpoint (`tag`: best, last or final)."""

    def __init__(self):
        self.tag = "final"
        self.test: dict[str, dict[str, float]] = {}

    def on_test_end(self, trainer, pl_module) -> None:
        metrics = {key.split("/", 1)[1]: float(value) for key, value in trainer.callback_metrics.items()
                   if key.startswith("test/")}
        self.test[self.tag] = dict(sorted(metrics.items(), key=lambda kv: (kv[0] not in METRIC_KEYS, kv[0])))

    def write(self, path: str, **fields) -> dict:
        """Writes atomically (temp file + rename), so a crash never leaves a half-written results.json."""
        results = {**fields, "test": self.test, "finished_at": datetime.datetime.now().isoformat(timespec="seconds")}
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(results, f, indent=2)
            os.replace(tmp, path)
        except OSError as error:  # full disk, quota, read-only: the earlier results.json (if any) stays
            with contextlib.suppress(OSError):
                os.remove(tmp)
            run_dir = os.path.dirname(os.path.abspath(path))
            last = os.path.join(run_dir, "checkpoints", "last.ckpt")  # a fit's; a test run has none of its own
            then = (f"test it again: python cli.py test --config {run_dir}/config.yaml --ckpt_path {last}"
                    if os.path.isfile(last) else "run the command again")
            raise disk_error(error, "results.json", run_dir, then) from error
        return results


def run_dir_of(trainer: pl.Trainer) -> str:
    """trainer.log_dir without its broadcast, which would hang DDP when called on rank 0 alone."""
    return getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir


def run_fields(experiment: str, base: str, variant, model: pl.LightningModule, datamodule, seed, run_dir: str) -> dict:
    return {"experiment": experiment, "base_experiment": base, "variant": variant, "model": type(model).__name__,
            "dataset": getattr(datamodule, "name", type(datamodule).__name__), "seed": seed, "run_dir": run_dir,
            "params": count_parameters(model)}
