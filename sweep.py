"""Run a sweep file (sweeps/*.yaml: configs x grid x seeds) point by point here, or as one SLURM job array.

    python sweep.py sweeps/cifar100_assignment.yaml --dry-run         # one line per point, nothing else on stdout
    python sweep.py sweeps/cifar100_assignment.yaml                   # here, one point after another
    python sweep.py sweeps/cifar100_assignment.yaml --slurm slurm/fit.sbatch --max-parallel 4
    python report.py --sweep sweeps/cifar100_assignment.yaml --out report.md

Every point is an ordinary `python cli.py fit|test` run in a folder named by the point
(logs/<experiment>[-<variant>]/<sweep>-seed<S>/, the grid values in the variant). Running the same command
again skips finished points (results.json), resumes unfinished ones from checkpoints/last.ckpt and starts
the others afresh; a resubmitted array holds only the unfinished points.
"""
import argparse
import contextlib
import fcntl
import io
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from errors import UserError, one_line_errors

ROOT = Path(__file__).resolve().parent
SWEEP_KEYS = {"name", "experiments", "base", "overlays", "grid", "seeds", "subcommand", "args"}
BLOCK_KEYS = {"base", "overlays", "grid", "seeds", "subcommand", "args"}  # what `experiments:` entries may set
SET_BY_THE_SWEEP = {  # cli.py keys a sweep sets itself (each point's folder and seed), so no grid or args may
    "seed_everything": "list the seeds under seeds:",
    "run_version": "each point's run folder is named by the sweep (<sweep>-seed<S>)",
    "ckpt_path": "the sweep resumes each unfinished point from its own last.ckpt",
    "experiment": "the run folder is named by it; make one experiments: block (or overlay) per experiment",
    "variant": "grid values already name the variant; use overlays for named variants",
    "log_dir": "every point's folder must be known to the sweep; set --log_dir once in args",
    "config": "list config files as base or overlays",
}


@dataclass
class Point:
    """One run of a sweep: its configs, grid values and seed."""

    index: int
    sweep: str
    subcommand: str
    configs: list[str]
    values: dict  # dotted key -> value
    seed: int
    args: list[str] = field(default_factory=list)  # the sweep's fixed overrides
    experiment: str = ""
    variant: str | None = None
    log_dir: str = "logs"
    config_name: str = ""  # experiment[-variant] of the configs alone, without the grid values

    @property
    def version(self) -> str:
        return f"{self.sweep}-seed{self.seed}"

    @property
    def name(self) -> str:  # the run folder's parent: what varies, apart from the seed
        return self.experiment + (f"-{self.variant}" if self.variant else "")

    @property
    def run_dir(self) -> Path:
        return Path(self.log_dir) / self.name / self.version

    def cli_args(self) -> list[str]:
        """The arguments of `python cli.py` for this point (no --ckpt_path)."""
        words = [self.subcommand]
        for config in self.configs:
            words += ["--config", config]
        words += self.args
        for key, value in self.values.items():
            words += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        words += ["--seed_everything", str(self.seed), "--run_version", self.version]
        return words + (["--variant", self.variant] if self.variant else [])

    def state(self) -> str:
        """finished (results.json), resumable (checkpoints/last.ckpt) or new."""
        if (self.run_dir / "results.json").is_file():
            return "finished"
        return "resumable" if (self.run_dir / "checkpoints" / "last.ckpt").is_file() else "new"

    def command(self) -> list[str]:
        resume = ["--ckpt_path", str(self.run_dir / "checkpoints" / "last.ckpt")] if self.state() == "resumable" else []
        return self.cli_args() + resume


def _list(value, what: str) -> list:
    if not isinstance(value, list) or not value:
        raise UserError(f"{what} must be a non-empty list, got {value!r}")
    return value


