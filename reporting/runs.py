"""Read results.json files into Run records and group the seeds of one experiment."""
import json
import os
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

REQUIRED_KEYS = ("experiment", "model", "dataset", "test")
TEST_SOURCES = ("best", "final", "last")  # the run's test result is the first one present
MLP_MODELS = ("MLP",)
CNN_MODELS = ("CNN", "ScratchCNN")
PRETRAINED_MODELS = ("ResNet18", "CLIPZeroShot")  # every other model is trained from scratch


class RunFileError(ValueError):
    """A results.json the report cannot use: invalid JSON or missing required keys."""


@dataclass
class Run:
    """One finished run, as read from its results.json."""

    path: Path
    experiment: str
    base_experiment: str
    variant: str | None
    model: str
    dataset: str
    seed: int | None
    run_dir: str
    params_total: int | None
    params_trainable: int | None
    source: str | None  # best | final | last: where `test` comes from
    test: dict[str, float]  # fractions: acc, precision_macro, recall_macro, f1_macro, top5_acc, ...
    best_acc: float | None
    last_acc: float | None
    efficiency: dict
    finished_at: str
    tested_checkpoint: str | None = None  # `cli.py test --ckpt_path X`: the checkpoint it scored

    @property
    def version(self) -> str:
        return self.path.parent.name


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _count(value) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _metrics(block) -> dict[str, float]:
    if not isinstance(block, dict):
        return {}
    return {key: float(value) for key, value in block.items() if _number(value) is not None}


