"""The table of one sweep: a row per setting (configs x grid values) with its seeds pooled, the grid keys as columns."""
import json

from .formatting import MISSING, fmt_percent, markdown_table
from .runs import Run


def _cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def sweep_table(points: list, runs: dict, columns: dict[str, str]) -> str:
    """`points`: sweep.Point objects in sweep order; `runs`: run folder -> Run of the finished ones;
    `columns`: grid key -> column name. Missing seeds are named in their own column."""
    settings: dict[tuple, list] = {}
    for point in points:
        settings.setdefault((point.config_name, json.dumps(point.values, sort_keys=True)), []).append(point)
    rows = []
    for (config_name, _), members in settings.items():
        done: list[Run] = [runs[p.run_dir] for p in members if p.run_dir in runs]
        missing = [str(p.seed) for p in members if p.run_dir not in runs]
        values = members[0].values
        rows.append([config_name, *(_cell(values[key]) if key in values else MISSING for key in columns),
                     ", ".join(str(run.seed) for run in done) or MISSING,
                     fmt_percent([run.test["acc"] for run in done if "acc" in run.test]),
                     fmt_percent([run.test["f1_macro"] for run in done if "f1_macro" in run.test]),
                     ", ".join(missing) or MISSING])
    return markdown_table(["Experiment", *columns.values(), "Seeds", "Test acc", "Macro F1", "Missing seeds"], rows)
