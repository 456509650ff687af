"""Stopping safely: a diverged loss, Ctrl-C / SIGTERM, and SLURM's pre-timeout signal.

Every stop happens at a safe point (between two training batches), where a checkpoint holds
exactly the completed steps, so a resumed run loses and repeats nothing.
"""
import os
import signal
import subprocess
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from errors import UserError


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class NonFiniteLossGuard(pl.Callback):
    """Stops at a non-finite training loss, naming its first step, before any checkpoint can store broken weights.

    The losses are checked together every `check_every_n_steps` steps, at the end of each training epoch and
    before any checkpoint is written, not after every step: a per-step check is a host-device sync per step
    (a GPU's queue drained every batch). Steps taken after the loss broke are wasted, never saved.
    """

    def __init__(self, check_every_n_steps: int = 10):
        self.check_every_n_steps = check_every_n_steps
        self._pending: list[tuple[torch.Tensor, int, int, int]] = []  # (loss, step, epoch, batch) not yet checked

    def on_train_start(self, trainer, pl_module) -> None:
        self._pending = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._pending.append((loss.detach(), trainer.global_step, trainer.current_epoch, batch_idx))
        if len(self._pending) >= self.check_every_n_steps:
            self.check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.check(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.check(trainer)  # raising here stops the save: the file is written after every callback's hook

    def check(self, trainer) -> None:
        """Raises TrainingDiverged if any pending loss is NaN or infinite. Under DDP every process decides
        together (the first bad step on any of them), so all stop at the same point instead of the others
        waiting forever in the next gradient all-reduce for the one that stopped."""
        pending, self._pending = self._pending, []
        distributed = trainer.world_size > 1
        if not pending and not distributed:
            return
        none = 2**30  # "no bad step"
        if pending:
            finite = torch.isfinite(torch.stack([loss.float().reshape(()) for loss, *_ in pending]))  # (n,)
            steps = torch.arange(len(pending), device=finite.device)
            first = torch.where(finite, torch.full_like(steps, none), steps).min()
        else:
            first = torch.tensor(none, device=trainer.strategy.root_device)
        if distributed:
            first = trainer.strategy.reduce(first, reduce_op="min")
        first = int(first)  # the one host sync for all pending steps
        if first == none:
            return
        loss, step, epoch, batch_idx = pending[min(first, len(pending) - 1)] if pending else (None, "?", "?", "?")
        local = loss is not None and not bool(torch.isfinite(loss).all())
        value = f"became {loss.item()}" if local else "became non-finite on another process"
        last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise TrainingDiverged(f"the training loss {value} in training step {step} (epoch {epoch}, "
                               f"batch {batch_idx}); {kept}; lower the learning rate or use gradient clipping "
                               "(--trainer.gradient_clip_val 1.0)")


class SafeInterrupt(pl.Callback):
    """Ctrl-C, SIGTERM and SLURM's SIGUSR1 stop between batches and save a checkpoint there.

    Off SLURM the checkpoint is `checkpoints/last.ckpt` (resume with `--ckpt_path` on it). Under
    SLURM, SIGUSR1 (sent `--signal=SIGUSR1@90` seconds before the time limit, or by
    `scancel -s USR1`) saves Lightning's `hpc_ckpt_N.ckpt` in the run directory and requeues the
    job; the restarted job resumes from it by itself, in the same run directory.
    """

    def __init__(self):
        self.requeue = self.signalled = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.requeue = self.signalled = False
        self._previous = {}
        handlers = {signal.SIGINT: self._stop}
        if os.environ.get("SLURM_JOB_ID"):
            handlers[signal.SIGUSR1] = self._stop_and_requeue
        for signum, handler in handlers.items():
            self._previous[signum] = signal.signal(signum, handler)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in getattr(self, "_previous", {}).items():
            signal.signal(signum, handler)
        self._previous = {}

    def _stop(self, signum, frame) -> None:
        print(f"\nreceived signal {signum}: stopping after the current batch", file=sys.stderr, flush=True)
        self.signalled = True
        if self._trainer.world_size == 1:
            self._trainer._signal_connector.received_sigterm = True  # Lightning stops at the next safe point

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1:  # ranks get a signal at different batches: all must stop after the same one
            flags = torch.tensor([int(self.signalled), int(self.requeue)], device=pl_module.device)
            signalled, requeue = trainer.strategy.reduce(flags, reduce_op="max").tolist()
            if signalled:
                self.signalled, self.requeue = True, bool(requeue)
                trainer._signal_connector.received_sigterm = True

    def _stop_and_requeue(self, signum, frame) -> None:
        self.requeue = True
        self._stop(signum, frame)

    def setup(self, trainer, pl_module, stage) -> None:
        self._trainer = trainer

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        if self.requeue:
            path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        else:
            path = os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
        trainer.save_checkpoint(path)  # written to a temp file and moved: never half-written
        print(f"saved {path} at step {trainer.global_step}", file=sys.stderr, flush=True)
        if self.requeue:  # the requeue SIGTERMs every rank; under DDP Lightning's handler would broadcast to dead ranks
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.requeue and trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            print(f"requeued SLURM job {job}" if result.returncode == 0 else
                  f"could not requeue SLURM job {job}: {result.stderr.strip()}", file=sys.stderr, flush=True)
