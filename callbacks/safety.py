"""The stop path, in one place: a diverged loss, Ctrl-C / SIGTERM, SLURM's pre-timeout SIGUSR1, and what a
stopped command leaves behind.

A signal can arrive at any moment of any command. `STOP` (installed by cli.run_cli for the whole command)
records it; what happens next depends on where the command is and whether it runs under SLURM:

| moment                                  | off SLURM (Ctrl-C, SIGTERM)          | under SLURM (SIGUSR1, SIGTERM)              |
|-----------------------------------------|--------------------------------------|---------------------------------------------|
| parsing, setup, sanity check            | stop at once; nothing to save        | go on; stop after the first training batch  |
| training (incl. saving)                 | stop after the current batch, save   | the same, save hpc_ckpt_N, requeue (USR1)    |
|                                         | checkpoints/last.ckpt                | and resume there after the restart          |
| a validation, or the batch before one   | the same, after the validation (and  | the same, likewise                          |
|                                         | the epoch it ends)                   |                                             |
| the fit's end, past its last batch      | stop before the tests (as testing)   | finish the tests                            |
| testing (after fit, or a test command)  | stop at once; checkpoints stay       | finish the tests (short work), results.json |

Stopping "after the current batch" uses Lightning's own SIGTERM path (the trainer's `received_sigterm` flag,
checked where the loop's progress is complete), so a checkpoint taken there resumes without losing or
repeating a step. A second Ctrl-C off SLURM stops a single process at once.
"""
import os
import shutil
import signal
import subprocess
import sys
import threading

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
        if loss is not None:  # automatic optimization hands over a detached loss already: no op is spent on another
            self._pending.append((loss.detach() if loss.requires_grad else loss, trainer.global_step,
                                  trainer.current_epoch, batch_idx))
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
            losses = [loss for loss, *_ in pending]
            if not all(loss.dim() == 0 for loss in losses):  # a (1,)-shaped loss, say
                losses = [loss.float().reshape(()) for loss in losses]
            finite = torch.isfinite(torch.stack(losses))  # (n,); stack promotes mixed dtypes
            if not distributed and bool(finite.all()):  # the common answer in three ops and one host sync
                return
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


class StopNow(BaseException):
    """Raised by the signal handler where stopping at once is safe (nothing is being trained or saved)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """The process's Ctrl-C / SIGTERM / SIGUSR1 handler for the whole command; `phase` says what is running."""

    def __init__(self):
        self._previous: dict[int, object] = {}
        self.reset()

    def reset(self) -> None:
        self.received: int | None = None  # the first signal of this command
        self.requeue = False  # SIGUSR1 under SLURM: requeue after saving
        self.phase = "setup"  # setup -> training -> testing (set by SafeInterrupt's hooks)
        self.saved = ""  # the checkpoint written at the safe point
        self.run_dir: str | None = None  # the command's run folder, once claimed
        self.trainer = None  # the trainer while it trains

    @staticmethod
    def under_slurm() -> bool:
        return bool(os.environ.get("SLURM_JOB_ID"))

    def install(self) -> None:
        """Handlers for this command; `restore()` puts back whatever was there before (even SIG_IGN)."""
        self.reset()
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            self._previous[signum] = signal.signal(signum, self._handle)

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def __enter__(self) -> "StopSignals":  # `with STOP: trainer.fit(...)` outside cli.run_cli
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            if signum == signal.SIGTERM and self.requeue and self.saved:
                continue  # `scontrol requeue` SIGTERMs the job next: it is expected, keep ignoring it
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        self.reset()  # a later fit (a plain Trainer in the same notebook) must not stop for this command's signal

    def _stop_after_this_batch(self) -> None:
        trainer = self.trainer
        if self.phase == "training" and trainer is not None and trainer.world_size == 1 and not trainer.validating \
                and trainer.accumulate_grad_batches == 1:
            trainer._signal_connector.received_sigterm = True  # Lightning stops once this step is complete
        # while validating, SafeInterrupt.on_validation_end sets it: Lightning would stop mid-validation; under DDP
        # or with gradient accumulation, SafeInterrupt.on_train_batch_end (at the batch that ends an optimizer step)

    def stop_before_testing(self, trainer) -> None:
        """After a fit, before its tests: a signal that came after training's last safe point (while the fit
        ended) stops the command as one during the tests does, off SLURM; under SLURM the tests are finished."""
        if self.under_slurm():
            return
        signalled = self.received is not None
        if trainer.world_size > 1:  # every rank stops, or none: one left alone in a test's collective would hang
            flag = torch.tensor([int(signalled)], device=trainer.strategy.root_device)
            signalled = bool(trainer.strategy.reduce(flag, reduce_op="max").item())
        if signalled:
            raise StopNow(self.received or signal.SIGTERM)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.under_slurm():  # never stop mid-work on a cluster: act at the next safe point, or finish
            if self.received is None:
                self.received, self.requeue = signum, signum == signal.SIGUSR1
                self._stop_after_this_batch()
                what = {"training": "saving after the current batch", "testing": "finishing the tests first"}
                _say(f"received {name}: {what.get(self.phase, 'stopping after the first training batch')}")
            return
        if signum == signal.SIGUSR1:
            return  # no meaning off SLURM
        if self.received is not None:  # a second one: Ctrl-C again stops at once, in a single process only (a DDP
            # rank that left alone would hang the others; Lightning's launcher also re-sends SIGTERM to its ranks)
            if signum == signal.SIGINT and self.trainer is not None and self.trainer.world_size == 1:
                raise StopNow(signum)
            return
        if self.phase != "training":
            raise StopNow(signum)  # nothing half-done to protect: stop now
        self.received = signum
        self._stop_after_this_batch()
        again = " (Ctrl-C again to stop at once)" if self.trainer is not None and self.trainer.world_size == 1 else ""
        accumulating = self.trainer is not None and self.trainer.accumulate_grad_batches > 1
        _say(f"received {name}: stopping after the current "
             f"{'optimizer step (gradient accumulation)' if accumulating else 'batch'}{again}")


