"""python sweep.py --slurm against the one-node SLURM cluster of tests/test_slurm.py: one job array, a task per
unfinished point, each in the point's own run folder; a resubmission submits only what is unfinished.

Run it under the cluster lock: flock /tmp/slurm-tests.lock timeout 1500 python -m pytest tests/test_sweep_slurm.py
"""
import json
import subprocess
import sys

import pytest
import yaml

from tests.test_slurm import CPU, RESOURCES, checkout, output, slurm  # noqa: F401  (fixtures)
from tests.test_clip import tiny_clip  # noqa: F401  (checkout's fixture)

TINY = [*CPU, "--figures.enabled", "false", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"]


def submit(slurm, checkout, *args: str) -> subprocess.CompletedProcess:  # noqa: F811
    submit_dir, job_env = checkout
    return subprocess.run([sys.executable, "sweep.py", "sweep.yaml", "--slurm", "slurm/fit.sbatch",
                           "--sbatch-options", " ".join(RESOURCES), *args], cwd=submit_dir,
                          env={**slurm.env, **job_env}, capture_output=True, text=True, timeout=300)


@pytest.mark.slurm
def test_sweep_as_a_job_array_and_a_resubmission_of_the_unfinished_point(slurm, checkout):  # noqa: F811
    submit_dir = checkout[0]
    (submit_dir / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "base": "configs/quickstart.yaml", "grid": {"model.init_args.lr": [0.003, 0.01]},
        "args": TINY}))
    first = submit(slurm, checkout, "--max-parallel", "2")
    assert first.returncode == 0, first.stderr
    job = first.stdout.strip()
    records = slurm.wait(job)
    outputs = [output(checkout, "fit", f"{job}_{i}") for i in range(2)]
    assert sorted((r["ArrayTaskId"], r["JobState"], r["ExitCode"]) for r in records) == [
        ("0", "COMPLETED", "0:0"), ("1", "COMPLETED", "0:0")], outputs
    runs = [submit_dir / "logs" / f"quickstart-lr={lr}" / "tiny-seed0" for lr in ("0.003", "0.01")]
    for run, out in zip(runs, outputs):
        results = json.load(open(run / "results.json"))  # the point's folder, not the array job's id
        assert set(results["test"]) == {"best", "last"} and results["variant"] == run.parent.name.split("-", 1)[1]
        assert "Traceback" not in out

    (runs[1] / "results.json").unlink()  # as if task 1 had been stopped after its last checkpoint
    second = submit(slurm, checkout)
    assert second.returncode == 0, second.stderr
    resubmitted = second.stdout.strip()
    records = slurm.wait(resubmitted)
    assert [(r["ArrayTaskId"], r["JobState"]) for r in records] == [("1", "COMPLETED")]
    out = output(checkout, "fit", f"{resubmitted}_1")
    resumed = "Restoring states from the checkpoint path at logs/quickstart-lr=0.01/tiny-seed0/checkpoints/last.ckpt"
    assert resumed in out and "Traceback" not in out, out[-3000:]
    assert (runs[1] / "results.json").is_file()

    third = submit(slurm, checkout)
    assert third.returncode == 0 and third.stdout == "" and "nothing to submit" in third.stderr
