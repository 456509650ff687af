"""The Python API for notebooks and scripts: the same code path as `python cli.py`, returning a Run.

    import api
    run = api.fit("configs/quickstart.yaml", **{"trainer.max_epochs": 5})
    run.results["test"]["best"]["acc"]; run.show(); run.curves()
    api.fit("configs/cifar100_cnn.yaml", "configs/ablations/narrow.yaml")   # overlays, as --config
    api.test("configs/cifar100_clip.yaml")
    api.predict(run.run_dir / "config.yaml", ckpt_path=run.checkpoints["best"]).predictions()  # one dict per image
    api.report("logs/", layout="cifar100")                                  # Markdown, rendered in Jupyter

Overrides are cli.py's dotted keys (`--trainer.max_epochs 5`); lists and dicts are passed as JSON.
A mistake raises errors.UserError with the line `python cli.py` prints; nothing calls sys.exit.
"""
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from errors import UserError, user_error_in

PathLike = Union[str, os.PathLike]
_forced: dict[str, Any] = {}  # set_overrides(): appended after every call's own overrides (smoke mode)


def set_overrides(**overrides: Any) -> None:
    """Overrides added to every later fit/test, after the call's own so they win (a notebook's smoke cell:
    the bundled digits and one short epoch). Called with nothing, it clears them."""
    _forced.clear()
    _forced.update(overrides)


def _in_jupyter() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None and hasattr(get_ipython(), "kernel")


def _png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _show_figures_inline() -> None:
    """A matplotlib Figure as the value of a cell renders as a PNG (our plots use no pyplot, so the inline
    backend never registers this)."""
    if _in_jupyter():
        from IPython import get_ipython
        from matplotlib.figure import Figure

        get_ipython().display_formatter.formatters["image/png"].for_type(Figure, _png_bytes)


def _argument(value: Any) -> str:
    """A Python value as the command line spells it: true/false/null, JSON for lists and dicts."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)


def command_line(subcommand: str, configs: Sequence[PathLike], overrides: dict[str, Any]) -> list[str]:
    """fit("a.yaml", "b.yaml", **{"trainer.max_epochs": 5}) -> fit --config a.yaml --config b.yaml
    --trainer.max_epochs 5 (then the set_overrides ones)."""
    args = [subcommand]
    for config in configs:
        args += ["--config", os.fspath(config)]
    for key, value in [*overrides.items(), *_forced.items()]:
        args += [f"--{key}", _argument(value)]
    return args


@dataclass
class Run:
    """One finished command: its run directory, results.json, checkpoints and figures."""

    run_dir: Path
    results: dict = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: PathLike) -> "Run":
        """A run from its folder (logs/<experiment>/<version>), e.g. one trained earlier or on a cluster."""
        run_dir = Path(run_dir)
        path = run_dir / "results.json"
        if not run_dir.is_dir():
            raise UserError(f"run directory {run_dir} does not exist; fit or test a config first")
        try:
            results = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"cannot read {path} ({error}); was the run interrupted while writing it?") from None
        return cls(run_dir, results)

    @property
    def checkpoints(self) -> dict[str, str]:
        """{"best": path, "last": path} from results.json, else every .ckpt in checkpoints/ by file stem."""
        if self.results.get("checkpoints"):
            return dict(self.results["checkpoints"])
        return {path.stem: str(path) for path in sorted((self.run_dir / "checkpoints").glob("*.ckpt"))}

    @property
    def figures(self) -> dict[str, Path]:
        """{"curves": Path(".../curves.png"), ...}: the PNGs the Figures callback wrote."""
        return {path.stem: path for path in sorted(self.run_dir.glob("*.png"))}

    def accuracy(self, checkpoint: str = "best") -> Optional[float]:
        """Test accuracy in [0, 1] of "best", "last" or "final" (a test-only run); None if not tested."""
        return (self.results.get("test", {}).get(checkpoint) or {}).get("acc")

    def show(self, *names: str) -> None:
        """Displays the figures inline (all, or the named ones: run.show("curves", "confusion_matrix")); outside
        Jupyter it prints their paths."""
        figures = self.figures
        unknown = [name for name in names if name not in figures]
        if unknown:
            raise UserError(f"no figure {', '.join(unknown)} in {self.run_dir}; it has {', '.join(figures) or 'none'}")
        chosen = [figures[name] for name in names] if names else list(figures.values())
        if not _in_jupyter():
            print("\n".join(map(str, chosen)))
            return
        from IPython.display import Image, Markdown, display

        for path in chosen:
            display(Markdown(f"**{path.stem}** `{path}`"), Image(filename=str(path)))

    def predictions(self) -> list[dict]:
        """The rows of predictions.csv that `predict` wrote (index, target, pred, prob, target_name, pred_name)."""
        import csv

        path = self.run_dir / "predictions.csv"
        if not path.is_file():
            raise UserError(f"no predictions.csv in {self.run_dir}; api.predict(config, ckpt_path=...) writes one")
        with open(path, newline="", encoding="utf-8") as f:
            return [{**row, "index": int(row["index"]), "target": int(row["target"]), "pred": int(row["pred"]),
                     "prob": float(row["prob"])} for row in csv.DictReader(f)]

    def curves(self):
        """Train/val loss and accuracy against the step, from the run's event files (a matplotlib Figure)."""
        from callbacks.figures import read_scalars
        from visual.plots import curves

        scalars = read_scalars(str(self.run_dir))
        if not scalars:
            raise UserError(f"no train/val scalars in the event files of {self.run_dir}; was it fitted?")
        return curves(scalars, self.results.get("experiment") or self.run_dir.parent.name)

    def __repr__(self) -> str:
        accuracy = self.accuracy("best") if self.accuracy("best") is not None else self.accuracy("final")
        shown = f", test acc {accuracy:.4f}" if accuracy is not None else ""
        return f"Run({str(self.run_dir)!r}{shown})"


