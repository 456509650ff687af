"""The sbatch templates in slurm/ against a real one-node SLURM cluster that these tests start and stop.

Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge (`.ci/run` installs them);
without them every SLURM test is skipped. Jobs run on CPU with the tiny fixture data, from a temporary
checkout (symlinks to this repository) so run folders and job output stay out of the real logs/.
"""
import glob
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.conftest import ROOT
from tests.test_clip import tiny_clip  # noqa: F401  (a fixture: the CLIP the fake $HF_HOME cache holds)

TEMPLATES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "slurm", "*.sbatch")))
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # daemons live in sbin
RESOURCES = ["--partition=debug", "--cpus-per-task=1", "--mem=2G"]  # the test node: 2 CPUs, 2 fake GPUs
CPU = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.init_args.download", "false"]
TINY = [*CPU, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1"]
# the CIFAR fixtures need conftest's md5 bypass, which jobs do not get: their configs run on MNIST's fixture
CIFAR_AS_MNIST = ["--data", "datamodules.MNISTDataModule", "--data.init_args.val_size", "0.2",
                  "--data.init_args.channels", "3", "--data.init_args.resize", "null"]
NO_FIGURES = ["--figures.enabled", "false"]
DDP_HERE = ["--nodes=1", "--ntasks-per-node=2", "--gres=gpu:2"]  # multinode_ddp.sbatch on the one test node
# template -> (arguments, extra sbatch options, extra environment)
SUBMISSIONS = {
    "multinode_ddp.sbatch": (["configs/quickstart.yaml", *TINY], DDP_HERE, {}),
    "fit.sbatch": (["configs/mnist_cnn.yaml", *TINY], [], {"STAGE_DATA": "1"}),
    "resnet_emnist.sbatch": ([*TINY, *NO_FIGURES, "--data.init_args.resize", "null"], [], {}),
    "clip_eval.sbatch": ([*TINY, *NO_FIGURES, *CIFAR_AS_MNIST], [], {}),
}
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def header(template: str) -> dict[str, str]:
    lines = open(os.path.join(ROOT, "slurm", template)).read().splitlines()
    options = [line.split()[1] for line in lines if line.startswith("#SBATCH ")]
    return dict(option.lstrip("-").partition("=")[::2] for option in options)


def subcommand(template: str) -> str:
    """The template's own subcommand: `srun python cli.py "${SUBCOMMAND:-fit}" ...` (a sweep point sets it)."""
    text = open(os.path.join(ROOT, "slurm", template)).read()
    return re.search(r'srun python cli.py "\$\{SUBCOMMAND:-(\w+)\}"', text)[1]


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_header(template):
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "slurm", template)]).returncode == 0
    options, text = header(template), open(os.path.join(ROOT, "slurm", template)).read()
    assert options["signal"] == "SIGUSR1@90" and "requeue" in options and options["open-mode"] == "append"
    assert "source slurm/common.sh" in text and "srun python cli.py " in text
    assert options["output"] == "logs/slurm/%x-%j.out" and "array" not in options  # arrays: python sweep.py --slurm
    assert subcommand(template) in ("fit", "test")  # a sweep point sets $SUBCOMMAND (tests/test_sweep_slurm.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(pid_file: str) -> None:
    try:
        pid = int(open(pid_file).read())
        for signum in (15, 15, 9):  # 10 s to stop, then SIGKILL
            os.kill(pid, signum)
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
    except (OSError, ValueError):
        pass  # gone