def _say(line: str) -> None:
    os.write(2, f"\n{line}\n".encode())  # os.write: a print() inside a signal handler can re-enter a print


STOP = StopSignals()


def _sigterm_notifier(trainer):
    """Lightning 2.6's SIGTERM notifier (`_SignalConnector._sigterm_notifier_fn`) without what it does under DDP.

    Lightning's handler runs `dist.broadcast` inside the signal handler, once per SIGTERM received, at whatever
    point the rank is in: the other rank is then in another collective (the gradient all-reduce, SafeInterrupt's
    flag), so `kill <pid>` of a Lightning-launched DDP fit hung both ranks, and so did `kill -- -<pgid>` (rank 1
    gets two SIGTERMs, rank 0 one). It also set `received_sigterm` on the signalled rank alone, which may then
    stop a batch before the others. Here the first SIGTERM is passed on to the ranks Lightning launched (as
    Lightning does), a single process stops after its batch (as Lightning does), and under DDP `STOP` records it
    and `SafeInterrupt.on_train_batch_end` makes every rank stop after the same batch."""
    forwarded = []

    def notify(signum, frame) -> None:
        launcher = trainer.strategy.launcher
        if launcher is not None and not forwarded:
            forwarded.append(signum)
            launcher.kill(signum)
        if trainer.world_size == 1 and not trainer.validating and trainer.accumulate_grad_batches == 1:
            trainer._signal_connector.received_sigterm = True  # validating: SafeInterrupt.on_validation_end
        elif not STOP.installed and STOP.received is None:  # a plain Trainer without `with STOP:`
            STOP.received = signum

    return notify


