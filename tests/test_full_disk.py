"""A full or read-only log directory, with real fault injection: a small tmpfs (the tests run as root; skipped
where mounting is not permitted). A failed write is one line naming the folder, leaves no temporary file, keeps
every earlier checkpoint loadable, and the run resumes from its last good checkpoint once there is space."""
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from callbacks.checkpoint_io import SafeCheckpointIO
from callbacks.predictions import write_csv
from callbacks.results import ResultsFile
from errors import UserError
from tests.conftest import ROOT

QUIET = ["--trainer.enable_progress_bar", "false", "--figures.enabled", "false"]


@pytest.fixture()
def tmpfs(tmp_path):
    """mount(size_kb) -> a fresh tmpfs of that size; unmounted afterwards."""
    mounted = []

    def mount(size_kb: int, name: str = "disk") -> str:
        point = tmp_path / name
        point.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command on this machine")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here ({result.stderr.strip()}); needs root")
        mounted.append(point)
        return str(point)

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def remount(point: str, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", point], check=True, capture_output=True)


def fill(folder: str) -> None:
    """Writes a filler file until the file system reports ENOSPC."""
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:  # unbuffered: closing flushes nothing
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def checksums(folder: str) -> dict:
    return {path: hashlib.sha256(open(path, "rb").read()).hexdigest()
            for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(path)}


def leftovers(folder: str) -> list:
    return [p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if ".tmp" in os.path.basename(p)]


def run_cli(*args):
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_checkpoint_write_on_a_full_disk_keeps_the_earlier_one(tmpfs):
    disk = tmpfs(512)
    path = os.path.join(disk, "checkpoints", "last.ckpt")
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(1000.0)}}, path)
    fill(disk)
    with pytest.raises(UserError) as error:
        SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(100_000)}}, path)
    message = str(error.value)
    assert f"cannot write the checkpoint last.ckpt in {os.path.dirname(path)} (No space left on device)" in message
    assert f"--ckpt_path {path}" in message and "\n" not in message
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.arange(1000.0))
    assert leftovers(disk) == []


def test_checkpoint_write_on_a_read_only_disk(tmpfs):
    disk = tmpfs(512)
    remount(disk, "ro")
    with pytest.raises(UserError, match=rf"cannot write the checkpoint best.ckpt in {disk}/checkpoints "
                                        r"\(Read-only file system\)"):
        SafeCheckpointIO().save_checkpoint({"state_dict": {}}, os.path.join(disk, "checkpoints", "best.ckpt"))


def test_results_json_on_a_full_disk_keeps_the_earlier_one(tmpfs):
    disk = tmpfs(256)
    path = os.path.join(disk, "results.json")
    ResultsFile().write(path, experiment="first")
    before = open(path).read()
    fill(disk)
    with pytest.raises(UserError, match=rf"cannot write results.json in {disk} \(No space left on device\)"):
        ResultsFile().write(path, experiment="second", padding="x" * 100_000)
    assert open(path).read() == before and leftovers(disk) == []



def test_predictions_csv_on_a_full_disk_keeps_the_earlier_one(tmpfs):
    disk = tmpfs(256)
    path = os.path.join(disk, "predictions.csv")
    write_csv(path, [(0, 1, 1, 0.5)], ["a", "b"])
    before = open(path).read()
    fill(disk)
    with pytest.raises(UserError, match=rf"cannot write predictions.csv in {disk} \(No space left on device\)"):
        write_csv(path, [(i, 0, 1, 0.25) for i in range(50_000)], ["a", "b"])
    assert open(path).read() == before == "index,target,pred,prob,target_name,pred_name\n0,1,1,0.500000,b,b\n"
    assert leftovers(disk) == []


@pytest.mark.slow
def test_disk_fills_during_a_fit_then_the_run_resumes(tmpfs, tmp_path):
    """Another run shares the disk; the disk has room for the first epoch's checkpoint (last.ckpt is a hard link to
    it), not the second's."""
    other = run_cli("fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1",
                    "--log_dir", str(tmp_path / "logs"), *QUIET)
    assert other.returncode == 0, other.stderr[-2000:]
    other_dir = other.stdout.strip().splitlines()[-1].removeprefix("Run directory: ")
    size_kb = os.path.getsize(os.path.join(other_dir, "checkpoints", "last.ckpt")) // 1024 + 1
    used_kb = sum(os.path.getsize(p) // 4096 * 4 + 4 for p in checksums(other_dir)) + 8
    disk = tmpfs(used_kb + size_kb + size_kb // 2 + 64)  # + events, config.yaml, hparams.yaml
    logs = os.path.join(disk, "logs")
    shutil.copytree(other_dir, os.path.join(logs, "quickstart", "earlier"))
    earlier = checksums(os.path.join(logs, "quickstart", "earlier"))

    result = run_cli("fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "3",
                     "--checkpoint.save_top_k", "-1", "--log_dir", logs, *QUIET)  # a new file every epoch
    line = one_error_line(result)
    found = re.fullmatch(r"error: cannot write the checkpoint best-epoch01.ckpt in (\S+)/checkpoints "
                         r"\(No space left on device\); free space there or make it writable, then resume: "
                         r"python cli.py fit --config (\S+) --ckpt_path (\S+)", line)
    assert found, line
    run_dir, config, last = found.groups()
    assert config == f"{run_dir}/config.yaml" and last == f"{run_dir}/checkpoints/last.ckpt"
    assert leftovers(disk) == [] and checksums(os.path.join(logs, "quickstart", "earlier")) == earlier
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["best-epoch00.ckpt", "last.ckpt"]
    for name in ("best-epoch00.ckpt", "last.ckpt"):
        assert torch.load(os.path.join(run_dir, "checkpoints", name), weights_only=True)["epoch"] == 0
    assert os.path.samefile(os.path.join(run_dir, "checkpoints", "best-epoch00.ckpt"), last)  # written once

    remount(disk, "size=64m")  # space freed
    resumed = run_cli("fit", "--config", config, "--ckpt_path", last, "--trainer.enable_progress_bar", "false")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Restored all states from the checkpoint at {last}" in resumed.stderr
    assert os.path.isfile(os.path.join(resumed.stdout.strip().splitlines()[-1].removeprefix("Run directory: "),
                                       "results.json"))
    assert checksums(os.path.join(logs, "quickstart", "earlier")) == earlier


@pytest.mark.slow
def test_test_command_on_a_full_disk_is_one_line_and_leaves_nothing(tmpfs, tmp_path):
    """`cli.py test` into a log directory that is already full: TensorBoard's writer thread fails first."""
    earlier = run_cli("fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1",
                      "--log_dir", str(tmp_path / "logs"), *QUIET)
    assert earlier.returncode == 0, earlier.stderr[-2000:]
    run_dir = earlier.stdout.strip().splitlines()[-1].removeprefix("Run directory: ")
    before = checksums(run_dir)
    disk = tmpfs(256)
    fill(disk)
    result = run_cli("test", "--config", "configs/quickstart.yaml", "--ckpt_path",
                     os.path.join(run_dir, "checkpoints", "last.ckpt"), "--log_dir", os.path.join(disk, "logs"))
    line = one_error_line(result)
    assert re.search(rf"cannot write \S+ in {disk}/logs/quickstart/\S+ \(No space left on device\)", line), line
    assert os.listdir(os.path.join(disk, "logs")) == []  # the new run's folder is removed again, and its parent
    assert checksums(run_dir) == before
