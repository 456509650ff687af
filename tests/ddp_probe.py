"""A test-only callback (`--trainer.callbacks+ tests.ddp_probe.RankProbe`): what each DDP rank holds and scored."""
import atexit
import json
import os

import lightning.pytorch as pl
import torch


class RankProbe(pl.Callback):
    """Writes rank<r>.pt (the parameters at the end of fit) and rank<r>.json (samples scored per stage; after fit
    also this rank's own train-accuracy counts of the last epoch and the train/acc that was logged)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.counts = {"val": 0, "test": 0}
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        """exit-rank<r>.json: whether this rank's process group was still there when its command had returned (gloo
        threads of one nobody destroyed can abort the process at exit, after its work is done)."""
        if torch.distributed.is_available() and os.path.isdir(self.out_dir):
            rank = int(os.environ.get("LOCAL_RANK", "0"))
            with open(os.path.join(self.out_dir, f"exit-rank{rank}.json"), "w") as f:
                json.dump({"process_group_alive": torch.distributed.is_initialized()}, f)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.counts["val"] = 0  # the last validation pass counts

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.counts["val"] += len(batch[1])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # callbacks' on_train_epoch_end runs before the module's, which computes (syncs) and resets the counts
        metric = pl_module.train_metrics
        metric.flush()  # what it holds of the epoch's last steps is counted
        self.counts["train_correct"], self.counts["train_total"] = int(metric.correct), int(metric.total)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.counts["test"] = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.counts["test"] += len(batch[1])

    def _write(self, trainer, pl_module, stage: str) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        base = os.path.join(self.out_dir, f"{stage}-rank{trainer.global_rank}")
        if stage == "fit":
            self.counts["train_acc_logged"] = float(trainer.callback_metrics["train/acc"])
            torch.save({k: v.detach().cpu() for k, v in pl_module.named_parameters()}, base + ".pt")
        with open(base + ".json", "w") as f:
            json.dump({**self.counts, "run_dir": trainer.default_root_dir}, f)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "fit")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")