class SafeInterrupt(pl.Callback):
    """Stops training at a safe point after a signal that `STOP` recorded, and saves a checkpoint there.

    cli.run_cli installs `STOP` for the whole command; a plain Trainer needs `with STOP: trainer.fit(...)`.

    Off SLURM the checkpoint is `checkpoints/last.ckpt` (resume with `--ckpt_path` on it). Under SLURM it is
    Lightning's `hpc_ckpt_N.ckpt` in the run directory, which a restarted job resumes from by itself in the
    same run directory; SIGUSR1 (sent `--signal=SIGUSR1@90` seconds before the time limit, or by
    `scancel -s USR1`) also requeues the job.
    """

    def setup(self, trainer, pl_module, stage) -> None:
        if not STOP.installed:
            STOP.reset()  # a plain Trainer: nothing left over from an earlier fit's signal
        STOP.phase = "setup" if stage == "fit" else "testing"
        connector = trainer._signal_connector  # registers its SIGTERM handler after this hook, for every stage
        if not getattr(connector, "_broadcast_free", False):
            connector._sigterm_notifier_fn = _sigterm_notifier(trainer)
            connector._broadcast_free = True

    def on_train_start(self, trainer, pl_module) -> None:
        STOP.phase, STOP.trainer = "training", trainer

    def on_train_end(self, trainer, pl_module) -> None:
        STOP.phase, STOP.trainer = "testing", None

    def on_test_start(self, trainer, pl_module) -> None:
        STOP.phase = "testing"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # with gradient accumulation only a batch that ends an optimizer step is a safe point: a checkpoint holds no
        # partly summed gradients, so a stop inside a window resumed to other weights than an uninterrupted fit's.
        # Every rank is at the same batch index, so all skip (or join) the collective below alike
        accumulate = trainer.accumulate_grad_batches
        if accumulate > 1 and (batch_idx + 1) % accumulate and batch_idx + 1 != trainer.num_training_batches:
            return
        self._stop_if_signalled(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        # A validation is never cut short. Lightning stops after any validation batch but the last when the flag is
        # set, so the epoch's training ends without its validation: a resume skips it (Lightning's `restarted_on_
        # last`) and EarlyStopping's end-of-epoch check fails for want of val/loss. The flag waits for the end
        if not trainer.sanity_checking:
            self._deferred = trainer._signal_connector.received_sigterm  # set by Lightning's notifier without STOP
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer, pl_module) -> None:
        # after a mid-epoch validation Lightning stops there; after an epoch's last, once the epoch has ended
        if not trainer.sanity_checking:
            self._stop_if_signalled(trainer, pl_module, getattr(self, "_deferred", False))
            self._deferred = False

    @staticmethod
    def _stop_if_signalled(trainer, pl_module, deferred: bool = False) -> None:
        signalled, requeue = deferred or STOP.received is not None, STOP.requeue
        if trainer.world_size > 1:  # ranks get a signal at different batches: all must stop after the same one
            flags = torch.tensor([int(signalled), int(requeue)], device=pl_module.device)
            signalled, requeue = (bool(f) for f in trainer.strategy.reduce(flags, reduce_op="max").tolist())
        if signalled:
            STOP.requeue = requeue
            trainer._signal_connector.received_sigterm = True  # Lightning stops once this step is complete

    def on_exception(self, trainer, pl_module, exception) -> None:
        STOP.trainer = None
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self._save(trainer)

    def _save(self, trainer) -> None:
        if STOP.under_slurm():  # the restarted job finds it by itself
            path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        else:
            path = os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
            callback = trainer.checkpoint_callback
            if callback is not None and callback.dirpath and \
                    os.path.abspath(os.path.join(callback.dirpath, "last.ckpt")) == os.path.abspath(path):
                # the saved state names this file as its own last checkpoint: a fit resumed in this folder then
                # rewrites last.ckpt (Lightning wrote last-v1.ckpt beside a last.ckpt it had not written itself)
                callback.last_model_path = os.path.join(callback.dirpath, "last.ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # to a temp file, then moved: never half-written
        STOP.saved = path
        print(f"saved {path} at step {trainer.global_step}", file=sys.stderr, flush=True)
        if STOP.requeue:  # the requeue SIGTERMs every rank; under DDP Lightning's handler would broadcast to dead ranks
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if STOP.requeue and trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            print(f"requeued SLURM job {job}" if result.returncode == 0 else
                  f"could not requeue SLURM job {job}: {result.stderr.strip()}", file=sys.stderr, flush=True)


def interrupted_message(signum: int | None, api: bool = False) -> tuple[str, int]:
    """The one line (and exit status) a stopped command ends with, saying what was saved and how to go on (with
    api.py's calls when `api`: a notebook's user goes on in the notebook)."""
    run_dir = STOP.run_dir
    name = signal.Signals(signum).name if signum else "a signal"

    def command(subcommand: str, config: str, checkpoint: str) -> str:
        if api:
            return f"api.{subcommand}({config!r}, ckpt_path={checkpoint!r})".replace("'<checkpoint>'", "<checkpoint>")
        return f"python cli.py {subcommand} --config {config} --ckpt_path {checkpoint}"

    if STOP.saved and STOP.under_slurm():
        return (f"stopped by {name}: saved {STOP.saved}; " +
                ("the job was requeued and resumes there" if STOP.requeue else
                 "a requeued job resumes there"), 0)
    if STOP.saved:
        config = os.path.join(run_dir, "config.yaml") if run_dir else "<run dir>/config.yaml"
        return f"interrupted by {name}: saved {STOP.saved}; resume with {command('fit', config, STOP.saved)}", 130
    if run_dir and _has_checkpoints(run_dir):
        return (f"interrupted by {name} while {'testing' if STOP.phase == 'testing' else STOP.phase}: the "
                f"checkpoints are kept in {os.path.join(run_dir, 'checkpoints')}; score one with "
                f"{command('test', os.path.join(run_dir, 'config.yaml'), '<checkpoint>')}", 130)
    return f"interrupted by {name} before training started: nothing to save", 130


def _has_checkpoints(run_dir: str) -> bool:
    return any(name.endswith(".ckpt") for _, _, files in os.walk(run_dir) for name in files)


def discard_run_dirs(run_dirs: list[str], failed: bool, smoke_test: bool = False) -> None:
    """What a command leaves behind: a run folder it created is removed when the command failed (a user's
    mistake, or interrupted) before its first checkpoint, when it holds nothing at all, or after a fast_dev_run
    smoke test, and with it its experiment folder if no other run is in it. A crash (our bug, not the user's) and a
    diverged run keep theirs."""
    for run_dir in run_dirs:
        empty = not any(name != ".lock" for _, _, files in os.walk(run_dir) for name in files)  # run_dirs.LOCK_NAME
        if smoke_test or empty or (failed and not _has_checkpoints(run_dir)):
            shutil.rmtree(run_dir, ignore_errors=True)
            try:  # only if empty; a run claiming a folder in it meanwhile re-creates it (run_dirs.claim_run_dir)
                os.rmdir(os.path.dirname(run_dir))
            except OSError:
                pass
    run_dirs.clear()
