"""Bad input through the real CLI: non-zero exit, one line that says what to do, nothing damaged.

An earlier run lives in the same log directory for the whole module; every bad command must leave
its files byte-for-byte as they were and create no run directory of its own.
"""
import glob
import hashlib
import os
import subprocess
import sys
import typing
from functools import partial

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli
from callbacks.figures import Figures
from callbacks.staged_unfreezing import StagedUnfreezing
from datamodules import EMNISTDataModule, ImageDataModule
from errors import UserError
from lightning_modules import CLIPZeroShot, CNN, MLP, ClassificationModule, ResNet18, ScratchCNN
from tests import forked
from tests.conftest import ROOT
from tests.fixtures import write_mnist

QUICKSTART = ["--config", "configs/quickstart.yaml"]


def run_cli(*args):
    """`python cli.py args...` as a process of its own, forked from one that imported the libraries once."""
    return forked.run(["cli.py", *args])


def snapshot(folder) -> dict:
    return {os.path.join(d, f): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(folder) for f in files}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    result = subprocess.run([sys.executable, "cli.py", "fit", *QUICKSTART, "--trainer.max_epochs", "1", "--log_dir",
                             str(logs), "--trainer.enable_progress_bar", "false", "--figures.enabled", "false"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)  # a real process, once
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
    "zero learning rate": (["--model.init_args.lr", "0"],
                           "model.init_args.lr=0 is out of range: expected a number in (0, inf)"),
    "negative learning rate": (["--model.init_args.lr", "-0.1"], "model.init_args.lr=-0.1 is out of range"),
    "zero batch size": (["--data.init_args.batch_size", "0"],
                        "data.init_args.batch_size=0 is out of range: expected an integer in (0, inf)"),
    "negative resize": (["--data.init_args.resize", "-3"],
                        "data.init_args.resize=-3 is out of range: expected an integer in (0, inf) or null"),
    "negative weight decay": (["--model.init_args.weight_decay", "-0.1"],
                              "model.init_args.weight_decay=-0.1 is out of range: expected a number in [0, inf)"),
    "dropout of one": (["--model.init_args.head_dropout", "1"], "head_dropout=1 is out of range"),
    "negative patience": (["--early_stopping.patience", "-1"], "early_stopping.patience=-1 is out of range"),
    "negative devices": (["--trainer.devices", "-2"], "trainer.devices=-2 is out of range: expected -1 (all)"),
    "negative epochs": (["--trainer.max_epochs", "-3"], "trainer.max_epochs=-3 is out of range"),
    "zero epochs": (["--trainer.max_epochs", "0"], "trainer.max_epochs=0 is out of range"),
    "gpu without a gpu": (["--trainer.accelerator", "gpu"], "no CUDA GPU; use --trainer.accelerator auto"),
    "barebones": (["--trainer.barebones", "true"], "trainer.barebones turns off what every run of this CLI keeps"),
    # found after the sanity check's validation, before any training (Lightning: after an epoch, or a traceback)
    "misspelt early-stopping metric": (["--early_stopping.monitor", "val/los"],
                                       "early_stopping.monitor='val/los' is not a metric the model logs; val/ "
                                       "metrics are: val/acc, val/f1_macro, val/loss"),
    "misspelt checkpoint metric": (["--checkpoint.monitor", "val/accuracy"],
                                   "checkpoint.monitor='val/accuracy' is not a metric the model logs"),
    "missing checkpoint": (["--ckpt_path", "/nonexistent/last.ckpt"], "checkpoint /nonexistent/last.ckpt does not exist"),
    # the ranks in child processes: results.json came out empty (fork), or the CLI failed to pickle (spawn)
    **{f"strategy {name}": (["--trainer.strategy", name, "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
                            f"--trainer.strategy {name} runs the ranks in child processes of this one")
       for name in ("ddp_spawn", "ddp_fork", "ddp_notebook")},
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
    assert_rejected(result, "holds a CNN for 10 classes, input 1x8x8 but the config builds a ScratchCNN", untouched)


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


def test_checkpoint_of_another_dataset(untouched, data_dir, tmp_path):
    """An MNIST CNN's checkpoint given to `test` with the quick-start config (digits, 8x8): one line saying what
    the checkpoint holds against what the config builds, not a load_state_dict traceback."""
    mnist = cli.main(["fit", "--config", "configs/mnist_cnn.yaml", "--data.init_args.data_dir", data_dir,
                      "--data.init_args.download", "false", "--trainer.max_epochs", "1", "--log_dir", str(tmp_path),
                      "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                      "--trainer.limit_test_batches", "1", "--figures.enabled", "false",
                      "--trainer.enable_progress_bar", "false"])
    result = run_cli("test", *QUICKSTART, "--ckpt_path", mnist.trainer.checkpoint_callback.last_model_path,
                     "--log_dir", str(untouched[0]))
    assert_rejected(result, "holds a CNN for 10 classes, input 1x28x28 but the config builds a CNN for 10 classes, "
                            "input 1x8x8 (digits)", untouched)


FREEZE_ALL = "[conv1, bn1, layer1, layer2, layer3, layer4, fc]"
STAGE_ALL = ("trainer:\n  callbacks:\n    - class_path: callbacks.staged_unfreezing.StagedUnfreezing\n"
             "      init_args: {milestones: [1], stages: [[layer4, fc]]}\n")


@pytest.mark.parametrize("how", ["freeze", "stages"])
def test_nothing_trainable_in_the_first_epoch_is_one_line(how, untouched, data_dir, tmp_path):
    """The linear probe with its head frozen too, or stages that hold back what the model's freeze left: torch's
    "optimizer got an empty parameter list" was a traceback."""
    overlay = tmp_path / "stages.yaml"
    overlay.write_text(STAGE_ALL)
    args = (["--model.init_args.freeze", FREEZE_ALL] if how == "freeze" else ["--config", str(overlay)])
    result = run_cli("fit", "--config", "configs/emnist_resnet18_linear_probe.yaml", *args,
                     "--model.init_args.weights", "null", "--data.init_args.resize", "32",
                     "--data.init_args.data_dir", data_dir, "--data.init_args.download", "false",
                     "--trainer.accelerator", "cpu", "--log_dir", str(untouched[0]))
    assert_rejected(result, "nothing to train in the first epoch: every parameter is frozen", untouched)
    assert sorted(os.listdir(untouched[0])) == [os.path.basename(os.path.dirname(untouched[1]))]  # no run folder


ENTRY_POINTS = {
    "visual.shapes, missing config": (["-m", "visual.shapes", "--config", "nowhere.yaml"], "config nowhere.yaml"),
    "visual.shapes, bad option": (["-m", "visual.shapes", "--config", "configs/quickstart.yaml",
                                   "--data.init_args.resize", "0"], "data.init_args.resize=0 is out of range"),
    "visual.figures, missing checkpoint": (["-m", "visual.figures", "--ckpt", "none.ckpt"], "checkpoint none.ckpt"),
    "datamodules.download, data_dir under a file": (["-m", "datamodules.download", "mnist", "--data_dir",
                                                     "README.md/data"], "mnist not found in"),
    "report.py, no runs": (["report.py", "configs", "--out", "/nonexistent/report.md"], "no results.json"),
}


@pytest.mark.parametrize("case", ENTRY_POINTS)
def test_every_entry_point_has_the_boundary(case, untouched):
    args, pattern = ENTRY_POINTS[case]
    assert_rejected(forked.run(args), pattern, untouched)


# ---- numeric options: every one has a range, and every range is enforced at parse time ----

def range_of(annotation):
    """The errors.number_range type inside an annotation (Optional[...], list[...], tuple[...]), if any."""
    if isinstance(annotation, type) and issubclass(annotation, (int, float)) and hasattr(annotation, "check"):
        return annotation
    return next(filter(None, map(range_of, typing.get_args(annotation))), None)


def unranged_number(annotation) -> bool:
    return annotation in (int, float) or any(map(unranged_number, typing.get_args(annotation)))


SIGNATURES = {  # CLI prefix -> the classes whose __init__ options it sets
    "data.init_args": [ImageDataModule], "figures": [Figures],
    "model.init_args": [ClassificationModule, CNN, MLP, ScratchCNN, CLIPZeroShot],
}
NOT_RANGED = {"num_classes", "input_shape"}  # linked from the data


@pytest.mark.parametrize("cls", [ImageDataModule, EMNISTDataModule, ClassificationModule, CNN, MLP, ScratchCNN,
                                 ResNet18, CLIPZeroShot, Figures, StagedUnfreezing])
def test_every_numeric_option_has_a_range(cls):
    hints = typing.get_type_hints(cls.__init__)
    assert [name for name, hint in hints.items() if name not in NOT_RANGED and unranged_number(hint)] == []


def out_of_range(range_type):
    """Values just outside and far outside each end of the range."""
    integer = issubclass(range_type, int)
    numbers = st.integers if integer else partial(st.floats, allow_nan=False, allow_infinity=False)
    step = 1 if integer else 0
    sides = []
    if range_type.low is not None:
        sides.append(numbers(max_value=range_type.low - (0 if range_type.low_open else step),
                             **({} if integer else {"exclude_max": not range_type.low_open})))
    if range_type.high is not None:
        sides.append(numbers(min_value=range_type.high + (0 if range_type.high_open else step),
                             **({} if integer else {"exclude_min": not range_type.high_open})))
    return st.one_of(sides)


OPTIONS = [(prefix, cls, name, range_of(hint)) for prefix, classes in SIGNATURES.items() for cls in classes
           for name, hint in typing.get_type_hints(cls.__init__).items() if range_of(hint) is not None]
bad_values = st.sampled_from(OPTIONS).flatmap(lambda option: st.tuples(st.just(option), out_of_range(option[3])))


@pytest.fixture(scope="module")
def parser():
    return cli.run_cli([*QUICKSTART, "--trainer.logger", "false"], run=False).parser


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad_values)
def test_any_number_out_of_its_range_is_one_line_naming_option_value_and_range(parser, option_and_value):
    (prefix, cls, name, range_type), value = option_and_value
    model = ["--model", f"lightning_modules.{cls.__name__}"] if cls in (MLP, ScratchCNN, CLIPZeroShot) else []
    hint = typing.get_type_hints(cls.__init__)[name]
    container = {typing.get_origin(hint), *map(typing.get_origin, typing.get_args(hint))}
    given = f"[{value}, {value}]" if tuple in container else f"[{value}]" if list in container else value
    with pytest.raises(UserError) as raised:  # cli.main prints it as `error: ...` (exit 2); the API raises it
        parser.parse_args([*QUICKSTART, *model, f"--{prefix}.{name}={given}"])  # "-1e+16" alone looks like a flag
    (line,) = f"error: {raised.value}".splitlines()
    assert line.startswith(f"error: {prefix}.{name}=") and f"is out of range: expected {range_type.__doc__}" in line
    shown = line.split("=", 1)[1].split(" is out of range")[0].strip("[]").split(", ")
    assert float(value) in map(float, shown), line  # the value the user gave (resized_crop_scale shows both)


@pytest.mark.slow
@pytest.mark.parametrize("error, step", [("gpu_oom", 3), ("host_oom", 3), ("gpu_oom", 30)])
def test_out_of_memory_is_one_line_with_what_to_lower_and_how_to_go_on(error, step, tmp_path):
    # quickstart: 21 steps per epoch, so step 30 comes after the first epoch's checkpoints
    result = run_cli("fit", *QUICKSTART, "--log_dir", str(tmp_path), "--trainer.max_epochs", "2",
                     "--trainer.enable_progress_bar", "false", "--figures.enabled", "false", "--trainer.callbacks+",
                     "tests.fault_at.FaultAt", "--trainer.callbacks.rank", "0", "--trainer.callbacks.step", str(step),
                     "--trainer.callbacks.error", error)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    what = "the GPU" if error == "gpu_oom" else "the host"
    assert line.startswith(f"error: {what} ran out of memory (") and "lower --data.init_args.batch_size" in line
    assert ("bf16-mixed" in line) == (error == "gpu_oom")
    runs = glob.glob(str(tmp_path / "quickstart" / "*"))
    if step < 21:  # nothing to resume from: the run folder is removed
        assert line.endswith("then run the command again") and not runs
    else:
        (run,) = runs
        assert line.endswith(f"then resume: python cli.py fit --config {run}/config.yaml --ckpt_path "
                             f"{run}/checkpoints/last.ckpt")
