"""`cli.py predict`: predictions.csv in the run folder, one row per test image in the split's order, whatever the
number of processes. Lightning's BasePredictionWriter gives each rank its own shard's outputs; it cannot give
their dataset indices here (our index-batch loader is not a BatchSampler it can wrap), so they come from the
loader's EpochBatchSampler, whose evaluation order is fixed (no shuffle)."""
import contextlib
import csv
import io
import os
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from callbacks.results import run_dir_of
from datamodules.loader import EpochBatchSampler
from errors import disk_error

FILE_NAME = "predictions.csv"
COLUMNS = ("index", "target", "pred", "prob", "target_name", "pred_name")


class PredictionsFile(BasePredictionWriter):
    def __init__(self):
        super().__init__(write_interval="epoch")
        self.path: Optional[str] = None

    def write_on_epoch_end(self, trainer, pl_module, predictions: Any, batch_indices: Any) -> None:
        self.path = None
        shard = self._shard(trainer, predictions)
        if trainer.world_size > 1:  # every rank joins, an empty shard too
            shards: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(shards, shard)
        else:
            shards = [shard]
        if not trainer.is_global_zero:
            return
        if any(s is None for s in shards):
            print("predictions: not written (the model's predict_step returns no pred/target tensors)")
            return
        rows = sorted((row for s in shards for row in s), key=lambda row: row[0])
        names = list(getattr(trainer.datamodule, "class_names", None) or [])
        self.path = os.path.join(run_dir_of(trainer), FILE_NAME)
        write_csv(self.path, rows, names)
        correct = sum(row[1] == row[2] for row in rows)
        accuracy = f", accuracy {correct / len(rows):.4f}" if rows else ""
        print(f"predictions of {len(rows):,} test images{accuracy}: {self.path}")

    @staticmethod
    def _shard(trainer, predictions) -> Optional[list[tuple[int, int, int, float]]]:
        """(index in the test split, target, pred, prob) of each image this rank predicted; None if the outputs
        are not ClassificationModule.predict_step's."""
        if not predictions or not all(isinstance(p, dict) and {"pred", "prob", "target"} <= p.keys()
                                      for p in predictions):
            return None if predictions else []
        pred = torch.cat([p["pred"].reshape(-1) for p in predictions]).tolist()
        prob = torch.cat([p["prob"].reshape(-1).float() for p in predictions]).tolist()
        target = torch.cat([p["target"].reshape(-1) for p in predictions]).tolist()
        sampler = getattr(trainer.predict_dataloaders, "sampler", None)
        if isinstance(sampler, EpochBatchSampler):  # the batches this rank predicted (limit_predict_batches: fewer)
            batches = list(sampler)[:len(predictions)]
            index = torch.cat([torch.as_tensor(b, dtype=torch.long).reshape(-1) for b in batches]).tolist()
        else:  # another loader: its order, positions strided by rank as torch's DistributedSampler shards
            index = list(range(trainer.global_rank, trainer.world_size * len(pred), trainer.world_size))
        return list(zip(index, target, pred, prob))


def write_csv(path: str, rows: list[tuple[int, int, int, float]], names: list[str]) -> None:
    """Written beside and renamed, as results.json: a failed write (a full disk) leaves no half file."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    name = (lambda k: names[k] if 0 <= k < len(names) else "")
    for index, target, pred, prob in rows:
        writer.writerow((index, target, pred, f"{prob:.6f}", name(target), name(pred)))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", newline="") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise disk_error(error, FILE_NAME, os.path.dirname(path), "run the command again") from error
