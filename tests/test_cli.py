import csv
import glob
import json
import os
import re
import subprocess
import sys
import warnings

import pytest

import cli
from tests import forked
from tests.conftest import ROOT

EXPERIMENTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
ABLATIONS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "ablations", "*.yaml")))


def fixture_args(data_dir, log_dir):
    return ["--data.init_args.data_dir", data_dir, "--data.init_args.download", "false",
            "--data.init_args.val_size", "0.2", "--trainer.accelerator", "cpu", "--log_dir", str(log_dir)]


# what a config needs to run here, offline: no ImageNet weights, and 64 px keeps ResNet-18 fast on a CPU
OFFLINE_ARGS = {"resnet18": ["--model.init_args.weights", "null", "--data.init_args.resize", "64"]}
TEST_ONLY = ("clip",)  # zero-shot models refuse fit; tests/test_clip.py runs them under test


def offline_args(config: str) -> list[str]:
    return [arg for key, args in OFFLINE_ARGS.items() if key in config for arg in args]


def run_cli(*args, cwd=ROOT):
    """A fresh `python cli.py` (what the libraries print at import shows only in a fresh interpreter)."""
    return subprocess.run([sys.executable, "cli.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def forked_cli(*args):
    """`python cli.py` as a process of its own, forked from one that imported the libraries once."""
    return forked.run(["cli.py", *args])


@pytest.mark.parametrize("config", [c for c in EXPERIMENTS if not any(key in c for key in TEST_ONLY)])
def test_every_config_runs_fast_dev_run_on_fixtures(config, data_dir, tmp_path):
    cli.main(["fit", "--config", f"configs/{config}", "--trainer.fast_dev_run", "true",
              *fixture_args(data_dir, tmp_path), *offline_args(config)])
    assert not glob.glob(str(tmp_path / "*" / "*"))  # fast_dev_run leaves no run directory


@pytest.mark.parametrize("overlay", ABLATIONS)
def test_ablation_overlays_change_one_switch_and_run(overlay, data_dir, tmp_path):
    base = cli.main(["--config", "configs/cifar100_cnn.yaml", *fixture_args(data_dir, tmp_path)], run=False)
    ablated = cli.main(["--config", "configs/cifar100_cnn.yaml", "--config", f"configs/ablations/{overlay}",
                        "--trainer.fast_dev_run", "true", *fixture_args(data_dir, tmp_path)], run=False)
    changed = {k for k in base.model.hparams if base.model.hparams[k] != ablated.model.hparams[k]}
    assert len(changed) == 1, changed
    assert ablated.experiment_name == f"cifar100_cnn-{overlay[:-5]}"
    ablated.trainer.fit(ablated.model, datamodule=ablated.datamodule)


def test_print_config_works_for_every_config(capsys):
    # in this process (one import, not twenty); test_quickstart_end_to_end prints a config through `python cli.py`
    for config in EXPERIMENTS:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["fit", "--config", f"configs/{config}", "--print_config"])
        printed = capsys.readouterr()
        assert exit_.value.code in (0, None), printed.err
        assert "class_path: lightning_modules." in printed.out, config


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    result = run_cli("fit", "--config", "configs/quickstart.yaml", "--log_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    last_line = result.stdout.strip().splitlines()[-1]
    run_dir = last_line.removeprefix("Run directory: ")
    assert last_line.startswith("Run directory: ") and os.path.isdir(run_dir)
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "last.ckpt"))
    assert glob.glob(os.path.join(run_dir, "checkpoints", "best-*.ckpt"))
    again = run_cli("fit", "--config", os.path.join(run_dir, "config.yaml"), "--print_config")
    assert again.returncode == 0 and "experiment: quickstart" in again.stdout  # saved without a second validation
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert results["experiment"] == "quickstart" and results["dataset"] == "digits" and results["model"] == "CNN"
    assert set(results["test"]) == {"best", "last"}
    assert set(results["test"]["best"]) >= {"acc", "precision_macro", "recall_macro", "f1_macro", "loss"}
    assert results["test"]["best"]["acc"] >= 0.95
    assert results["params"]["total"] == results["params"]["trainable"] > 0
    assert results["efficiency"]["epochs"] > 0 and results["efficiency"]["fit_seconds"] > 0
    printed = [float(v) for v in re.findall(r"test/acc\s*│\s*([0-9.]+)", result.stdout)]
    if "holds the same step as the best" in result.stdout:  # one test pass scored both checkpoints
        assert printed == pytest.approx([results["test"]["best"]["acc"]]) and results["test"]["last"] == results["test"]["best"]
    else:
        assert printed == pytest.approx([results["test"]["best"]["acc"], results["test"]["last"]["acc"]], abs=1e-6)