def _sources(configs: list[str], args: list[str], where: str) -> list:
    """What sets top-level keys, in cli.py's order: each config, then `args` word by word (a --config in `args`
    is read at its place, as jsonargparse does)."""
    sources, i = [("config", config) for config in configs], 0
    while i < len(args):
        word = args[i]
        if word.startswith("--config="):
            sources.append(("config", word.split("=", 1)[1]))
        elif word == "--config" and i + 1 < len(args):
            sources.append(("config", args[i + 1]))
            i += 1
        elif word.startswith("--") and "=" in word:
            sources.append(("arg", tuple(word[2:].split("=", 1))))
        elif word.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            sources.append(("arg", (word[2:], args[i + 1])))
            i += 1
        i += 1
    for kind, value in sources:
        if kind == "config" and not os.path.isfile(value):
            raise UserError(f"{where}: config {value} does not exist (paths are relative to where you run "
                            "sweep.py, normally the repository root)")
    return sources


def _top_level(sources: list, key: str, default):
    """A top-level config key (experiment, variant, log_dir) as cli.py will resolve it: the last source's."""
    value = default
    for kind, source in sources:
        if kind == "arg":
            value = source[1] if source[0] == key else value
            continue
        try:
            loaded = yaml.safe_load(open(source)) or {}
        except yaml.YAMLError as error:
            raise UserError(f"{source} is not valid YAML ({str(error).splitlines()[0]})") from None
        value = loaded.get(key, value) if isinstance(loaded, dict) else value
    return value


def _label(value) -> str:
    """A grid value as part of a folder name: 0.01, 16x32, adamw."""
    text = "x".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "", text)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Grid keys as folder and column names: model.init_args.lr -> lr, unless two end the same (then the whole key)."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def load_sweep(path: str) -> list[Point]:
    """The points of a sweep file, in order; a malformed file raises a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"sweep file {path} does not exist; the shipped ones are in sweeps/")
    try:
        spec = yaml.safe_load(open(path))
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path} must be a mapping with base, overlays, grid and seeds")
    unknown = sorted(set(spec) - SWEEP_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; a sweep file has {', '.join(sorted(SWEEP_KEYS))}")
    name = str(spec.get("name") or Path(path).stem)
    if "experiments" in spec and ("base" in spec or "overlays" in spec):
        raise UserError(f"{path}: give either base/overlays or experiments, not both")
    blocks = _list(spec["experiments"], f"{path}: experiments") if "experiments" in spec else [{}]
    points = []
    for block in blocks:
        if not isinstance(block, dict) or set(block) - BLOCK_KEYS:
            raise UserError(f"{path}: each entry of experiments is a mapping of {', '.join(sorted(BLOCK_KEYS))}; "
                            f"got {block!r}")
        merged = {**{k: v for k, v in spec.items() if k in BLOCK_KEYS}, **block}
        if not merged.get("base"):
            raise UserError(f"{path}: no base config; add base: configs/<experiment>.yaml")
        grid = merged.get("grid") or {}
        if not isinstance(grid, dict):
            raise UserError(f"{path}: grid must map dotted keys to lists of values, got {grid!r}")
        for key, values in grid.items():
            _list(values, f"{path}: grid key {key}")
        seeds = _list(merged.get("seeds", [0]), f"{path}: seeds")
        if not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds):
            raise UserError(f"{path}: seeds must be integers, got {seeds}")
        args = [str(word) for word in merged.get("args") or []]
        subcommand = merged.get("subcommand", "fit")
        if subcommand not in ("fit", "test"):
            raise UserError(f"{path}: subcommand must be fit or test, got {subcommand!r}")
        for key in grid:
            if str(key).split(".")[0] in SET_BY_THE_SWEEP:
                raise UserError(f"{path}: grid key {key} cannot vary: {SET_BY_THE_SWEEP[str(key).split('.')[0]]}")
        for word in args:
            key = word[2:].split("=", 1)[0].split(".")[0] if word.startswith("--") else None
            if key in ("seed_everything", "run_version", "ckpt_path"):
                raise UserError(f"{path}: args cannot set --{key}: {SET_BY_THE_SWEEP[key]}")
        short = short_keys(list(grid))
        for overlay in merged.get("overlays") or [None]:
            configs = [merged["base"]] + ([overlay] if overlay else [])
            sources = _sources(configs, args, path)
            experiment = _top_level(sources, "experiment", "experiment")
            config_variant = _top_level(sources, "variant", None)
            log_dir = _top_level(sources, "log_dir", "logs")
            config_name = experiment + (f"-{config_variant}" if config_variant else "")
            for combination in itertools.product(*grid.values()):
                values = dict(zip(grid, combination))
                grid_part = "_".join(f"{short[key]}={_label(value)}" for key, value in values.items()
                                     if len(grid[key]) > 1)  # a single value is not a variant
                variant = "-".join(part for part in (config_variant, grid_part) if part) or None
                for seed in seeds:
                    points.append(Point(len(points), name, subcommand, configs, values, seed, args, experiment,
                                        variant, log_dir, config_name))
    folders = [point.run_dir for point in points]
    duplicate = next((folder for folder in folders if folders.count(folder) > 1), None)
    if duplicate is not None:
        raise UserError(f"{path}: two points share the run folder {duplicate}; give the overlays distinct variants")
    return points


def validate(points: list[Point]) -> None:
    """Parse every distinct point with cli.py's parser (no run): an unknown key or bad value is one line."""
    import cli  # torch and Lightning: imported only when needed

    checked = set()
    for point in points:
        words = (point.subcommand, *point.configs, *point.args, json.dumps(point.values))  # seeds never differ here
        if words in checked:
            continue
        checked.add(words)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main([*point.cli_args(), "--print_config"])
            except SystemExit as exit_:
                code = exit_.code
            else:
                code = 0
        if code not in (0, None):
            line = next((l for l in err.getvalue().splitlines() if l.startswith("error: ")), err.getvalue().strip())
            raise UserError(f"point {point.index} ({point.name}): {line.removeprefix('error: ')}")


