"""sweep.py here: the sweep files, one-line errors, the dry run, a failed point, and an interrupted sweep resumed
to the results of an uninterrupted one; report.py --sweep on a 2-setting x 2-seed sweep."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import report
import sweep
from errors import UserError
from tests.conftest import ROOT

# quickstart on the bundled digits, shrunk: 3 epochs of 40 batches of 8 images, so a SIGTERM finds it training
TINY = ["--figures.enabled", "false", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--data.init_args.batch_size", "8", "--trainer.max_epochs", "3",
        "--trainer.limit_train_batches", "40", "--trainer.limit_val_batches", "5", "--trainer.limit_test_batches", "5"]


def write_sweep(folder: Path, **spec) -> str:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": "configs/quickstart.yaml", **spec}))
    return str(path)


def run_sweep(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sweep.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, **kwargs)


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "sweeps"))))
def test_shipped_sweep_files_expand(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    points = sweep.load_sweep(f"sweeps/{name}")
    assert len({p.run_dir for p in points}) == len(points)
    if name == "cifar100_assignment.yaml":  # MLP, CNN, 4 ablations x 3 seeds; CLIP (deterministic) once
        assert len(points) == 6 * 3 + 1 and points[-1].subcommand == "test"
        overlays = {p.configs[1] for p in points if len(p.configs) == 2}
        assert overlays == {f"configs/ablations/{n}" for n in os.listdir(os.path.join(ROOT, "configs", "ablations"))}
    if name == "resnet_freeze.yaml":
        assert [p.variant for p in points] == ["freeze_none", "freeze_conv1_bn1", "freeze_layer1", "freeze_layer1-2",
                                               "freeze_layer1-3", "freeze_layer1-4"]
    if name == "lr_width.yaml":
        assert len(points) == 27
        assert str(points[0].run_dir) == "logs/quickstart-lr=0.001_width_multiplier=0.5/lr_width-seed0"


@pytest.mark.parametrize("spec,message", [
    ({"grid": {"model.init_args.lr": []}}, "grid key model.init_args.lr must be a non-empty list"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"base": "configs/nope.yaml"}, "config configs/nope.yaml does not exist"),
    ({"overlay": ["configs/ablations/narrow.yaml"]}, "unknown key 'overlay'"),
    ({"overlays": [None, "configs/quickstart.yaml"]}, "share the run folder"),
    ({"grid": {"seed_everything": [1, 2]}}, "grid key seed_everything cannot vary: list the seeds under seeds:"),
    ({"grid": {"log_dir": ["a", "b"]}}, "grid key log_dir cannot vary"),
    ({"grid": {"experiment": ["a", "b"]}}, "grid key experiment cannot vary"),
    ({"grid": {"variant": ["a", "b"]}}, "grid key variant cannot vary"),
    ({"args": ["--seed_everything", "3"]}, "args cannot set --seed_everything"),
    ({"args": ["--run_version=x"]}, "args cannot set --run_version"),
    ({"args": ["--config", "configs/nope.yaml"]}, "config configs/nope.yaml does not exist"),
])
def test_bad_sweep_file_is_one_line(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError, match=message):
        sweep.load_sweep(write_sweep(tmp_path, **spec))


@pytest.mark.parametrize("args", [
    ["--config", "configs/ablations/narrow.yaml"],
    ["--config=configs/ablations/narrow.yaml", "--variant", "mine", "--trainer.max_epochs", "1"],
    ["--experiment", "other", "--config", "configs/ablations/narrow.yaml", "--log_dir=elsewhere"],
    ["--config", "configs/ablations/narrow.yaml", "--experiment=other", "--trainer.enable_progress_bar", "false"],
])
def test_a_point_s_run_folder_is_where_cli_py_puts_it(tmp_path, monkeypatch, capsys, args):
    """experiment, variant and log_dir as cli.py's parser resolves them, a --config in args included."""
    import cli

    monkeypatch.chdir(ROOT)
    point = sweep.load_sweep(write_sweep(tmp_path, args=args, grid={"model.init_args.lr": [0.1, 0.2]}))[1]
    with pytest.raises(SystemExit):
        cli.main([*point.cli_args(), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert point.run_dir == Path(config["log_dir"]) / f"{config['experiment']}-{config['variant']}" / "tiny-seed0"
    assert config["variant"].endswith("lr=0.2") and config["run_version"] == "tiny-seed0"


def test_unknown_grid_key_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = write_sweep(tmp_path, grid={"model.init_args.widht": [1, 2]}, args=["--log_dir", str(tmp_path / "logs")])
    with pytest.raises(SystemExit) as exit_:
        sweep.main([path])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "widht" in err and err.startswith("error: ")
    assert not (tmp_path / "logs").exists()


def test_dry_run_prints_one_line_per_point_and_nothing_else(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = write_sweep(tmp_path, grid={"model.init_args.lr": [0.01, 0.003]}, seeds=[0, 1],
                       args=["--log_dir", str(tmp_path / "logs")])
    assert sweep.main([path, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(" new " in line for line in lines)
    assert f"{tmp_path}/logs/quickstart-lr=0.003/tiny-seed1" in lines[3] and "--seed_everything 1" in lines[3]
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("template", sorted(n for n in os.listdir(os.path.join(ROOT, "slurm")) if ".sbatch" in n))
@pytest.mark.parametrize("restart", [0, 1])
def test_every_template_runs_a_sweep_point_as_its_array_task(template, restart, tmp_path):
    (tmp_path / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')  # prints the command it would start
    (tmp_path / "srun").chmod(0o755)
    line = ["test", "--config", "configs/cifar100_clip.yaml", "--model.init_args.templates", "a photo of a {}.",
            "--run_version", "s-seed0", "--ckpt_path", "x.ckpt"]
    (tmp_path / "points").write_text("fit --config configs/quickstart.yaml\n" + shlex.join(line) + "\n")
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "SWEEP_POINTS": str(tmp_path / "points"),
           "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "7", "SLURM_JOB_ID": "8", "SLURM_JOB_NODELIST": "node",
           "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_RESTART_COUNT": str(restart)}
    result = subprocess.run(["bash", f"slurm/{template}"], cwd=ROOT, env=env, capture_output=True, text=True)
    words = result.stdout.splitlines()[1:]  # after common.sh's line naming the job
    assert result.returncode == 0 and words[:3] == ["python", "cli.py", "test"], result.stderr
    configs = [words[i + 1] for i, word in enumerate(words) if word == "--config"]
    assert configs[-1] == "configs/cifar100_clip.yaml" and "a photo of a {}." in words
    assert ("--ckpt_path" in words) == (restart == 0)  # a requeued task resumes from its hpc_ckpt_N.ckpt


def metrics(folder: Path) -> dict:
    return {str(path.relative_to(folder)): json.loads(path.read_text())["test"]
            for path in sorted(folder.rglob("results.json"))}


@pytest.mark.slow
def test_interrupted_sweep_resumes_to_the_results_of_an_uninterrupted_one(tmp_path):
    grid = {"model.init_args.lr": [0.003, 0.01, 0.03]}
    for name in ("reference", "interrupted"):
        (tmp_path / name).mkdir()
    reference, interrupted = (write_sweep(tmp_path / name, grid=grid, args=[*TINY, "--log_dir", str(tmp_path / name)])
                              for name in ("reference", "interrupted"))
    assert run_sweep(reference).returncode == 0

    points = sweep.load_sweep(interrupted)
    process = subprocess.Popen([sys.executable, "sweep.py", interrupted], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    second = points[1].run_dir / "checkpoints"
    deadline = time.time() + 600
    while not points[0].run_dir.is_dir():  # running its first point
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.1)
    # the same sweep started again meanwhile: it took the points the first had not reached
    twice = run_sweep(interrupted)
    assert twice.returncode == 2 and twice.stderr.strip().splitlines()[-1].startswith(
        f"error: sweep tiny is already running here (pid {process.pid}); wait for it or stop it"), twice.stderr[-3000:]
    while not (second.is_dir() and any(second.glob("best-*.ckpt"))):  # point 1 has finished its first epoch
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=300)[1]
    assert process.returncode == 130, err[-3000:]
    assert f"run python sweep.py {interrupted} again to continue" in err.splitlines()[-1]
    assert [p.state() for p in points] == ["finished", "resumable", "new"], err[-3000:]

    again = run_sweep(interrupted)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 points, 1 finished, 2 to run" in again.stderr
    assert f"Restoring states from the checkpoint path at {points[1].run_dir}/checkpoints/last.ckpt" in again.stderr
    assert metrics(tmp_path / "interrupted") == metrics(tmp_path / "reference")
    assert len(metrics(tmp_path / "reference")) == 3


@pytest.mark.slow
def test_failed_point_is_named_and_the_others_still_run(tmp_path):
    # a budget of 10 parameters passes the parser (it is a valid number) and fails when the model is built
    path = write_sweep(tmp_path, grid={"model.init_args.max_params": [10, 10_000_000]},
                       args=[*TINY, "--trainer.max_epochs", "1", "--log_dir", str(tmp_path / "logs")])
    result = run_sweep(path)
    assert result.returncode == 1
    assert (tmp_path / "logs" / "quickstart-max_params=10000000" / "tiny-seed0" / "results.json").is_file()
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and "quickstart-max_params=10" in failed[0] and "over the budget" in failed[0]


def write_results(run_dir: Path, acc: float, seed: int, variant: str) -> None:
    run_dir.mkdir(parents=True)
    metrics = {"acc": acc, "f1_macro": acc - 0.1, "loss": 1.0}
    (run_dir / "results.json").write_text(json.dumps({
        "experiment": f"quickstart-{variant}", "base_experiment": "quickstart", "variant": variant, "model": "CNN",
        "dataset": "digits", "seed": seed, "run_dir": str(run_dir), "params": {"total": 10, "trainable": 10},
        "test": {"best": metrics, "last": metrics}, "finished_at": "2026-12-01T03:00:00"}))


def test_report_of_a_two_point_two_seed_sweep_pools_seeds_and_names_the_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = write_sweep(tmp_path, grid={"model.init_args.width_multiplier": [0.5, 2.0]}, seeds=[0, 1],
                       args=["--log_dir", str(tmp_path / "logs")])
    points = sweep.load_sweep(path)
    for point, acc in zip(points[:3], (0.80, 0.90, 0.95)):  # the last point (width 2.0, seed 1) never ran
        write_results(point.run_dir, acc, point.seed, point.variant)
    write_results(tmp_path / "logs" / "other" / "x", 0.5, 0, "other")  # not in the sweep: not reported
    out = tmp_path / "report.md"
    assert report.main(["--sweep", path, "--out", str(out)]) == 0
    text, err = out.read_text(), capsys.readouterr().err
    assert "| quickstart | 0.5 | 0, 1 | 85.00 ± 7.07% (n=2) | 75.00 ± 7.07% (n=2) | — |" in text
    assert "| quickstart | 2.0 | 0 | 95.00% | 85.00% | 1 |" in text
    assert "other" not in text
    assert f"missing: point 3 {points[3].run_dir} (new)" in err and "1 of 4 points missing" in err