def test_same_seed_gives_identical_metrics(tmp_path):
    metrics = []
    for _ in range(2):
        run = cli.main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "2",
                        "--log_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
        metrics.append(json.load(open(os.path.join(run.trainer.log_dir, "results.json")))["test"])
    assert metrics[0] == metrics[1]
    assert len(os.listdir(tmp_path / "quickstart")) == 2  # two distinct run directories


def test_a_fit_prints_no_deprecation_or_advertisement_from_the_libraries(tmp_path):
    # a fresh process, so no warning was shown once already: jsonargparse's skip_none deprecation (Lightning's
    # SaveConfigCallback passes it), torch's LeafSpec FutureWarning (Lightning's batch-size helper), Lightning's
    # litlogger tip and its note that our ModelSummary replaces its default
    result = run_cli("fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1",
                     "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
                     "--log_dir", str(tmp_path), "--trainer.enable_progress_bar", "false")
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    for chatter in ("skip_none", "LeafSpec", "litlogger", "already configured with model summary", "Warning"):
        assert chatter not in output, output
    config = open(glob.glob(str(tmp_path / "quickstart" / "*" / "config.yaml"))[0]).read()
    assert "ckpt_path: null" in config  # None values are still written (skip_none=False as skip_unset=False)


def test_testing_another_runs_checkpoint_gives_no_checkpoint_bookkeeping_warning(tmp_path):
    quick = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2", "--log_dir", str(tmp_path),
             "--trainer.enable_progress_bar", "false", "--figures.enabled", "false"]
    run = cli.main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1", *quick])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.main(["test", "--config", os.path.join(run.trainer.log_dir, "config.yaml"), *quick,
                  "--ckpt_path", run.trainer.checkpoint_callback.last_model_path])
    # Lightning: "The dirpath has changed from ... won't be reloaded", about top-k state a test never uses
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    assert not [f for f in warnings.filters if f[1] is not None and "dirpath" in f[1].pattern]  # scoped to the command


def test_a_command_leaves_the_warning_filters_as_it_found_them(tmp_path):
    """A notebook runs several commands and its own code between them: a filter of ours that outlived the command
    hid that code's warnings (Lightning's advice to sync a value, torch's LeafSpec deprecation)."""
    before = list(warnings.filters)
    cli.main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1", "--trainer.limit_train_batches",
              "2", "--trainer.limit_val_batches", "2", "--log_dir", str(tmp_path), "--trainer.enable_progress_bar",
              "false", "--figures.enabled", "false"])
    assert warnings.filters == before