def describe(point: Point) -> str:
    return f"{point.index:3d} {point.state():9} {point.run_dir}  python cli.py {shlex.join(point.command())}"


class LocalRunner:
    """Runs points as cli.py subprocesses; forwards Ctrl-C/SIGTERM to the running one and stops after it."""

    def __init__(self):
        self.process, self.signal = None, None

    def forward(self, signum, _frame):
        self.signal = signum
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)  # cli.py stops at a safe point and saves checkpoints/last.ckpt

    def run(self, point: Point) -> tuple[int, str]:
        """The exit status and the last `error:` line of one point; its output goes to this terminal."""
        if point.state() == "new" and point.run_dir.exists():
            shutil.rmtree(point.run_dir)  # left by a killed run before its first checkpoint: start afresh
        # its own session: a terminal's Ctrl-C reaches only sweep.py, which forwards it exactly once
        self.process = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *point.command()],
                                        stderr=subprocess.PIPE, start_new_session=True)
        tail = b""
        while chunk := os.read(self.process.stderr.fileno(), 4096):
            sys.stderr.buffer.write(chunk)  # tqdm redraws with \r: pass bytes through as they come
            sys.stderr.buffer.flush()
            tail = (tail + chunk)[-4096:]
        code = self.process.wait()
        lines = tail.decode(errors="replace").splitlines()
        return code, next((line for line in reversed(lines) if line.startswith("error: ")), "")


def run_here(path: str, points: list[Point]) -> int:
    runner = LocalRunner()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, runner.forward)
    todo = [point for point in points if point.state() != "finished"]
    print(f"sweep {points[0].sweep}: {len(points)} points, {len(points) - len(todo)} finished, {len(todo)} to run",
          file=sys.stderr)
    failed, start = [], time.monotonic()
    for k, point in enumerate(todo):
        if runner.signal is not None:  # arrived between two points
            print(f"interrupted: run python sweep.py {path} again to continue", file=sys.stderr, flush=True)
            return 130
        elapsed = time.monotonic() - start
        eta = f", about {elapsed / k * (len(todo) - k) / 60:.1f} min left" if k else ""
        print(f"[sweep] point {k + 1} of {len(todo)} (#{point.index} {point.run_dir}, {point.state()}); "
              f"elapsed {elapsed / 60:.1f} min{eta}", file=sys.stderr, flush=True)
        code, error = runner.run(point)
        if runner.signal is not None:
            print(f"interrupted: point #{point.index} stopped (checkpoint saved at a safe point); run "
                  f"python sweep.py {path} again to continue", file=sys.stderr, flush=True)
            return 130
        if code != 0:
            failed.append((point, code, error))
            print(f"[sweep] point #{point.index} failed (exit status {code}); going on with the others",
                  file=sys.stderr, flush=True)
    done = len(todo) - len(failed)
    print(f"sweep {points[0].sweep}: {done} of {len(todo)} points run in {(time.monotonic() - start) / 60:.1f} min, "
          f"{len(failed)} failed", file=sys.stderr)
    for point, code, error in failed:
        print(f"failed: point #{point.index} {point.run_dir} (exit {code}) {error}".rstrip(), file=sys.stderr)
    return 1 if failed else 0


