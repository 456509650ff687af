"""A test-only callback that signals its own command at a chosen moment (as Ctrl-C, `kill` or SLURM would).

    python cli.py fit ... --trainer.callbacks+ tests.signal_at.SignalAt --trainer.callbacks.moment sanity_check

Under SLURM the signal goes through `scancel --signal` (to every task of the job, as SLURM's pre-timeout signal
does), and only in the job's first run, so a requeued job is not signalled again.
"""
import os
import signal
import subprocess
import time

import lightning.pytorch as pl

from callbacks.safety import STOP

MOMENTS = ("setup", "sanity_check", "training", "second_batch", "last_batch", "validation", "epoch_end", "train_end",
           "testing")


class SignalAt(pl.Callback):
    """Sends `signum` (SIGINT, SIGTERM or SIGUSR1) when the command reaches `moment`."""

    def __init__(self, moment: str = "training", signum: str = "SIGINT", target: str = "self"):
        """target (off SLURM): "self", each process signals itself; "rank0", only the first rank does (a `kill`
        of the command's pid: Lightning's launcher passes it on to its other ranks); "group", the first rank
        signals its whole process group (`kill -TERM -<pgid>`, a terminal or a job scheduler), which must be a
        session of its own: the command is started with start_new_session."""
        assert moment in MOMENTS and target in ("self", "rank0", "group"), (moment, target)
        self.moment, self.signum, self.target, self.sent = moment, signal.Signals[signum], target, False

    def _fire(self, moment: str) -> None:
        if moment != self.moment or self.sent or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            return
        self.sent = True
        job = os.environ.get("SLURM_JOB_ID")
        if job is None:
            if self.target != "self" and int(os.environ.get("LOCAL_RANK", "0")) > 0:
                return
            if self.target == "group":
                assert os.getpgrp() == os.getpid(), "the command must lead its own process group"
                os.killpg(os.getpgrp(), self.signum)
            else:
                os.kill(os.getpid(), self.signum)  # the handler runs before the next line
            return
        if int(os.environ.get("SLURM_PROCID", "0")) == 0:
            subprocess.run(["scancel", f"--signal={self.signum.name[3:]}", job], check=True)
        for _ in range(300):  # delivered asynchronously: wait here, so it lands in this moment
            if STOP.received is not None:
                return
            time.sleep(0.1)

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            self._fire("setup")

    def on_sanity_check_start(self, trainer, pl_module):
        self._fire("sanity_check")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            self._fire("training")
        if batch_idx == 1:  # inside the first optimizer step's window under gradient accumulation
            self._fire("second_batch")
        if batch_idx == trainer.num_training_batches - 1:  # an epoch's last batch: its validation comes next
            self._fire("last_batch")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._fire("validation")

    def on_train_epoch_end(self, trainer, pl_module):
        self._fire("epoch_end")

    def on_train_end(self, trainer, pl_module):
        self._fire("train_end")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._fire("testing")
