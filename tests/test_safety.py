"""Faults: a diverged loss, an interrupted run, concurrent runs (bad input: tests/test_bad_inputs.py)."""
import os
import signal
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.safety import STOP, NonFiniteLossGuard, SafeInterrupt, TrainingDiverged, discard_run_dirs
from datamodules import DigitsDataModule
from lightning_modules import CNN
from run_dirs import claim_run_dir, created_run_dirs
from tests.conftest import ROOT


class DivergesAt(CNN):
    """A CNN whose loss turns NaN from a given step on."""

    def __init__(self, nan_from_step: int = 25, **kwargs):
        super().__init__(**kwargs)
        self.nan_from_step = nan_from_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.nan_from_step else loss


def _model(cls=CNN, **kwargs):
    return cls(channels=[8, 16], head_hidden=[32], head_dropout=0.2, class_names=list("0123456789"),
               input_shape=(1, 8, 8), **kwargs)


def _trainer(tmp_path, callbacks, max_epochs=3):
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                      callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True), *callbacks])


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    pl.seed_everything(0)
    trainer = _trainer(tmp_path, [NonFiniteLossGuard()])
    with pytest.raises(TrainingDiverged, match=r"became nan in training step 26 \(epoch 1, batch 4\); the last good "
                                               r"checkpoint is .*last.ckpt"):
        trainer.fit(_model(DivergesAt, nan_from_step=25), datamodule=DigitsDataModule(batch_size=64))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 21  # the end of epoch 0, before the loss broke
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_nan_loss_is_never_saved_between_two_checks(tmp_path):
    # checked every 100 steps only: the epoch's end and the checkpoint saves still stop the run in time
    pl.seed_everything(0)
    trainer = _trainer(tmp_path, [NonFiniteLossGuard(check_every_n_steps=100)])
    with pytest.raises(TrainingDiverged, match=r"became nan in training step 19 \(epoch 0, batch 18\); no checkpoint "
                                               r"was saved yet"):
        trainer.fit(_model(DivergesAt, nan_from_step=18), datamodule=DigitsDataModule(batch_size=64))
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")

    pl.seed_everything(0)
    every_5 = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                         callbacks=[every_5, NonFiniteLossGuard(check_every_n_steps=100)])
    with pytest.raises(TrainingDiverged, match=r"training step 8 \(epoch 0, batch 7\)"):
        trainer.fit(_model(DivergesAt, nan_from_step=7), datamodule=DigitsDataModule(batch_size=64))
    assert sorted(os.listdir(tmp_path / "steps")) == ["step=5.ckpt"]  # the save at step 10 was refused


def test_the_loss_check_syncs_once_per_window_not_per_step(tmp_path, monkeypatch):
    checks = []
    real = NonFiniteLossGuard.check
    monkeypatch.setattr(NonFiniteLossGuard, "check", lambda self, trainer: checks.append(len(self._pending))
                        or real(self, trainer))
    pl.seed_everything(0)
    _trainer(tmp_path, [NonFiniteLossGuard()], max_epochs=1).fit(_model(), datamodule=DigitsDataModule(batch_size=64))
    assert [n for n in checks if n] == [10, 10, 1]  # 21 steps: two full windows, the rest at the epoch's end


@pytest.mark.parametrize("shape", [(), (1,)])
def test_the_loss_check_names_the_first_bad_step_whatever_the_losses_dtype_and_shape(shape):
    from types import SimpleNamespace

    trainer = SimpleNamespace(world_size=1, checkpoint_callback=None)
    guard = NonFiniteLossGuard()
    losses = [torch.tensor(0.5).reshape(shape), torch.tensor(0.25, dtype=torch.bfloat16).reshape(shape),
              torch.tensor(1.0, dtype=torch.float64).reshape(shape)]
    guard._pending = [(loss, 40 + i, 3, i) for i, loss in enumerate(losses)]
    guard.check(trainer)  # all finite: nothing raised, the window emptied
    assert guard._pending == []
    for bad in (float("nan"), float("inf")):
        guard._pending = [(loss, 40 + i, 3, i) for i, loss in enumerate([*losses, torch.tensor(bad).reshape(shape),
                                                                          torch.tensor(float("nan")).reshape(shape)])]
        with pytest.raises(TrainingDiverged, match=rf"became {bad} in training step 43 \(epoch 3, batch 3\); no "):
            guard.check(trainer)
        assert guard._pending == []


