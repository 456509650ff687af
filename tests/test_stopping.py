"""A signal at any moment of a command (off SLURM; tests/test_slurm.py has the cluster side), and last.ckpt."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
from callbacks.safety import STOP
from tests import forked
from tests.conftest import ROOT

QUICK = ["--config", "configs/quickstart.yaml", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4",
         "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar",
         "false", "--figures.enabled", "false"]


def signalled_fit(tmp_path, moment: str, signum: str, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return forked.run(["cli.py", "fit", *QUICK, "--log_dir", str(tmp_path), *extra, "--trainer.callbacks+",
                       "tests.signal_at.SignalAt", "--trainer.callbacks.moment", moment, "--trainer.callbacks.signum",
                       signum], env=env)


def signalled_ddp_fit(tmp_path, moment: str, target: str, *extra: str, signum: str = "SIGTERM",
                      torchrun: bool = False) -> subprocess.CompletedProcess:
    """A 2-rank gloo fit, launched by Lightning (or torchrun), sent `signum` at `moment` (to rank 0, or to the
    process group); it may not hang."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + os.getpid() % 1000 + 2), "cli.py"] if torchrun else [sys.executable, "cli.py"])
    command = subprocess.Popen([*launch, "fit", *QUICK, *extra, "--trainer.strategy", "ddp",
                                "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--log_dir", str(tmp_path),
                                "--trainer.callbacks+", "tests.signal_at.SignalAt", "--trainer.callbacks.moment", moment,
                                "--trainer.callbacks.signum", signum, "--trainer.callbacks.target", target],
                               cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"} if torchrun else env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group: the ranks, and nothing of pytest's
    try:
        stdout, stderr = command.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(command.pid, signal.SIGKILL)  # every rank
        pytest.fail(f"the DDP command hung after {signum} at {moment}: {command.communicate()[1][-3000:]}")
    return subprocess.CompletedProcess(command.args, command.returncode, stdout, stderr)


def last_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("moment,signum", [("setup", "SIGINT"), ("sanity_check", "SIGTERM")])
def test_a_signal_before_training_stops_at_once_and_leaves_nothing(tmp_path, moment, signum):
    result = signalled_fit(tmp_path, moment, signum)
    assert result.returncode == 130
    assert last_line(result) == f"interrupted by {signum} before training started: nothing to save"
    assert not (tmp_path / "quickstart").exists()  # the run folder it created is gone, and its parent


@pytest.mark.slow
@pytest.mark.parametrize("moment,signum", [("training", "SIGTERM"), ("validation", "SIGINT")])
def test_a_signal_while_training_saves_last_and_says_how_to_resume(tmp_path, moment, signum):
    result = signalled_fit(tmp_path, moment, signum)
    assert result.returncode == 130
    (run,) = os.listdir(tmp_path / "quickstart")
    last = tmp_path / "quickstart" / run / "checkpoints" / "last.ckpt"
    assert last_line(result) == (f"interrupted by {signum}: saved {last}; resume with python cli.py fit --config "
                                 f"{tmp_path / 'quickstart' / run / 'config.yaml'} --ckpt_path {last}")
    step = torch.load(last, weights_only=True)["global_step"]
    assert step == (2 if moment == "training" else 4)  # validation runs after the 4th batch: stop after it
    assert not os.path.exists(tmp_path / "quickstart" / run / "results.json")
    assert "weights_only" not in result.stderr + result.stdout  # Lightning's note on a save that did not say


def final_state(folder) -> dict:
    """The weights, step and early-stopping state in a finished run's last.ckpt."""
    (run,) = os.listdir(folder / "quickstart")
    last = torch.load(folder / "quickstart" / run / "checkpoints" / "last.ckpt", weights_only=True)
    stopping = {k: v for k, v in last["callbacks"].items() if k.startswith("EarlyStopping")}
    (efficiency,) = [v for k, v in last["callbacks"].items() if k.startswith("EfficiencyMonitor")]
    counts = {k: efficiency[k] for k in ("images_seen", "epochs_completed", "train_samples_per_epoch")}
    return {"step": last["global_step"], "weights": last["state_dict"], "early_stopping": stopping,
            "efficiency": counts}


@pytest.mark.slow
@pytest.mark.parametrize("moment,extra", [
    ("training", []),  # step 2 of 6: the resume goes on inside the epoch
    ("last_batch", []),  # the epoch's training is done, its validation not yet run
    ("validation", []),  # the epoch's closing validation, at its first batch
    ("validation", ["--trainer.val_check_interval", "2"]),  # a validation in the middle of the epoch
    ("epoch_end", []),  # the epoch-end hooks: early stopping, checkpoints
    ("last_batch", ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]),
], ids=["mid-epoch", "last-batch", "epoch-end-validation", "mid-epoch-validation", "epoch-end-hooks", "last-batch-ddp"])
def test_a_signal_around_validation_resumes_to_the_uninterrupted_fit(tmp_path, moment, extra):
    # Lightning stops after any validation batch but the last once its SIGTERM flag is set: the epoch then ends
    # without its validation, a resume skips it as done, and early stopping's check at the epoch end failed for
    # want of val/loss. The validation must finish first, and the resumed fit match the uninterrupted one
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    fit = ["cli.py", "fit", *QUICK, "--trainer.limit_train_batches", "6", *extra]
    reference = forked.run([*fit, "--log_dir", str(tmp_path / "reference")], env=env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    stopped = signalled_fit(tmp_path / "stopped", moment, "SIGTERM", "--trainer.limit_train_batches", "6", *extra)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    (run,) = os.listdir(tmp_path / "stopped" / "quickstart")
    last = tmp_path / "stopped" / "quickstart" / run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == (2 if moment == "training" or extra[:1] == ["--trainer.val_check_interval"]
                                         else 6)
    resumed = forked.run([*fit, "--ckpt_path", str(last), "--log_dir", str(tmp_path / "resumed")], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, final = final_state(tmp_path / "reference"), final_state(tmp_path / "resumed")
    assert final["step"] == expected["step"] == 12 and final["early_stopping"] == expected["early_stopping"]
    assert final["efficiency"] == expected["efficiency"]  # images of both epochs, the stopped one whole
    assert all(torch.equal(value, expected["weights"][key]) for key, value in final["weights"].items())


@pytest.mark.slow
def test_the_printed_resume_goes_on_in_the_run_folder_and_keeps_the_best_checkpoint_from_before_the_stop(tmp_path):
    # with `checkpoint.mode max` on val/loss the best epoch is the first, before the stop. Resumed in a new folder,
    # Lightning's ModelCheckpoint dropped its top-k record (its dirpath changed): the first epoch after the resume
    # became "best", and results.json tested it
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    extra = ["--trainer.max_epochs", "4", "--checkpoint.mode", "max", "--early_stopping.patience", "10"]
    fit = ["cli.py", "fit", *QUICK, *extra]
    reference = forked.run([*fit, "--log_dir", str(tmp_path / "reference")], env=env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    stopped = signalled_fit(tmp_path / "stopped", "epoch_end", "SIGTERM", *extra)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    (run,) = (tmp_path / "stopped" / "quickstart").iterdir()
    last = str(run / "checkpoints" / "last.ckpt")
    assert last_line(stopped).endswith(f"resume with python cli.py fit --config {run / 'config.yaml'} --ckpt_path {last}")
    # the printed command, less SignalAt (in its config.yaml): the quick-start config with the same log_dir
    resumed = forked.run([*fit, "--log_dir", str(tmp_path / "stopped"), "--ckpt_path", last], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming in the checkpoint's run folder {run}" in resumed.stdout
    assert list((tmp_path / "stopped" / "quickstart").iterdir()) == [run] and "dirpath has changed" not in resumed.stderr
    results, expected = (json.load(open(path)) for path in (run / "results.json", next(
        (tmp_path / "reference" / "quickstart").iterdir()) / "results.json"))
    assert os.path.basename(results["checkpoints"]["best"]) == "best-epoch00.ckpt"
    assert results["test"] == expected["test"]
    # from an older checkpoint than the run's newest (its best, epoch 0): a branch, into a folder of its own
    before = {name: os.path.getmtime(run / "checkpoints" / name) for name in os.listdir(run / "checkpoints")}
    branched = forked.run([*fit, "--log_dir", str(tmp_path / "stopped"), "--ckpt_path", results["checkpoints"]["best"]],
                          env=env)
    assert branched.returncode == 0 and "Resuming in" not in branched.stdout, branched.stderr[-3000:]
    assert len(list((tmp_path / "stopped" / "quickstart").iterdir())) == 2
    assert {name: os.path.getmtime(run / "checkpoints" / name) for name in os.listdir(run / "checkpoints")} == before


@pytest.mark.slow
@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_inside_a_gradient_accumulation_window_waits_for_its_optimizer_step_and_resumes_exactly(tmp_path,
                                                                                                          signum):
    # the stop came after the current batch, in the middle of a window: its partly summed gradients were lost, and
    # the resumed fit ended with other weights; and a resume in the run folder wrote last-v1.ckpt beside the stop's
    # last.ckpt, which Lightning did not count as its own
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    extra = ["--trainer.accumulate_grad_batches", "3", "--trainer.limit_train_batches", "6"]
    fit = ["cli.py", "fit", *QUICK, *extra]
    reference = forked.run([*fit, "--log_dir", str(tmp_path / "reference")], env=env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    stopped = signalled_fit(tmp_path / "stopped", "second_batch", signum, *extra)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert f"received {signum}: stopping after the current optimizer step (gradient accumulation)" in stopped.stderr
    (run,) = (tmp_path / "stopped" / "quickstart").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 1  # after the window's third batch, not its second
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 3
    resumed = forked.run([*fit, "--log_dir", str(tmp_path / "stopped"), "--ckpt_path", str(last)], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [name for name in os.listdir(run / "checkpoints") if "-v" in name]
    expected, final = final_state(tmp_path / "reference"), final_state(tmp_path / "stopped")
    assert final["step"] == expected["step"] == 4
    assert all(torch.equal(value, expected["weights"][key]) for key, value in final["weights"].items())


@pytest.mark.slow
def test_a_signal_as_the_fit_ends_stops_before_the_tests(tmp_path):
    # after the fit loop's last safe point (on_train_end) nothing stops training any more: the command must not
    # go on to test as if no signal had come, but stop as a signal during the tests does
    result = signalled_fit(tmp_path, "train_end", "SIGTERM")
    assert result.returncode == 130, result.stderr[-3000:]
    (run,) = os.listdir(tmp_path / "quickstart")
    folder = tmp_path / "quickstart" / run
    assert last_line(result).startswith(f"interrupted by SIGTERM while testing: the checkpoints are kept in "
                                        f"{folder / 'checkpoints'}; score one with python cli.py test")
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8  # the whole fit
    assert not os.path.exists(folder / "results.json") and "Testing the" not in result.stdout


@pytest.mark.slow
def test_ctrl_c_while_testing_keeps_the_checkpoints_and_names_them(tmp_path):
    result = signalled_fit(tmp_path, "testing", "SIGINT")
    assert result.returncode == 130
    (run,) = os.listdir(tmp_path / "quickstart")
    folder = tmp_path / "quickstart" / run
    assert last_line(result).startswith(f"interrupted by SIGINT while testing: the checkpoints are kept in "
                                        f"{folder / 'checkpoints'}; score one with python cli.py test")
    assert "last.ckpt" in os.listdir(folder / "checkpoints")
    assert not os.path.exists(folder / "results.json")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rank0", "group"])
def test_sigterm_to_a_ddp_fit_stops_every_rank_after_the_same_batch(tmp_path, target):
    # Lightning-launched DDP (2 ranks, gloo): `kill <pid>` reaches rank 0, which passes it on to rank 1;
    # `kill -- -<pgid>` reaches both ranks, and rank 1 a second time from rank 0. Neither may hang
    result = signalled_ddp_fit(tmp_path, "training", target, "--trainer.limit_train_batches", "20")
    assert result.returncode == 130, result.stderr[-3000:]
    (run,) = os.listdir(tmp_path / "quickstart")
    last = tmp_path / "quickstart" / run / "checkpoints" / "last.ckpt"
    assert last_line(result).startswith(f"interrupted by SIGTERM: saved {last}")
    assert 2 <= torch.load(last, weights_only=True)["global_step"] < 20  # stopped soon after the signal


@pytest.mark.slow
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_to_a_torchrun_fit_stops_both_ranks_after_the_same_batch(tmp_path, signum):
    # a terminal's Ctrl-C or a scheduler's SIGTERM reaches torchrun's agent and both ranks; the agent passes it on
    # again, and ends the other rank when one exits (torchrun reports exit status 130 as a failure: its own words)
    result = signalled_ddp_fit(tmp_path, "training", "group", "--trainer.limit_train_batches", "20", signum=signum,
                               torchrun=True)
    assert result.returncode != 0
    (run,) = os.listdir(tmp_path / "quickstart")
    last = tmp_path / "quickstart" / run / "checkpoints" / "last.ckpt"
    assert f"interrupted by {signum}: saved {last}; resume with" in result.stderr, result.stderr[-3000:]
    assert 2 <= torch.load(last, weights_only=True)["global_step"] < 20  # stopped soon after the signal
    assert os.listdir(last.parent) == ["last.ckpt"] and not os.path.exists(last.parent.parent / "results.json")


@pytest.mark.slow
@pytest.mark.parametrize("moment,target", [("train_end", "rank0"), ("testing", "group")])
def test_a_signal_to_a_ddp_command_after_training_stops_every_rank_with_one_line(tmp_path, moment, target):
    # after training each rank stops at once by itself; a rank that stopped first broke the other's next collective,
    # which ended in a gloo traceback and exit status 1
    result = signalled_ddp_fit(tmp_path, moment, target)
    stderr = result.stderr
    assert result.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    (run,) = os.listdir(tmp_path / "quickstart")
    folder = tmp_path / "quickstart" / run
    line = (f"interrupted by SIGTERM while testing: the checkpoints are kept in {folder / 'checkpoints'}; score one "
            f"with python cli.py test --config {folder / 'config.yaml'} --ckpt_path <checkpoint>")
    assert line in stderr, stderr[-3000:]  # each rank ends with it (the two may share a line of the terminal)
    assert "last.ckpt" in os.listdir(folder / "checkpoints") and not os.path.exists(folder / "results.json")


def test_handlers_and_environment_are_restored_to_whatever_they_were(tmp_path):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job
    try:
        cli.run_cli(["fit", *QUICK, "--trainer.max_epochs", "1", "--log_dir", str(tmp_path)])
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL and not STOP.installed
        assert "RUN_VERSION" not in os.environ  # a process started later (torchrun) must not take this run's folder
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_last_ckpt_is_the_final_state_after_early_stopping_past_the_best_epoch(tmp_path):
    # monitoring val/loss for its maximum makes epoch 0 the best; early stopping (min, patience 1) ends the fit
    # later, so the best and the final state differ: last.ckpt must be the final one
    created = cli.run_cli(["fit", *QUICK, "--trainer.max_epochs", "6", "--trainer.limit_train_batches", "3",
                           "--checkpoint.mode", "max", "--early_stopping.patience", "1",
                           "--early_stopping.monitor", "val/acc", "--early_stopping.mode", "min",
                           "--log_dir", str(tmp_path)])
    trainer = created.trainer
    folder = tmp_path / "quickstart" / os.listdir(tmp_path / "quickstart")[0]
    best = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)
    last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert best["epoch"] == 0 and best["global_step"] == 3
    assert last["global_step"] == trainer.global_step > best["global_step"]
    assert last["epoch"] == trainer.current_epoch - 1  # saved at the end of the last epoch that ran
    model = created.model
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in last["state_dict"].items())
    results = json.loads((folder / "results.json").read_text())
    assert results["checkpoints"]["last"].endswith("last.ckpt")
    assert results["test"]["best"] != results["test"]["last"]  # two different checkpoints were scored


@pytest.mark.slow
def test_resuming_an_early_stopped_fit_trains_nothing_more(tmp_path, capsys):
    # Lightning restores EarlyStopping's counters, not trainer.should_stop: a resume used to train on
    stop_early = ["--early_stopping.patience", "1", "--early_stopping.monitor", "val/acc", "--early_stopping.mode",
                  "min", "--trainer.max_epochs", "8", "--trainer.limit_train_batches", "3"]
    first = cli.run_cli(["fit", *QUICK, *stop_early, "--log_dir", str(tmp_path / "first")])
    assert first.trainer.current_epoch < 8  # early stopping ended it
    last_path = first.trainer.checkpoint_callback.last_model_path
    last = torch.load(last_path, weights_only=True)
    capsys.readouterr()
    resumed = cli.run_cli(["fit", *QUICK, *stop_early, "--ckpt_path", last_path, "--log_dir", str(tmp_path / "again")])
    assert resumed.trainer.global_step == last["global_step"] == first.trainer.global_step
    assert all(torch.equal(value, resumed.model.state_dict()[key]) for key, value in last["state_dict"].items())
    assert "Early stopping had ended this run at epoch" in capsys.readouterr().out
    assert torch.load(last_path, weights_only=True)["global_step"] == last["global_step"]  # not rewritten


def test_staying_early_stopping_keeps_lightnings_state_key():
    from lightning.pytorch.callbacks import EarlyStopping

    from callbacks.early_stopping import StayingEarlyStopping
    # checkpoints written with Lightning's EarlyStopping restore into ours, and back
    assert StayingEarlyStopping(monitor="val/acc", mode="max").state_key == \
        EarlyStopping(monitor="val/acc", mode="max").state_key


@pytest.mark.slow
def test_a_second_command_in_a_run_folder_that_is_in_use_is_one_line_and_the_first_goes_on(tmp_path):
    # a sweep started twice, or the resume of a run still training: both wrote one folder's checkpoints and results
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    fit = [sys.executable, "cli.py", "fit", *QUICK, "--log_dir", str(tmp_path), "--run_version", "shared"]
    run = tmp_path / "quickstart" / "shared"
    first = subprocess.Popen([*fit, "--trainer.max_epochs", "1000", "--early_stopping.patience", "1000"], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until it trains
            if (run / "checkpoints" / "last.ckpt").exists():
                break
            time.sleep(0.1)
        second = subprocess.run(fit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: the run folder {run} is in use by another command (pid {first.pid}); wait for it to end or stop "
            "it, or give --run_version another name")
        assert first.poll() is None  # untouched, still training
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 130
    last = run / "checkpoints" / "last.ckpt"
    steps = torch.load(last, weights_only=True)["global_step"] + 4
    resumed = subprocess.run([*fit, "--trainer.max_epochs", "1000", "--trainer.max_steps", str(steps), "--ckpt_path",
                              str(last)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # the lock ended with its command