def read_run(path: Path) -> Run:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFileError(f"invalid JSON ({error})") from None
    if not isinstance(data, dict):
        raise RunFileError("not a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise RunFileError(f"missing required keys: {', '.join(missing)}")
    for key in ("experiment", "model", "dataset"):
        if not isinstance(data[key], str) or not data[key]:
            raise RunFileError(f'"{key}" must be a non-empty string')
    if not isinstance(data["test"], dict):
        raise RunFileError('"test" must be an object with best/last or final metrics')
    if data.get("untrained") is True:
        raise RunFileError("scores untrained weights (cli.py test without --ckpt_path), not a run of the experiment")

    experiment = data["experiment"]
    base = data.get("base_experiment") if isinstance(data.get("base_experiment"), str) else experiment
    variant = data.get("variant") if isinstance(data.get("variant"), str) and data["variant"] else None
    if variant is None and base != experiment and experiment.startswith(base + "-"):
        variant = experiment[len(base) + 1:]
    source = next((name for name in TEST_SOURCES if isinstance(data["test"].get(name), dict)), None)
    params = data.get("params") if isinstance(data.get("params"), dict) else {}
    efficiency = data.get("efficiency") if isinstance(data.get("efficiency"), dict) else {}
    return Run(
        path=path,
        experiment=experiment,
        base_experiment=base,
        variant=variant,
        model=data["model"],
        dataset=data["dataset"],
        seed=_count(data.get("seed")),
        run_dir=data["run_dir"] if isinstance(data.get("run_dir"), str) else str(path.parent),
        params_total=_count(params.get("total")),
        params_trainable=_count(params.get("trainable")),
        source=source,
        test=_metrics(data["test"].get(source)) if source else {},
        best_acc=_metrics(data["test"].get("best")).get("acc"),
        last_acc=_metrics(data["test"].get("last")).get("acc"),
        efficiency=efficiency,
        finished_at=str(data.get("finished_at") or ""),
        tested_checkpoint=data["tested_checkpoint"] if isinstance(data.get("tested_checkpoint"), str) else None,
    )


def drop_retests(runs: list[Run]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """A `cli.py test --ckpt_path` of a checkpoint whose own run has a results.json among `runs` re-scores that run:
    it is not another run of the experiment (as the later run of a seed it would replace the fit's best-checkpoint
    result by whichever checkpoint was re-tested). (kept, [(path, reason)])."""
    folders = {os.path.realpath(run.path.parent) for run in runs}
    kept, skipped = [], []
    for run in runs:
        owner = os.path.realpath(run_directory(run.tested_checkpoint)) if run.tested_checkpoint else None
        if owner and owner != os.path.realpath(run.path.parent) and owner in folders:
            skipped.append((run.path, f"re-tests {run.tested_checkpoint}; that run's own results.json counts"))
        else:
            kept.append(run)
    return kept, skipped


def run_directory(ckpt_path: str) -> str:
    """logs/<experiment>/<version> for logs/<experiment>/<version>/checkpoints/<name>.ckpt (and .../hpc_ckpt_N.ckpt)."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def load_runs(root: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every readable results.json under root (recursively), and (path, reason) for the others."""
    runs, skipped = [], []
    for path in sorted(root.rglob("results.json")) if root.is_dir() else []:
        try:
            runs.append(read_run(path))
        except RunFileError as error:
            skipped.append((path, str(error)))
    runs, retests = drop_retests(runs)
    return runs, sorted(skipped + retests)


class RunGroup:
    """The runs of one experiment, one per seed (a single run when it ran once)."""

    def __init__(self, runs: list[Run]):
        self.runs = sorted(runs, key=lambda run: (run.seed is None, run.seed or 0, str(run.path)))
        first = self.runs[0]
        self.experiment, self.base_experiment, self.variant = first.experiment, first.base_experiment, first.variant
        self.model, self.dataset = first.model, first.dataset

    def metric(self, name: str) -> list[float]:
        """Test metric `name` of every run that has it (fractions)."""
        return [run.test[name] for run in self.runs if name in run.test]

    def values(self, getter) -> list:
        return [value for value in map(getter, self.runs) if value is not None]

    def efficiency(self, key: str) -> list:
        return [run.efficiency[key] for run in self.runs if run.efficiency.get(key) is not None]

    def params(self, prefer: str = "trainable") -> list[int]:
        """Trainable (or total) parameter counts, falling back to the other when one is missing."""
        def count(run: Run) -> int | None:
            trainable, total = run.params_trainable, run.params_total
            preferred, other = (trainable, total) if prefer == "trainable" else (total, trainable)
            return preferred if preferred is not None else other

        return self.values(count)

    def acc_by_seed(self) -> dict:
        return {run.seed: run.test["acc"] for run in self.runs if "acc" in run.test}

    def mean_acc(self) -> float:
        accs = self.metric("acc")
        return mean(accs) if accs else float("-inf")

    def run_dirs(self) -> str:
        dirs = [run.run_dir for run in self.runs]
        if len(dirs) == 1:
            return dirs[0]
        try:
            common = os.path.commonpath(dirs)
        except ValueError:  # absolute and relative paths mixed
            common = dirs[0]
        return f"{common}/ ({len(dirs)} runs)"


def group_runs(runs: list[Run]) -> tuple[list[RunGroup], list[tuple[Run, Run]]]:
    """Groups by experiment; of two runs with the same seed the later one counts: (old, new) pairs."""
    latest: dict[tuple, Run] = {}
    superseded = []
    for run in sorted(runs, key=lambda run: (run.finished_at, str(run.path))):
        key = (run.experiment, run.dataset, run.model, run.seed)
        if key in latest:
            superseded.append((latest[key], run))
        latest[key] = run
    by_experiment: dict[tuple, list[Run]] = {}
    for (experiment, dataset, model, _seed), run in latest.items():
        by_experiment.setdefault((experiment, dataset, model), []).append(run)
    groups = [RunGroup(members) for members in by_experiment.values()]
    groups.sort(key=lambda g: (g.dataset, g.base_experiment, g.variant is not None, g.variant or "", g.experiment))
    return groups, superseded


def gap_values(a: RunGroup, b: RunGroup) -> list[float]:
    """Accuracy a - b per shared seed when they share two or more seeds, else the difference of means."""
    a_by_seed, b_by_seed = a.acc_by_seed(), b.acc_by_seed()
    shared = [seed for seed in a_by_seed if seed in b_by_seed]
    if len(shared) >= 2:
        return [a_by_seed[seed] - b_by_seed[seed] for seed in shared]
    a_accs, b_accs = a.metric("acc"), b.metric("acc")
    return [mean(a_accs) - mean(b_accs)] if a_accs and b_accs else []
