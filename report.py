"""Turn finished runs (logs/<experiment>/<version>/results.json) into the Markdown tables of a write-up.

    python report.py logs/ --out report.md
    python report.py logs/ --out report.md --layout cifar100              # the assignment's 5 sections, 7,500 chars
    python report.py logs/ --out report.md --layout cifar100 --char-limit 6000
    python report.py logs/ --out report.md --figures figures/             # copy every run's PNGs beside the report
    python report.py --sweep sweeps/lr_width.yaml --out lr_width.md       # one sweep: its points, the missing named

Seeds of one experiment are pooled: cells read 'mean ± std (n=3)' (sample std). Images never go into the
Markdown; --figures copies them to DIR/<experiment>_<version>_<name>.png.
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from errors import UserError, one_line_errors
from reporting.layouts import CIFAR100_CHAR_LIMIT, LAYOUTS, Block, render
from reporting.runs import Run, RunFileError, group_runs, load_runs, read_run
from reporting.sweeps import sweep_table

FIRST_RUN_HINT = "run python cli.py fit --config configs/quickstart.yaml first"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="?", help="folder searched recursively for results.json files (e.g. logs/)")
    parser.add_argument("--sweep", metavar="FILE", help="report exactly the points of this sweep file "
                        "(sweeps/*.yaml) from their run folders, seeds pooled, and name the missing ones")
    parser.add_argument("--out", default="report.md", help="Markdown file to write (default: report.md)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="full",
                        help="full: every table; cifar100: the CIFAR-100 assignment's five sections with prose prompts")
    parser.add_argument("--char-limit", type=int, default=None, metavar="N",
                        help=f"character budget of the report (default: {CIFAR100_CHAR_LIMIT} with --layout cifar100, "
                             "none otherwise)")
    parser.add_argument("--figures", type=Path, default=None, metavar="DIR",
                        help="copy the *.png of every run directory to DIR/<experiment>_<version>_<name>.png")
    args = parser.parse_args(argv)
    if (args.logs is None) == (args.sweep is None):
        parser.error("give a logs folder or --sweep FILE (one of the two)")
    if args.char_limit is not None and args.char_limit <= 0:
        parser.error(f"--char-limit must be a positive number of characters, got {args.char_limit}")
    return args


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file beside `path`, so a failure never leaves a half-written report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; a report is an ordinary file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def copy_figures(runs: list[Run], folder: Path) -> list[Path]:
    """Copy each run directory's *.png to folder/<experiment>_<version>_<name>.png; returns the copies."""
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for run in runs:
        prefix = f"{run.experiment}_{run.version}".replace(os.sep, "_")
        for png in sorted(run.path.parent.glob("*.png")):
            target = folder / f"{prefix}_{png.name}"
            shutil.copyfile(png, target)
            copied.append(target)
    return copied


def report_char_budget(blocks, text: str, limit: int) -> None:
    """Print the character count and what is left for prose; warn when the tables alone are over."""
    fixed = len(render(blocks, with_prompts=False))  # headings and tables: everything but the prompts
    print(f"characters: {len(text):,} with prompts, {fixed:,} in headings and tables; "
          f"{limit - fixed:,} of {limit:,} left for prose")
    if fixed > limit:
        print(f"warning: the headings and tables alone are {fixed:,} characters, over the {limit:,} limit "
              f"by {fixed - limit:,}; drop runs from the folder or shorten the tables before writing prose",
              file=sys.stderr)


def load_sweep_runs(path: str) -> tuple[list[Run], list[tuple[Path, str]], Block]:
    """The finished points of a sweep, the unreadable ones, and the sweep's table; names the missing on stderr."""
    import sweep  # the sweep file's points and their run folders, as sweep.py runs them

    points = sweep.load_sweep(path)
    found, skipped = {}, []
    for point in points:
        results = point.run_dir / "results.json"
        try:
            if results.is_file():
                found[point.run_dir] = read_run(results)
        except RunFileError as error:
            skipped.append((results, str(error)))
    missing = [point for point in points if point.run_dir not in found]
    for point in missing:
        print(f"missing: point {point.index} {point.run_dir} ({point.state()})", file=sys.stderr)
    if missing:
        print(f"{len(missing)} of {len(points)} points missing: python sweep.py {path} runs them", file=sys.stderr)
    keys = list(dict.fromkeys(key for point in points for key in point.values))
    table = sweep_table(points, found, sweep.short_keys(keys))
    return list(found.values()), skipped, Block(f"## Sweep {points[0].sweep}\n\n{table}")


@one_line_errors()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sweep_block = None
    if args.sweep:
        try:
            runs, skipped, sweep_block = load_sweep_runs(args.sweep)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    else:
        runs, skipped = load_runs(Path(args.logs))
    for path, reason in skipped:
        print(f"skipping {path}: {reason}", file=sys.stderr)
    if not runs:
        unreadable = f" readable (skipped {len(skipped)})" if skipped else ""
        hint = f"run python sweep.py {args.sweep} first" if args.sweep else FIRST_RUN_HINT
        print(f"error: no{unreadable} results.json under {args.sweep or args.logs} — {hint}", file=sys.stderr)
        return 2
    groups, superseded = group_runs(runs)
    for old, new in superseded:
        print(f"note: {old.path} is superseded by {new.path} (same experiment and seed; the later run counts)",
              file=sys.stderr)

    blocks = LAYOUTS[args.layout](groups)
    if sweep_block is not None and args.layout == "full":  # the cifar100 layout pools seeds in its own tables
        blocks.insert(2, sweep_block)
    text = render(blocks)
    out = Path(args.out)
    try:
        write_atomic(out, text)
    except OSError as error:
        print(f"error: cannot write {out}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(f"read {len(runs)} runs ({len(groups)} experiments, {len(skipped)} skipped) from {args.sweep or args.logs}; "
          f"wrote {out} ({args.layout} layout)")
    limit = args.char_limit or (CIFAR100_CHAR_LIMIT if args.layout == "cifar100" else None)
    if limit:
        report_char_budget(blocks, text, limit)

    if args.figures is not None:
        try:
            copied = copy_figures(runs, args.figures)
        except OSError as error:
            print(f"error: cannot copy figures to {args.figures}: {error}", file=sys.stderr)
            return 2
        print(f"copied {len(copied)} figures to {args.figures}" + (":" if copied else " (no *.png in the run dirs)"))
        for path in copied:
            print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