class Cluster:
    """A running one-node cluster: slurm.conf in `root`, commands run with SLURM_CONF pointing there."""

    def __init__(self, root: str):
        self.root, self.conf = root, os.path.join(root, "slurm.conf")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env.update(SLURM_CONF=self.conf, PATH=os.path.dirname(sys.executable) + os.pathsep + SEARCH_PATH)

    def run(self, *command: str, cwd=None, env=None) -> str:
        result = subprocess.run(command, cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result.stdout

    def start_now(self, job: str) -> None:
        """Skips a requeued job's start delay; the job may have started meanwhile (a race, not a failure)."""
        result = subprocess.run(("scontrol", "update", f"JobId={job}", "StartTime=now"), env=self.env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 or "no longer pending" in result.stderr, result.stderr

    def jobs(self, job: str) -> list[dict[str, str]]:
        """scontrol's records of a job (one per array task once the tasks have started)."""
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in self.run("scontrol", "-o", "show", "job", job)
                .splitlines() if line.strip()]

    def wait(self, job: str, timeout: float = 600, until=lambda r: r["JobState"] in FINISHED) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            records = self.jobs(job)
            if records and all(until(r) for r in records) and not any("-" in r.get("ArrayTaskId", "") for r in
                                                                       records):
                return records
            time.sleep(1)
        raise AssertionError(f"job {job} not done in {timeout} s: {self.jobs(job)}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    missing = [name for name in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(name, path=SEARCH_PATH)]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
                    "slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("starting munged, slurmctld and slurmd needs root")
    root = str(tmp_path_factory.mktemp("slurm"))  # mode 0700: munged accepts its key and socket here
    cluster = Cluster(root)
    # a private munged (own key and socket, named in slurm.conf's AuthInfo): nothing in /etc/munge or /run/munge
    # changes, and a system munged or another test session's cluster is never touched
    with open(f"{root}/munge.key", "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(f"{root}/munge.key", 0o400)
    host = subprocess.check_output(["hostname", "-s"], text=True).strip()
    for i in range(2):
        open(os.path.join(root, f"gpu{i}"), "w").close()  # fake GPU device files: headers ask for --gres=gpu
    with open(os.path.join(root, "gres.conf"), "w") as f:
        f.write(f"NodeName={host} Name=gpu File={root}/gpu[0-1]\n")
    settings = {
        "ClusterName": "pytest", "SlurmctldHost": f"{host}(127.0.0.1)", "SlurmUser": "root",
        "SlurmctldPort": _free_port(), "SlurmdPort": _free_port(), "AuthType": "auth/munge",
        "StateSaveLocation": f"{root}/state", "SlurmdSpoolDir": f"{root}/spool",
        "SlurmctldPidFile": f"{root}/slurmctld.pid", "SlurmdPidFile": f"{root}/slurmd.pid",
        "SlurmctldLogFile": f"{root}/slurmctld.log", "SlurmdLogFile": f"{root}/slurmd.log",
        "AuthInfo": f"socket={root}/munge.socket",
        "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
        "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_Core",
        "SlurmdParameters": "config_overrides",  # trust CPUs and RealMemory below on any machine
        "ReturnToService": 2, "MinJobAge": 600,  # finished jobs stay visible to scontrol (no accounting here)
        "FirstJobId": random.randrange(1000, 9000),  # Lightning's DDP port is 15000 + the job id's last 4 digits
        "GresTypes": "gpu",
        "NodeName": f"{host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=20000 Gres=gpu:2 State=UNKNOWN",
        "PartitionName": "debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    }
    with open(cluster.conf, "w") as f:
        f.writelines(f"{name}={value}\n" for name, value in settings.items())
    try:
        cluster.run(shutil.which("munged", path=SEARCH_PATH), "--force", f"--key-file={root}/munge.key",
                    f"--socket={root}/munge.socket", f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed",
                    f"--log-file={root}/munged.log")
        for daemon in ("slurmctld", "slurmd"):
            cluster.run(shutil.which(daemon, path=SEARCH_PATH), "-f", cluster.conf)
        for _ in range(120):
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=cluster.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            logs = "".join(open(f"{root}/{d}.log").read()[-1500:] for d in ("slurmctld", "slurmd"))
            pytest.fail(f"the test node did not become idle ({state.stdout.strip()}): {logs}")
        yield cluster
    finally:
        subprocess.run(["scancel", "--user", "root"], env=cluster.env, capture_output=True)
        time.sleep(2)
        for daemon in ("slurmd", "slurmctld", "munged"):
            _stop(f"{root}/{daemon}.pid")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, data_dir, tiny_clip):  # noqa: F811
    """A submit directory like a clone on a cluster (symlinks here, a real logs/), and the job environment:
    DATA_DIR, ResNet-18 and CLIP weights in the $TORCH_HOME / $HF_HOME caches, as the download command leaves them."""
    from torchvision.models import ResNet18_Weights, resnet18

    base = tmp_path_factory.mktemp("cluster_home")
    submit = base / "repo"
    (submit / "logs" / "slurm").mkdir(parents=True)
    for name in os.listdir(ROOT):
        if name != "logs":
            os.symlink(os.path.join(ROOT, name), submit / name)
    weights = base / "torch" / "hub" / "checkpoints" / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    weights.parent.mkdir(parents=True)
    torch.save(resnet18(weights=None).state_dict(), weights)  # random weights under the real file name
    model = base / "hf" / "hub" / "models--openai--clip-vit-base-patch32"
    commit = "0" * 40
    shutil.copytree(tiny_clip, model / "snapshots" / commit)
    (model / "refs").mkdir()
    (model / "refs" / "main").write_text(commit)
    env = {"DATA_DIR": data_dir, "TORCH_HOME": str(base / "torch"), "HF_HOME": str(base / "hf"),
           "HF_HUB_OFFLINE": "1", "TMPDIR": str(base / "node_local")}
    (base / "node_local").mkdir()
    return submit, env


def sbatch(slurm, checkout, template: str, *args: str, options=(), env=None) -> str:
    submit, job_env = checkout
    out = slurm.run("sbatch", "--parsable", *RESOURCES, *options, f"slurm/{template}", *args, cwd=submit,
                    env={**job_env, **(env or {})})
    return out.strip().split(";")[0]


def output(checkout, name: str, job: str) -> str:
    return open(checkout[0] / "logs" / "slurm" / f"{name}-{job}.out").read()


def train_losses(run_dir) -> list[tuple[int, float]]:
    """(step, train/loss) from every TensorBoard events file of a run, in the order the files were written."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points = []
    paths = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))  # events.out.tfevents.<time>.<host>.<pid>.<n>
    for path in sorted(paths, key=lambda p: [int(os.path.basename(p).split(".")[i]) for i in (3, -1)]):
        points += [(e.step, v.simple_value) for e in EventFileLoader(path).Load() for v in e.summary.value
                   if v.tag == "train/loss"]
    return points


@pytest.mark.slurm
@pytest.mark.parametrize("template,options", [("fit.sbatch", []), ("multinode_ddp.sbatch", DDP_HERE)])
def test_preempted_fit_requeues_and_ends_with_the_weights_of_an_uninterrupted_run(slurm, checkout, template, options):
    args = ["configs/quickstart.yaml", *CPU, *NO_FIGURES, "--data.init_args.batch_size", "16",
            "--trainer.max_epochs", "8"]  # 8 x 81 steps (40 per rank under DDP): long enough to be caught mid-fit
    preempted, uninterrupted = (sbatch(slurm, checkout, template, *args, options=options) for _ in range(2))
    try:
        preempt_and_compare(slurm, checkout, template, preempted, uninterrupted)
    finally:
        subprocess.run(["scancel", preempted, uninterrupted], env=slurm.env)  # a failed test's jobs: none are left


def preempt_and_compare(slurm, checkout, template: str, preempted: str, uninterrupted: str) -> None:
    run, reference = (checkout[0] / "logs" / "quickstart" / job for job in (preempted, uninterrupted))
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists():  # written at the end of epoch 0
        assert time.time() < deadline and slurm.jobs(preempted)[0]["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", preempted)  # what --signal=SIGUSR1@90 sends before the time limit
    slurm.wait(preempted, 120, until=lambda r: r["JobState"] == "PENDING" and r["Restarts"] == "1")
    slurm.start_now(preempted)  # skip the requeue delay
    for job in (preempted, uninterrupted):
        assert [(r["JobState"], r["ExitCode"]) for r in slurm.wait(job)] == [("COMPLETED", "0:0")], \
            output(checkout, header(template)["job-name"], job)[-3000:]

    out = output(checkout, header(template)["job-name"], preempted)
    steps = {int(s) for s in re.findall(r"saved \S+/hpc_ckpt_1\.ckpt at step (\d+)", out)}  # one line per rank
    assert len(steps) == 1 and f"requeued SLURM job {preempted}" in out and "Traceback" not in out, out[-3000:]
    assert "restart 1," in out  # the restarted job appended to the same output file
    assert re.search(r"Restoring states from the checkpoint path at \S+/hpc_ckpt_1\.ckpt", out)
    final, expected = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (run, reference))
    assert 0 < steps.pop() < final["global_step"] == expected["global_step"]
    assert all(torch.equal(value, expected["state_dict"][key]) for key, value in final["state_dict"].items())
    # TensorBoard: the restarted job adds an events file in the same folder; together: no step lost or repeated
    assert train_losses(run) == train_losses(reference)
    assert len(glob.glob(str(run / "events.out.tfevents.*"))) >= 2


@pytest.fixture(scope="module")
def jobs(slurm, checkout):
    """Every template submitted at once, so the cluster's two CPUs stay busy: template -> job id."""
    missing = [t for t in TEMPLATES if t not in SUBMISSIONS]
    assert not missing, f"add {missing} to SUBMISSIONS in tests/test_slurm.py"
    bad = checkout[0] / "bad.yaml"
    bad.write_text("experiment: bad\ndata:\n  class_path: datamodules.DigitsDataModule\nmodel:\n"
                   "  class_path: lightning_modules.CNN\n  init_args:\n    chanels: [8, 16]\n")
    submitted = {"bad config": sbatch(slurm, checkout, "fit.sbatch", "bad.yaml", *CPU)}
    for template, (args, options, env) in SUBMISSIONS.items():
        submitted[template] = sbatch(slurm, checkout, template, *args, options=options, env=env)
    return submitted


@pytest.mark.slurm
@pytest.mark.parametrize("template", TEMPLATES)
def test_template_runs_to_a_results_file_per_task(slurm, checkout, jobs, template):
    job, logs = jobs[template], checkout[0] / "logs"
    records = slurm.wait(job)
    out = output(checkout, header(template)["job-name"], job)
    assert [(r["JobState"], r["ExitCode"]) for r in records] == [("COMPLETED", "0:0")], out[-3000:]
    found = glob.glob(str(logs / "*" / job / "results.json"))
    assert len(found) == 1, out[-3000:]
    results = json.load(open(found[0]))
    assert set(results["test"]) == ({"final"} if subcommand(template) == "test" else {"best", "last"})
    assert "Traceback" not in out
    if template == "fit.sbatch":  # STAGE_DATA=1: read from a node-local copy, removed at the end
        staged = os.path.join(checkout[1]["TMPDIR"], f"data-{job}")
        assert yaml.safe_load(open(logs / "mnist_cnn" / job / "config.yaml"))["data"]["init_args"]["data_dir"] == staged
        assert not os.path.exists(staged)


@pytest.mark.slurm
def test_multinode_ddp_runs_one_rank_per_srun_task_and_rank_zero_writes_results(slurm, checkout, jobs):
    job = jobs["multinode_ddp.sbatch"]
    assert [r["JobState"] for r in slurm.wait(job)] == ["COMPLETED"]
    out = output(checkout, "multinode_ddp", job)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in out and "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert "distributed_backend=gloo" in out
    assert [d for d in os.listdir(checkout[0] / "logs" / "quickstart") if d.startswith(job)] == [job]  # no "-2"
    assert out.count("\nresults: ") == 1  # rank 0 only
    run = checkout[0] / "logs" / "quickstart" / job
    assert json.load(open(run / "results.json"))["efficiency"]["devices"] == 2
    trainer = yaml.safe_load(open(run / "config.yaml"))["trainer"]
    assert (trainer["num_nodes"], str(trainer["devices"]), trainer["strategy"]) == (1, "2", "ddp")


@pytest.mark.slurm
def test_bad_config_fails_fast_with_one_error_line_in_the_job_output(slurm, checkout, jobs):
    job = jobs["bad config"]
    (record,) = slurm.wait(job)
    assert (record["JobState"], record["ExitCode"]) == ("FAILED", "2:0")
    out = output(checkout, "fit", job)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "chanels" in errors[0] and "Traceback" not in out, out
    minutes, seconds = map(int, record["RunTime"].split(":")[-2:])
    assert minutes * 60 + seconds < 120
    assert not os.path.exists(checkout[0] / "logs" / "bad")  # no run folder left behind


# (template, the moment SIGUSR1 arrives, what the job does): before training it trains one batch, saves and
# requeues; at an epoch's last batch or in its validation it ends the epoch (validation included), saves and
# requeues; as the fit ends (after its last safe point) or while testing it finishes the tests, which are short;
# either way it ends COMPLETED with results.json
SIGNALLED = [("fit.sbatch", "setup", "requeue"), ("fit.sbatch", "sanity_check", "requeue"),
             ("fit.sbatch", "last_batch", "requeue"), ("fit.sbatch", "validation", "requeue"),
             ("fit.sbatch", "train_end", "test"), ("fit.sbatch", "testing", "finish"),
             ("clip_eval.sbatch", "testing", "finish")]


@pytest.mark.slurm
def test_a_signal_at_any_moment_ends_completed_with_results(slurm, checkout):
    signal_at = ["--trainer.callbacks+", "tests.signal_at.SignalAt", "--trainer.callbacks.signum", "SIGUSR1"]
    fit = ["configs/quickstart.yaml", *CPU, *NO_FIGURES, "--trainer.max_epochs", "2",
           "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2"]
    args = {"fit.sbatch": fit, "clip_eval.sbatch": [*TINY, *NO_FIGURES, *CIFAR_AS_MNIST]}
    jobs = [sbatch(slurm, checkout, template, *args[template], *signal_at, "--trainer.callbacks.moment", moment)
            for template, moment, _ in SIGNALLED]
    try:
        deadline, pending = time.time() + 600, set(jobs)
        while pending and time.time() < deadline:
            for job in list(pending):
                (record,) = slurm.jobs(job)
                if record["JobState"] == "PENDING" and record["Restarts"] != "0":
                    slurm.start_now(job)  # skip the requeue delay
                elif record["JobState"] in FINISHED:
                    pending.discard(job)
            time.sleep(1)
        assert not pending, [slurm.jobs(job) for job in pending]
        for job, (template, moment, action) in zip(jobs, SIGNALLED):
            out = output(checkout, header(template)["job-name"], job)
            (record,) = slurm.jobs(job)
            assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), (moment, out[-3000:])
            assert "Traceback" not in out and len(glob.glob(str(checkout[0] / "logs" / "*" / job / "results.json"))) == 1
            if action == "requeue":
                assert record["Restarts"] == "1" and f"requeued SLURM job {job}" in out, out[-3000:]
                assert re.search(r"restart 1 of this job: resuming from \S+/hpc_ckpt_1\.ckpt", out), out[-3000:]
            else:
                assert record["Restarts"] == "0" and "requeued" not in out, out[-3000:]
            if action == "finish":
                assert "received SIGUSR1: finishing the tests first" in out, out[-3000:]
    finally:
        subprocess.run(["scancel", *jobs], env=slurm.env)


@pytest.mark.slurm
def test_a_rank_that_fails_ends_the_whole_ddp_job_at_once(slurm, checkout):
    """One rank raises while the others are stuck waiting for it (as NCCL ranks are): srun must end the step, not
    hold every GPU of the job until a collective's 30-minute timeout or the job's time limit."""
    args = ["configs/quickstart.yaml", *TINY, *NO_FIGURES, "--trainer.limit_train_batches", "6",
            "--trainer.callbacks+", "tests.fault_at.FaultAt", "--trainer.callbacks.stall", "900"]
    job = sbatch(slurm, checkout, "multinode_ddp.sbatch", *args, options=DDP_HERE)
    try:
        (record,) = slurm.wait(job, 240)  # the stalled rank alone would run 15 minutes
    finally:
        subprocess.run(["scancel", job], env=slurm.env)
    out = output(checkout, "multinode_ddp", job)
    assert (record["JobState"], record["Restarts"]) == ("FAILED", "0"), out[-3000:]  # a fault is not requeued
    assert "RuntimeError: injected fault on rank 1 at step 2" in out
    assert not glob.glob(str(checkout[0] / "logs" / "quickstart" / job / "results.json"))
