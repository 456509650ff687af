"""`python cli.py ...` for tests, without paying the libraries' import once per command.

A test that checks what a user meets at the command line needs a process of its own: its exit status, its
stderr, nothing left behind in pytest's process. Most of such a process's seconds are the imports of torch,
Lightning and torchmetrics (~6 s on a 2-core CPU), so the suite kept paying them dozens of times.

Here one server process imports those libraries once and forks a child per command. The child runs the
script as `__main__` exactly as `python script args...` would, with stdout and stderr in files, and its exit
status is the command's. Our own modules are not imported by the server, so each command imports them
fresh. The server runs no torch operation before it forks, so no OpenMP thread pool exists to be broken by
the fork.

What stays in real subprocesses: the tests of what the libraries print when imported, signals, DDP
launches that re-run `sys.argv`, and at least one end-to-end command per entry point.
"""
import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the third-party imports that make up nearly all of `import cli` (python -X importtime -c "import cli")
PRELOAD = ("torch", "torchvision", "torchmetrics", "lightning.pytorch", "lightning.pytorch.cli", "jsonargparse",
           "matplotlib.pyplot", "tensorboard")


def _run_child(request: dict, out_path: str, err_path: str) -> None:
    """In the forked child: become `python <script> args...` and never return."""
    code = 1
    try:
        os.setpgid(0, 0)  # a timeout kills the command and whatever it started
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, out_path), (2, err_path)):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(handle, fd)
            os.close(handle)
        import runpy

        args = request["args"]
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path[0] = request["cwd"]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
            runpy.run_path(args[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # the interpreter's way: the traceback, then death by SIGINT (exit status -2)
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        try:
            threading._shutdown()  # the interpreter joins non-daemon threads before atexit
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            if code == -signal.SIGINT:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
            os._exit(code & 0xFF)


def serve() -> None:
    for name in PRELOAD:
        __import__(name)
    # the native threads here are numpy's and scipy's OpenBLAS pools, which stop before a fork (pthread_atfork)
    assert threading.active_count() == 1, "a Python thread before fork"
    requests, replies = sys.stdin, os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing the server prints mixes with its replies
    for line in requests:
        request = json.loads(line)
        folder = tempfile.mkdtemp(prefix="forked-")
        out_path, err_path = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(request, out_path, err_path)
        deadline = time.monotonic() + request["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                timed_out = True
                os.killpg(pid, 9)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.02)
        reply = {"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
                 "stdout": open(out_path, errors="replace").read(), "stderr": open(err_path, errors="replace").read()}
        for path in (out_path, err_path):
            os.remove(path)
        os.rmdir(folder)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


_server = None
_lock = threading.Lock()


def _start() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen([sys.executable, "-m", "tests.forked"], cwd=ROOT, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        atexit.register(_server.kill)
    return _server


def run(args: list, cwd: str = ROOT, env: dict = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Like `subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
    timeout=timeout)`, for a script path or `-m module` that ends by returning or by sys.exit."""
    request = {"args": [str(a) for a in args], "cwd": str(cwd), "env": dict(os.environ if env is None else env),
               "timeout": timeout}
    with _lock:
        server = _start()
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
    if not line:
        raise RuntimeError(f"the fork server ended (exit status {server.poll()}); its error is above")
    reply = json.loads(line)
    command = [sys.executable, *request["args"]]
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired(command, timeout, reply["stdout"], reply["stderr"])
    return subprocess.CompletedProcess(command, reply["returncode"], reply["stdout"], reply["stderr"])


if __name__ == "__main__":
    serve()
