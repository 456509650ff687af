"""api.py in-process: overrides spelled like the CLI, a Run from fit/test on generated data, errors as exceptions."""
import json
import os

import pytest
import torch
from matplotlib.figure import Figure

import api
from errors import CommandInterrupted, UserError


@pytest.fixture(autouse=True)
def no_forced_overrides():
    yield
    api.set_overrides()  # a test that forces overrides must not leak them into the next


def generated(data_dir, log_dir) -> dict:
    """The generated Fashion-MNIST files, one short epoch, no progress bar."""
    return {"data.init_args.data_dir": data_dir, "data.init_args.download": False, "data.init_args.val_size": 0.2,
            "trainer.accelerator": "cpu", "trainer.max_epochs": 1, "trainer.enable_progress_bar": False,
            "log_dir": str(log_dir)}


def test_overrides_are_spelled_like_the_command_line():
    args = api.command_line("fit", ["configs/quickstart.yaml", "configs/ablations/narrow.yaml"],
                            {"trainer.max_epochs": 5, "model.init_args.channels": [8, 16], "variant": None,
                             "trainer.enable_progress_bar": False, "checkpoint.filename": "x"})
    assert args == ["fit", "--config", "configs/quickstart.yaml", "--config", "configs/ablations/narrow.yaml",
                    "--trainer.max_epochs", "5", "--model.init_args.channels", "[8, 16]", "--variant", "null",
                    "--trainer.enable_progress_bar", "false", "--checkpoint.filename", "x"]


def test_forced_overrides_come_last_and_clear():
    api.set_overrides(**{"trainer.max_epochs": 1})
    assert api.command_line("test", ["a.yaml"], {"trainer.max_epochs": 9})[-2:] == ["--trainer.max_epochs", "1"]
    api.set_overrides()
    assert api.command_line("test", ["a.yaml"], {}) == ["test", "--config", "a.yaml"]


@pytest.mark.slow
def test_fit_returns_the_run_and_test_reuses_its_checkpoint(data_dir, tmp_path, capsys):
    run = api.fit("configs/fashion_mnist_cnn.yaml", **generated(data_dir, tmp_path))
    assert run.run_dir.parent == tmp_path / "fashion_mnist_cnn"
    assert run.results == json.loads((run.run_dir / "results.json").read_text())
    assert set(run.checkpoints) == {"best", "last"} and all(os.path.isfile(p) for p in run.checkpoints.values())
    assert 0 <= run.accuracy("best") <= 1 and run.accuracy("final") is None
    assert {"curves", "confusion_matrix", "predictions", "feature_maps"} <= set(run.figures)
    assert isinstance(run.curves(), Figure)
    capsys.readouterr()
    run.show("curves")  # outside Jupyter: the path
    assert capsys.readouterr().out.strip() == str(run.figures["curves"])

    tested = api.test(run.run_dir / "config.yaml", ckpt_path=run.checkpoints["best"], log_dir=str(tmp_path / "t"))
    assert tested.results["test"]["final"]["acc"] == pytest.approx(run.accuracy("best"))
    assert api.Run.load(tested.run_dir) == tested
    best = os.path.abspath(run.checkpoints["best"])  # the checkpoint it scored, not the fit's restored best/last
    assert tested.results["tested_checkpoint"] == best and tested.checkpoints == {"tested": best}

    predicted = api.predict(run.run_dir / "config.yaml", ckpt_path=run.checkpoints["best"],
                            log_dir=str(tmp_path / "p"))
    rows = predicted.predictions()
    assert [row["index"] for row in rows] == list(range(len(rows))) and rows
    assert sum(row["pred"] == row["target"] for row in rows) / len(rows) == pytest.approx(run.accuracy("best"))
    assert all(0 < row["prob"] <= 1 and row["pred_name"] for row in rows)
    with pytest.raises(UserError, match="no predictions.csv in"):
        run.predictions()

    markdown = api.report([run, tested])
    assert isinstance(markdown, str) and markdown._repr_markdown_() == markdown
    assert "fashion_mnist_cnn" in markdown and "| fashion_mnist |" in markdown
    assert api.report(tmp_path) == api.report([run, tested])  # a folder: every results.json under it
    assert api.report([run, tested]) == api.report(run)  # the re-test of run's checkpoint is not another run


