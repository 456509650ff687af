"""Run folders: `<log_dir>/<experiment>[-<variant>]/<version>/`, one per run, shared by every DDP rank (whoever
started it: Lightning, srun or torchrun) and by a requeued SLURM job."""
import datetime
import fcntl
import functools
import os
from typing import Optional

import torch

from errors import UserError

created_run_dirs: list[str] = []  # removed again if the command fails before a checkpoint exists
_TORCHRUN_KEY = f"cli/run_version/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # a restart: a new folder


def run_version() -> str:
    """SLURM job id (plus array task), so a requeued job continues in its folder; else a timestamp."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return os.environ["SLURM_JOB_ID"]
    if is_worker_process() and os.environ.get("RUN_VERSION"):
        return os.environ["RUN_VERSION"]  # chosen by rank 0, which started this DDP worker
    if is_worker_process() and torchrun_store() is not None:
        return torchrun_store().get(_TORCHRUN_KEY).decode()  # waits until rank 0 has claimed its folder
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def is_worker_process() -> bool:
    return any(int(os.environ.get(key, "0")) > 0 for key in ("LOCAL_RANK", "NODE_RANK", "RANK"))


@functools.cache
def torchrun_store() -> Optional[torch.distributed.TCPStore]:
    """The store torchrun's agent serves at MASTER_ADDR:MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE), as a client:
    the ranks torchrun starts share no environment, so rank 0 publishes its run folder's name here."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not os.environ.get("MASTER_ADDR"):
        return None
    return torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                      timeout=datetime.timedelta(minutes=10))


def claim_run_dir(log_dir: str, experiment: str, fixed_version: Optional[str] = None) -> str:
    """Creates logs/<experiment>/<version>; `mkdir` is atomic, so concurrent runs never share one.
    A `fixed_version` (a sweep point's `run_version`) names the folder instead and re-uses it, as a requeue does."""
    parent = os.path.join(log_dir, experiment)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the log directory {parent} ({error.strerror}); "
                        "choose a writable one with --log_dir") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"the log directory {parent} is not writable; choose another with --log_dir")
    version = fixed_version or run_version()

    def mkdir(path: str) -> None:  # another command's discard_run_dirs may remove an empty `parent` at any moment
        try:
            os.mkdir(path)
        except FileNotFoundError:
            os.makedirs(parent, exist_ok=True)
            os.mkdir(path)

    if fixed_version or os.environ.get("SLURM_JOB_ID") or is_worker_process():  # a requeued SLURM job or any DDP rank: same folder
        try:  # all srun tasks start at once: whichever is first creates it, no "-2" for the others
            mkdir(os.path.join(parent, version))
            created_run_dirs.append(os.path.join(parent, version))
        except FileExistsError:
            pass
        return os.path.join(parent, version)
    base, n = version, 1
    while True:
        try:
            mkdir(os.path.join(parent, version))
            created_run_dirs.append(os.path.join(parent, version))
            os.environ["RUN_VERSION"] = version  # DDP workers started by Lightning inherit it
            if torchrun_store() is not None:
                torchrun_store().set(_TORCHRUN_KEY, version)
            return os.path.join(parent, version)
        except FileExistsError:
            n += 1
            version = f"{base}-{n}"


LOCK_NAME = ".lock"
_held: list = []  # the open lock files of this command's named run folders


def lock_run_dir(run_dir: str) -> None:
    """A folder named by `--run_version` (a sweep point) or by the checkpoint a fit resumes is re-used on purpose;
    two commands in it at once (a sweep started twice, a resume of a run that is still training) wrote their
    checkpoints, events and results.json over each other. The command's first process holds an flock on
    `<run>/.lock` until it ends (its DDP ranks and srun tasks share the folder); a second command is one error
    line. A requeued SLURM job's earlier processes are gone, and with them their lock."""
    if is_worker_process() or int(os.environ.get("SLURM_PROCID", "0")) > 0:
        return
    try:
        handle = open(os.path.join(run_dir, LOCK_NAME), "a+")
    except OSError:  # a folder we cannot write to fails later, with its own line
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise UserError(f"the run folder {run_dir} is in use by another command" + (f" (pid {holder})" if holder else "")
                        + "; wait for it to end or stop it, or give --run_version another name") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _held.append(handle)


def release_run_dirs() -> None:
    """At the end of a command (a notebook runs several in one process)."""
    while _held:
        _held.pop().close()


def forget_run_version() -> None:
    """After a command in this process: a later process started from it (a notebook's next `!torchrun`, a test's
    subprocess) must not take this run's folder for its rank 0's."""
    if not is_worker_process():
        os.environ.pop("RUN_VERSION", None)