def test_predict_and_validate_run_through_the_cli(tmp_path, capsys):
    for subcommand in ("validate", "predict"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = cli.main([subcommand, "--config", "configs/quickstart.yaml", "--log_dir", str(tmp_path),
                            "--trainer.enable_progress_bar", "false"])
        assert run.trainer.state.finished
        assert not [w for w in caught if "Couldn't infer the batch indices" in str(w.message)]  # we know them
    # predict: predictions.csv in its run folder, one row per test image (tests/test_ddp.py checks the values)
    path = os.path.join(run.trainer.log_dir, "predictions.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [int(row["index"]) for row in rows] == list(range(len(run.datamodule.splits["test"])))
    assert set(rows[0]) == {"index", "target", "pred", "prob", "target_name", "pred_name"}
    out = capsys.readouterr().out
    assert f"predictions of {len(rows):,} test images, accuracy " in out and path in out


def test_testing_untrained_weights_says_so_and_the_report_leaves_the_run_out(tmp_path):
    # cli.py test without --ckpt_path scored a random CNN into a results.json that report.py counted as a run
    fitted = forked_cli("fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1", "--log_dir",
                     str(tmp_path), "--trainer.enable_progress_bar", "false", "--figures.enabled", "false")
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    newest = max(glob.glob(str(tmp_path / "quickstart" / "*" / "checkpoints" / "*.ckpt")), key=os.path.getmtime)
    result = forked_cli("test", "--config", "configs/quickstart.yaml", "--log_dir", str(tmp_path),
                     "--trainer.enable_progress_bar", "false", "--figures.enabled", "false")
    assert result.returncode == 0, result.stderr[-2000:]
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning: no --ckpt_path")]
    assert warning == ("warning: no --ckpt_path: cli.py test scores the untrained (random) weights of CNN; to score a "
                       "fit, give --ckpt_path <run>/checkpoints/<best or last>.ckpt (the newest of this experiment: "
                       f"{newest})")
    tested = result.stdout.strip().splitlines()[-1].removeprefix("Run directory: ")
    assert json.load(open(os.path.join(tested, "results.json")))["untrained"] is True
    report = forked.run(["report.py", str(tmp_path), "--out", str(tmp_path / "report.md")])
    assert report.returncode == 0 and f"skipping {tested}/results.json: scores untrained weights" in report.stderr
    assert "read 1 runs" in report.stdout + report.stderr


def test_one_test_pass_when_last_ckpt_holds_the_best_step(tmp_path, capsys):
    # one epoch: the best checkpoint and last.ckpt hold the same step, so the last is not tested again
    run = cli.main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1",
                    "--log_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    assert out.count("Testing the ") == 1 and "Testing the best checkpoint" in out
    assert "holds the same step as the best" in out
    results = json.load(open(os.path.join(run.trainer.log_dir, "results.json")))
    assert results["test"]["last"] == results["test"]["best"]
    assert results["checkpoints"]["last"] == run.trainer.checkpoint_callback.last_model_path
    assert results["checkpoints"]["last"].endswith("last.ckpt") and results["checkpoints"]["best"] != ""
    assert os.path.isfile(os.path.join(run.trainer.log_dir, "confusion_matrix_last.png"))


def test_logger_false_still_writes_into_a_run_folder_not_the_working_directory(tmp_path, monkeypatch, capsys):
    # --trainer.logger false turns TensorBoard off; the run's files still go into log_dir/<experiment>/<version>/
    cwd, log_dir = tmp_path / "cwd", tmp_path / "logs"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cli.main(["fit", "--config", os.path.join(ROOT, "configs", "quickstart.yaml"), "--trainer.max_epochs", "1",
              "--trainer.logger", "false", "--log_dir", str(log_dir), "--trainer.enable_progress_bar", "false"])
    assert os.listdir(cwd) == []
    (run_dir,) = glob.glob(str(log_dir / "quickstart" / "*"))
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"Run directory: {run_dir}"
    for name in ("config.yaml", "results.json", os.path.join("checkpoints", "last.ckpt")):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert not glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))  # no logger, no TensorBoard events


@pytest.mark.parametrize("plugin, checkpoint_io", [
    ("lightning.pytorch.plugins.environments.LightningEnvironment", "SafeCheckpointIO"),  # another kind: ours added
    ("lightning.pytorch.plugins.io.TorchCheckpointIO", "TorchCheckpointIO"),  # the user's own CheckpointIO: kept
])
def test_users_own_plugins_keep_safe_checkpoint_writes(plugin, checkpoint_io, tmp_path):
    run = cli.run_cli(["--config", "configs/quickstart.yaml", "--log_dir", str(tmp_path),
                       "--trainer.plugins", f"[{{class_path: {plugin}}}]"], run=False)
    assert type(run.trainer.strategy.checkpoint_io).__name__ == checkpoint_io


def test_safe_plugins_under_slurm_keep_a_users_cluster_environment(monkeypatch):
    from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment

    from callbacks.checkpoint_io import SafeCheckpointIO
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    added = cli.with_safe_plugins(None)
    assert [type(p) for p in added] == [SafeCheckpointIO, SLURMEnvironment] and not added[1].auto_requeue
    own = LightningEnvironment()
    assert cli.with_safe_plugins(own)[0] is own and len(cli.with_safe_plugins([own])) == 2  # + SafeCheckpointIO
    monkeypatch.delenv("SLURM_JOB_ID")
    assert [type(p) for p in cli.with_safe_plugins([])] == [SafeCheckpointIO]


def test_last_ckpt_saved_at_the_best_step_is_the_best_file_under_another_name(tmp_path):
    # one epoch: one save point, so the top-k checkpoint and last.ckpt hold the same state, written once
    import torch

    run = cli.main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1", "--log_dir",
                    str(tmp_path), "--trainer.enable_progress_bar", "false", "--figures.enabled", "false"])
    callback = run.trainer.checkpoint_callback
    last, best = callback.last_model_path, callback.best_model_path
    assert last.endswith("last.ckpt") and best != last and os.path.samefile(last, best)
    loaded = torch.load(last, weights_only=True)
    assert loaded["global_step"] == run.trainer.global_step
    assert all(torch.equal(value, run.model.state_dict()[key]) for key, value in loaded["state_dict"].items())
    assert not glob.glob(os.path.join(os.path.dirname(last), ".*tmp*"))  # no temporary name left behind


