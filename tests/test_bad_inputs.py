"""Bad input through the real CLI: non-zero exit, one line that says what to do, nothing damaged.

An earlier run lives in the same log directory for the whole module; every bad command must leave
its files byte-for-byte as they were and create no run directory of its own.
"""
import hashlib
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.fixtures import write_mnist

QUICKSTART = ["--config", "configs/quickstart.yaml"]


def run_cli(*args):
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def snapshot(folder) -> dict:
    return {os.path.join(d, f): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(folder) for f in files}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    result = run_cli("fit", *QUICKSTART, "--trainer.max_epochs", "1", "--log_dir", str(logs),
                     "--trainer.enable_progress_bar", "false", "--figures.enabled", "false")
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = result.stdout.strip().splitlines()[-1].removeprefix("Run directory: ")
    return logs, run_dir


def assert_rejected(result, pattern: str, earlier_run) -> None:
    logs, run_dir = earlier_run
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert pattern in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(os.path.dirname(run_dir))) == [os.path.basename(run_dir)]  # no new run directory


@pytest.fixture()
def untouched(earlier_run):
    before = snapshot(earlier_run[0])
    yield earlier_run
    assert snapshot(earlier_run[0]) == before  # the earlier run's checkpoints and results.json are intact


CASES = {
    "unknown option": (["--model.init_args.bogus", "1"], "Option 'bogus' is not accepted"),
    "unknown model class": (["--model.class_path", "lightning_modules.Nope"],
                            "unknown class_path 'lightning_modules.Nope'; valid ones: lightning_modules.MLP"),
    "misspelled dataset": (["--data.class_path", "datamodules.CIFAR11DataModule"],
                           "unknown class_path 'datamodules.CIFAR11DataModule'; valid ones: datamodules.Digits"),
    "num_classes against the data": (["--model.init_args.num_classes", "12"], "num_classes=12 disagrees"),
    "parameter budget": (["--model.init_args.max_params", "1000"], "over the budget of 1,000 (max_params)"),
    "zero learning rate": (["--model.init_args.lr", "0"], "learning rate must be positive"),
    "negative learning rate": (["--model.init_args.lr", "-0.1"], "learning rate must be positive"),
    "zero batch size": (["--data.init_args.batch_size", "0"], "batch_size must be positive"),
    "negative epochs": (["--trainer.max_epochs", "-3"], "max_epochs must be positive"),
    "zero epochs": (["--trainer.max_epochs", "0"], "max_epochs must be positive"),
    "gpu without a gpu": (["--trainer.accelerator", "gpu"], "no CUDA GPU; use --trainer.accelerator auto"),
    "missing checkpoint": (["--ckpt_path", "/nonexistent/last.ckpt"], "checkpoint /nonexistent/last.ckpt does not exist"),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU case is only an error without a GPU")
@pytest.mark.parametrize("case", CASES)
def test_bad_option_is_one_line(case, untouched):
    args, pattern = CASES[case]
    assert_rejected(run_cli("fit", *QUICKSTART, "--log_dir", str(untouched[0]), *args), pattern, untouched)


def test_unknown_key_in_a_config_file(untouched, tmp_path):
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("trainer:\n  max_epoch: 3\n")
    result = run_cli("fit", *QUICKSTART, "--config", str(overlay), "--log_dir", str(untouched[0]))
    assert_rejected(result, "max_epoch", untouched)


def test_misspelled_emnist_split(untouched):
    result = run_cli("fit", "--data", "datamodules.EMNISTDataModule", "--data.split", "byclas",
                     "--model", "lightning_modules.MLP", "--log_dir", str(untouched[0]))
    assert_rejected(result, "byclas", untouched)


def test_data_folder_missing_offline(untouched, tmp_path):
    result = run_cli("fit", "--config", "configs/mnist_cnn.yaml", "--data.init_args.data_dir", str(tmp_path / "none"),
                     "--data.init_args.download", "false", "--log_dir", str(untouched[0]))
    assert_rejected(result, "python -m datamodules.download mnist", untouched)


def test_truncated_dataset_file(untouched, tmp_path):
    write_mnist(str(tmp_path))
    with open(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte", "r+b") as f:
        f.truncate(5000)
    result = run_cli("fit", "--config", "configs/mnist_cnn.yaml", "--data.init_args.data_dir", str(tmp_path),
                     "--data.init_args.download", "false", "--log_dir", str(untouched[0]))
    assert_rejected(result, "could not read mnist", untouched)


def test_corrupt_checkpoint_and_one_of_another_model_class(untouched, tmp_path):
    corrupt = tmp_path / "broken.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    result = run_cli("test", *QUICKSTART, "--ckpt_path", str(corrupt), "--log_dir", str(untouched[0]))
    assert_rejected(result, "cannot read the checkpoint", untouched)
    cnn_checkpoint = os.path.join(untouched[1], "checkpoints", "last.ckpt")
    result = run_cli("test", "--config", "configs/digits_scratch_cnn.yaml", "--ckpt_path", cnn_checkpoint,
                     "--log_dir", str(untouched[0]))
    assert_rejected(result, "holds a CNN but the config builds a ScratchCNN", untouched)


def test_log_directory_that_cannot_be_written(untouched, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_cli("fit", *QUICKSTART, "--log_dir", str(blocker / "logs"))
    assert_rejected(result, "cannot create the log directory", untouched)


def test_gpu_precision_on_a_cpu_machine_falls_back_with_one_warning(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("only a fallback on machines without a GPU")
    result = run_cli("fit", *QUICKSTART, "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1",
                     "--log_dir", str(tmp_path), "--trainer.enable_progress_bar", "false", "--figures.enabled", "false")
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: precision bf16-mixed needs a GPU and there is none; training in 32-true"]