def submit(path: str, points: list[Point], template: str, max_parallel: int | None, options: list[str]) -> int:
    """One job array: task i runs line i of the points file, through the template (see slurm/common.sh)."""
    if not os.path.isfile(template):
        raise UserError(f"SLURM template {template} does not exist; the shipped ones are in slurm/")
    todo = [point.index for point in points if point.state() != "finished"]
    if not todo:
        print(f"sweep {points[0].sweep}: all {len(points)} points are finished; nothing to submit", file=sys.stderr)
        return 0
    points_file = Path(points[0].log_dir) / "sweeps" / f"{points[0].sweep}.points"
    points_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = points_file.with_suffix(".tmp")
    temporary.write_text("".join(shlex.join(point.command()) + "\n" for point in points))
    os.replace(temporary, points_file)  # a running task reads its line once, at its start
    array = ",".join(map(str, todo)) + (f"%{max_parallel}" if max_parallel else "")
    command = ["sbatch", "--parsable", f"--array={array}", "--output=logs/slurm/%x-%A_%a.out",
               f"--export=ALL,SWEEP_POINTS={points_file.resolve()}", *options, template]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("sbatch is not on PATH: submit from a SLURM login node, or run the sweep here without --slurm")
    if result.returncode != 0:
        raise UserError(f"sbatch failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}")
    job = result.stdout.strip().split(";")[0]
    print(f"submitted job array {job}: {len(todo)} of {len(points)} points ({array}); "
          f"outputs in logs/slurm/, then python report.py --sweep {path}", file=sys.stderr)
    print(job)
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="a sweep file, e.g. sweeps/cifar100_assignment.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print one line per point (state, folder, command)")
    parser.add_argument("--slurm", metavar="TEMPLATE", help="submit one job array through this sbatch template")
    parser.add_argument("--max-parallel", type=int, metavar="N", help="at most N array tasks at once (sbatch %%N)")
    parser.add_argument("--sbatch-options", default="", metavar="'OPTS'",
                        help="extra sbatch options for the array, e.g. '--partition=debug --time=01:00:00'")
    args = parser.parse_args(argv)
    if args.max_parallel is not None and args.max_parallel <= 0:
        parser.error(f"--max-parallel must be positive, got {args.max_parallel}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with one_line_errors():
        points = load_sweep(args.sweep)
        validate(points)
        if args.dry_run:
            for point in points:
                print(describe(point))
            return 0
        if args.slurm:
            return submit(args.sweep, points, args.slurm, args.max_parallel, shlex.split(args.sbatch_options))
        with sweep_lock(points):
            return run_here(args.sweep, points)


@contextlib.contextmanager
def sweep_lock(points):
    """One local run of a sweep at a time: a second one (another terminal, a notebook) took the points the first had
    not reached yet, and each then failed the other's running point ("the run folder ... is in use")."""
    path = Path(points[0].log_dir) / "sweeps" / f"{points[0].sweep}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            raise UserError(f"sweep {points[0].sweep} is already running here" + (f" (pid {holder})" if holder else "")
                            + f"; wait for it or stop it, then run this command again ({path})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


if __name__ == "__main__":
    sys.exit(main())