def test_a_linked_last_ckpt_outlives_a_rewrite_or_removal_of_the_best_and_copies_without_hard_links(tmp_path,
                                                                                                     monkeypatch):
    import torch

    from callbacks.checkpoint_io import SafeCheckpointIO

    io = SafeCheckpointIO()
    best, last = str(tmp_path / "best.ckpt"), str(tmp_path / "last.ckpt")
    io.save_checkpoint({"step": 1}, best)
    io.link_checkpoint(best, last)
    assert os.path.samefile(best, last)
    io.save_checkpoint({"step": 2}, best)  # a later save replaces the file under that name only
    assert torch.load(last)["step"] == 1 and torch.load(best)["step"] == 2
    os.remove(best)  # the old best rotated out
    assert torch.load(last)["step"] == 1

    def no_hard_links(*args):
        raise OSError(1, "Operation not permitted")

    io.save_checkpoint({"step": 3}, best)
    monkeypatch.setattr(os, "link", no_hard_links)
    io.link_checkpoint(best, last)  # a file system without hard links: a copy, swapped in by a rename
    assert not os.path.samefile(best, last) and torch.load(last)["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["best.ckpt", "last.ckpt"]


QUIET = ["--trainer.enable_progress_bar", "false", "--figures.enabled", "false"]
# Lightning's debugging and budget options, each of which once ended in a traceback or a one-line refusal:
# option -> the checkpoints tested after the fit
LIGHTNING_OPTIONS = {
    "overfit_batches": (["--trainer.overfit_batches", "2"], {"best", "last"}),  # "cannot inject ... BatchLoader"
    "no validation": (["--trainer.limit_val_batches", "0"], {"last"}),  # EarlyStopping: val/loss not available
    "max_steps within the first epoch": (["--trainer.max_steps", "3", "--trainer.max_epochs", "-1"], {"last"}),
    "no checkpoints": (["--trainer.enable_checkpointing", "false"], {"final"}),  # "found ModelCheckpoint"
}


@pytest.mark.slow
@pytest.mark.parametrize("case", LIGHTNING_OPTIONS)
def test_lightning_options_fit_and_test_to_a_results_file(case, tmp_path):
    args, tested = LIGHTNING_OPTIONS[case]
    result = forked_cli("fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "2", "--log_dir",
                     str(tmp_path), *QUIET, *args)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "quickstart" / "*"))
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert set(results["test"]) == tested and results["test"][tested.pop()]["acc"] > 0.1
    if case == "no checkpoints":
        assert not os.path.exists(os.path.join(run_dir, "checkpoints")) and "checkpoints" not in results


def test_overfit_batches_trains_on_the_same_first_batches_every_epoch(tmp_path):
    import lightning.pytorch as pl

    class Batches(pl.Callback):
        seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append((trainer.current_epoch, batch[1].tolist()))

    run = cli.main(["--config", "configs/quickstart.yaml", "--trainer.max_epochs", "3", "--log_dir", str(tmp_path),
                    "--trainer.overfit_batches", "2", *QUIET], run=False)
    run.trainer.callbacks.append(Batches())
    run.trainer.fit(run.model, datamodule=run.datamodule)
    epochs = [sum((b for e, b in Batches.seen if e == epoch), []) for epoch in range(3)]
    assert epochs[0] == epochs[1] == epochs[2]  # the training split's first two batches, in order
    assert epochs[0] == run.datamodule.splits["train"].labels[:2 * run.datamodule.batch_size].tolist()


@pytest.mark.parametrize("section", ["checkpoint", "early_stopping"])
@pytest.mark.parametrize("monitor, given, mode", [("val/loss", None, "min"), ("val/acc", None, "max"),
                                                  ("val/f1_macro", None, "max"), ("train/loss", None, "min"),
                                                  ("val/acc", "min", "min"), ("val/loss", "max", "max")])
def test_mode_auto_follows_the_monitored_metric_unless_given(section, monitor, given, mode, tmp_path):
    args = [f"--{section}.monitor", monitor, *([f"--{section}.mode", given] if given else [])]
    run = cli.main(["--config", "configs/quickstart.yaml", "--log_dir", str(tmp_path), *args], run=False)
    from callbacks.checkpoints import BestAndLastCheckpoint
    from callbacks.early_stopping import StayingEarlyStopping

    kind = BestAndLastCheckpoint if section == "checkpoint" else StayingEarlyStopping
    (callback,) = [c for c in run.trainer.callbacks if isinstance(c, kind)]
    assert (callback.monitor, callback.mode) == (monitor, mode)