def _run(subcommand: str, configs: Sequence[PathLike], overrides: dict[str, Any]) -> Run:
    from callbacks.results import run_dir_of
    from cli import run_cli

    if not configs:
        raise UserError(f"{subcommand}() needs a config, e.g. {subcommand}(\"configs/quickstart.yaml\")")
    try:
        experiment = run_cli(command_line(subcommand, configs, overrides), from_api=True)  # a stop says api.fit(...)
    except Exception as error:
        found = user_error_in(error)
        if found is None or found is error:
            raise
        raise found from None  # the one line, not jsonargparse's wrapping of it
    run_dir = Path(run_dir_of(experiment.trainer))
    return Run.load(run_dir) if run_dir.is_dir() else Run(run_dir)  # fast_dev_run leaves no folder


def fit(config: PathLike, *overlays: PathLike, **overrides: Any) -> Run:
    """`python cli.py fit --config config --config overlay ... --key value ...`: trains, tests the best and the
    last checkpoint and returns the Run."""
    return _run("fit", (config, *overlays), overrides)


def test(config: PathLike, *overlays: PathLike, **overrides: Any) -> Run:
    """`python cli.py test ...`: a test-only run (CLIP zero-shot) or a checkpoint's (`ckpt_path=run.checkpoints
    ["best"]` with the run's config.yaml)."""
    return _run("test", (config, *overlays), overrides)


def predict(config: PathLike, *overlays: PathLike, **overrides: Any) -> Run:
    """`python cli.py predict ...`: every test image's prediction, in predictions.csv of a new run folder
    (`ckpt_path=run.checkpoints["best"]` with the run's config.yaml); `Run.predictions()` reads it."""
    return _run("predict", (config, *overlays), overrides)


test.__test__ = False  # pytest: not a test function when a test module imports it


class Markdown(str):
    """Markdown text that Jupyter renders (it is still a str: print it, write it to a file)."""

    def _repr_markdown_(self) -> str:
        return str(self)


def report(runs_or_dir: Union[PathLike, Run, Sequence[Run]], layout: str = "full") -> Markdown:
    """report.py's tables for a folder of runs (searched recursively) or for the given Runs."""
    from report import FIRST_RUN_HINT
    from reporting.layouts import LAYOUTS, render
    from reporting.runs import RunFileError, drop_retests, group_runs, load_runs, read_run

    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join(sorted(LAYOUTS))}")
    if isinstance(runs_or_dir, (str, os.PathLike)):
        runs, skipped = load_runs(Path(runs_or_dir))
        for path, reason in skipped:
            print(f"skipping {path}: {reason}")
    else:
        chosen = [runs_or_dir] if isinstance(runs_or_dir, Run) else list(runs_or_dir)
        try:
            runs = [read_run(run.run_dir / "results.json") for run in chosen]
        except RunFileError as error:
            raise UserError(f"a run has no readable results.json ({error}); was it tested?") from None
        runs, skipped = drop_retests(runs)
        for path, reason in skipped:
            print(f"skipping {path}: {reason}")
    if not runs:
        raise UserError(f"no results.json under {runs_or_dir}; {FIRST_RUN_HINT}")
    groups, _ = group_runs(runs)
    return Markdown(render(LAYOUTS[layout](groups)))


_show_figures_inline()