class InterruptAt(pl.Callback):
    """Sends this process a signal after a given step: Ctrl-C (SIGINT) or a `kill` (SIGTERM)."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_epoch_saves_last_and_resume_matches_an_uninterrupted_run(tmp_path, signum):
    pl.seed_everything(0)
    model = _model()
    _trainer(tmp_path / "full", []).fit(model, datamodule=DigitsDataModule(batch_size=64, rotation=10.0))
    uninterrupted = model.state_dict()

    pl.seed_everything(0)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job, Python's handler in a terminal
    trainer = _trainer(tmp_path / "run", [SafeInterrupt(), InterruptAt(step=30, signum=signum)])
    with pytest.raises(SIGTERMException), STOP:
        trainer.fit(_model(), datamodule=DigitsDataModule(batch_size=64, rotation=10.0))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 30  # stopped between batches, mid-epoch 1
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored to whatever they were
    assert STOP.received is None  # and forgotten: a later plain fit in the same process must not stop for it

    pl.seed_everything(0)
    model = _model()
    _trainer(tmp_path / "run", []).fit(model, datamodule=DigitsDataModule(batch_size=64, rotation=10.0),
                                       ckpt_path=last, weights_only=True)
    assert all(torch.equal(uninterrupted[k], v) for k, v in model.state_dict().items())


class SigtermAtEpochEnd(pl.Callback):
    """`kill <pid>` of a plain Trainer fit (no `with STOP:`) at epoch 0's last training batch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == trainer.num_training_batches - 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_before_a_validation_without_stop_finishes_it_and_resumes_to_the_uninterrupted_run(tmp_path):
    # Lightning's own notifier sets the stop flag at once: the validation that follows must still run whole
    stopping = lambda: EarlyStopping(monitor="val/loss", patience=5)  # noqa: E731  (checks val/loss at epoch ends)
    pl.seed_everything(0)
    model = _model()
    _trainer(tmp_path / "full", [stopping()]).fit(model, datamodule=DigitsDataModule(batch_size=64, rotation=10.0))
    uninterrupted = model.state_dict()

    pl.seed_everything(0)
    trainer = _trainer(tmp_path / "run", [SafeInterrupt(), SigtermAtEpochEnd(), stopping()])
    with pytest.raises(SIGTERMException):
        trainer.fit(_model(), datamodule=DigitsDataModule(batch_size=64, rotation=10.0))
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["loops"]["fit_loop"]["epoch_progress"]["total"]["completed"] == 1  # epoch 0 ended, validated

    pl.seed_everything(0)
    model = _model()
    _trainer(tmp_path / "run", [stopping()]).fit(model, datamodule=DigitsDataModule(batch_size=64, rotation=10.0),
                                                 ckpt_path=tmp_path / "run" / "checkpoints" / "last.ckpt",
                                                 weights_only=True)
    assert all(torch.equal(uninterrupted[k], v) for k, v in model.state_dict().items())


def test_two_fits_started_together_get_distinct_run_directories(tmp_path):
    command = [sys.executable, "cli.py", "fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1",
               "--log_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    runs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-1500:] for _, err in outputs]
    folders = sorted(os.listdir(tmp_path / "quickstart"))
    assert len(folders) == 2
    assert all(os.path.isfile(tmp_path / "quickstart" / f / "results.json") for f in folders)


def test_a_failed_run_takes_its_empty_experiment_folder_along_and_leaves_other_runs(tmp_path):
    kept = tmp_path / "kept" / "20260101-000000"
    kept.mkdir(parents=True)
    runs = [str(tmp_path / "alone" / "v1"), str(tmp_path / "kept" / "v2")]
    for run in runs:
        os.makedirs(run)
    discard_run_dirs(runs, failed=True)
    assert sorted(os.listdir(tmp_path)) == ["kept"] and os.listdir(tmp_path / "kept") == [kept.name]


def test_a_run_folder_is_claimed_even_if_a_failed_command_removes_its_empty_parent_meanwhile(tmp_path, monkeypatch):
    mkdir, calls = os.mkdir, []

    def parent_removed_first(path, *args, **kwargs):  # the other command's os.rmdir lands between makedirs and mkdir
        if not calls and os.path.basename(os.path.dirname(path)) == "quickstart":  # the run's own folder
            calls.append(path)
            os.rmdir(os.path.dirname(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", parent_removed_first)
    monkeypatch.delenv("RUN_VERSION", raising=False)
    run_dir = claim_run_dir(str(tmp_path), "quickstart")
    created_run_dirs.clear()
    assert calls and os.path.isdir(run_dir) and os.path.dirname(run_dir) == str(tmp_path / "quickstart")


DDP_NAN_SCRIPT = '''
import os
import sys
sys.path.insert(0, {root!r})
import lightning.pytorch as pl
import torch
from callbacks.safety import NonFiniteLossGuard, TrainingDiverged
from datamodules import DigitsDataModule
from lightning_modules import CNN


class NanOnRank1(CNN):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_rank == 1 and self.global_step == 9 else loss


pl.seed_everything(0)
model = NanOnRank1(channels=[8], head_hidden=[], class_names=list("0123456789"), input_shape=(1, 8, 8))
trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                     enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, callbacks=[NonFiniteLossGuard()],
                     use_distributed_sampler=False,  # our loader shards by rank itself (as cli.py sets)
                     default_root_dir={root_dir!r})
try:
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
except TrainingDiverged as error:
    os.write(1, f"rank {{trainer.global_rank}}: {{error}}\\n".encode())  # one write: the ranks share the pipe
    sys.exit(3)
os.write(1, f"rank {{trainer.global_rank}}: finished\\n".encode())
'''


@pytest.mark.slow
def test_under_ddp_every_process_stops_at_the_same_check(tmp_path):
    # the 10th loss is NaN on rank 1 only: rank 0's window is clean, yet both must stop at that check (a rank
    # that went on would wait in the next gradient all-reduce for the one that stopped)
    script = tmp_path / "ddp_nan.py"
    script.write_text(DDP_NAN_SCRIPT.format(root=ROOT, root_dir=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(29500 + os.getpid() % 1000), str(script)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240)
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert lines == ["rank 0: the training loss became non-finite on another process in training step 10 "
                     "(epoch 0, batch 9); no checkpoint was saved yet; lower the learning rate or use gradient "
                     "clipping (--trainer.gradient_clip_val 1.0)",
                     "rank 1: the training loss became nan in training step 10 (epoch 0, batch 9); no checkpoint "
                     "was saved yet; lower the learning rate or use gradient clipping "
                     "(--trainer.gradient_clip_val 1.0)"], result.stdout[-2000:] + result.stderr[-3000:]