def test_an_interrupted_fit_says_how_to_resume_with_the_api_and_that_call_resumes(tmp_path):
    # a notebook's Kernel > Interrupt is a SIGINT to the kernel, here to this process at the fit's second step
    quick = {"trainer.max_epochs": 2, "trainer.limit_train_batches": 4, "trainer.limit_val_batches": 2,
             "trainer.enable_progress_bar": False, "figures.enabled": False, "log_dir": str(tmp_path)}
    with pytest.raises(CommandInterrupted) as stopped:
        api.fit("configs/quickstart.yaml", **quick, **{"trainer.callbacks+": "tests.signal_at.SignalAt",
                                                       "trainer.callbacks.moment": "training"})
    (run,) = (tmp_path / "quickstart").iterdir()
    config, last = str(run / "config.yaml"), str(run / "checkpoints" / "last.ckpt")
    assert str(stopped.value) == (f"interrupted by SIGINT: saved {last}; resume with "
                                  f"api.fit({config!r}, ckpt_path={last!r})")
    resumed = api.fit(config, ckpt_path=last)  # the line's call, as it stands
    assert resumed.run_dir == run and resumed.results["efficiency"]["epochs"] == 2  # the run goes on in its folder
    assert torch.get_float32_matmul_precision() == "highest"  # the commands' TF32 setting ends with them


def test_forced_smoke_overrides_switch_the_data(tmp_path):
    """What a notebook's smoke cell does: the bundled digits instead of a dataset that is not on disk."""
    api.set_overrides(log_dir=str(tmp_path), **{"data": "datamodules.DigitsDataModule", "data.init_args.resize": 28,
                                                "data.init_args.val_size": 0.1, "trainer.fast_dev_run": True,
                                                "trainer.enable_progress_bar": False})
    run = api.fit("configs/fashion_mnist_mlp.yaml", **{"data.init_args.data_dir": str(tmp_path / "none")})
    assert run.results == {} and not run.run_dir.exists()  # fast_dev_run leaves no run directory


@pytest.mark.parametrize("configs, overrides, message", [
    (["configs/quickstart.yaml"], {"model.init_args.no_such_option": 1}, "no_such_option"),
    (["configs/quickstart.yaml"], {"trainer.max_epochs": 0}, "trainer.max_epochs=0 is out of range"),
    (["configs/no_such_config.yaml"], {}, "no_such_config.yaml"),
    (["configs/fashion_mnist_cnn.yaml"], {"data.init_args.download": False}, "python -m datamodules.download"),
])
def test_mistakes_raise_one_line_user_errors_and_leave_nothing(configs, overrides, message, tmp_path):
    with pytest.raises(UserError) as error:  # never SystemExit: a kernel's cell must survive it
        api.fit(*configs, **{"log_dir": str(tmp_path), "data.init_args.data_dir": str(tmp_path / "data"),
                             "trainer.enable_progress_bar": False, **overrides})
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not list(tmp_path.glob("*/*")), "a failed command left a run directory"


def test_report_and_run_mistakes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no results.json under"):
        api.report(tmp_path)
    with pytest.raises(UserError, match="unknown layout"):
        api.report(tmp_path, layout="cifar1000")
    with pytest.raises(UserError, match="does not exist"):
        api.Run.load(tmp_path / "missing")
    with pytest.raises(UserError, match="no figure curves"):
        api.Run(tmp_path).show("curves")


def test_wrapped_user_errors_are_unwrapped_and_interrupts_pass_through(monkeypatch):
    import cli
    from errors import CommandInterrupted

    def wrapped(args, **_):  # what jsonargparse does to an error raised in a class's __init__
        try:
            raise UserError("data.split: unknown EMNIST split; choose one of byclass, ...")
        except UserError as error:
            raise ValueError("Problem with given class_path") from error

    monkeypatch.setattr(cli, "run_cli", wrapped)
    with pytest.raises(UserError, match="^data.split: unknown EMNIST split; choose one of byclass, ...$"):
        api.fit("configs/quickstart.yaml")

    def interrupted(args, **_):
        raise CommandInterrupted("interrupted: stopped at a safe point")

    monkeypatch.setattr(cli, "run_cli", interrupted)
    with pytest.raises(CommandInterrupted):  # the kernel's stop button: a checkpoint was saved, the cell ends
        api.fit("configs/quickstart.yaml")
