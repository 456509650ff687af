"""Turn finished runs (logs/<experiment>/<version>/results.json) into the Markdown tables of a write-up.

    python report.py logs/ --out report.md
    python report.py logs/ --out report.md --layout cifar100              # the assignment's 5 sections, 7,500 chars
    python report.py logs/ --out report.md --layout cifar100 --char-limit 6000
    python report.py logs/ --out report.md --figures figures/             # copy every run's PNGs beside the report

Seeds of one experiment are pooled: cells read 'mean ± std (n=3)' (sample std). Images never go into the
Markdown; --figures copies them to DIR/<experiment>_<version>_<name>.png.
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from errors import one_line_errors
from reporting.layouts import CIFAR100_CHAR_LIMIT, LAYOUTS, render
from reporting.runs import Run, group_runs, load_runs

FIRST_RUN_HINT = "run python cli.py fit --config configs/quickstart.yaml first"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", help="folder searched recursively for results.json files (e.g. logs/)")
    parser.add_argument("--out", default="report.md", help="Markdown file to write (default: report.md)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="full",
                        help="full: every table; cifar100: the CIFAR-100 assignment's five sections with prose prompts")
    parser.add_argument("--char-limit", type=int, default=None, metavar="N",
                        help=f"character budget of the report (default: {CIFAR100_CHAR_LIMIT} with --layout cifar100, "
                             "none otherwise)")
    parser.add_argument("--figures", type=Path, default=None, metavar="DIR",
                        help="copy the *.png of every run directory to DIR/<experiment>_<version>_<name>.png")
    args = parser.parse_args(argv)
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


@one_line_errors()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs, skipped = load_runs(Path(args.logs))
    for path, reason in skipped:
        print(f"skipping {path}: {reason}", file=sys.stderr)
    if not runs:
        unreadable = f" readable (skipped {len(skipped)})" if skipped else ""
        print(f"error: no{unreadable} results.json under {args.logs} — {FIRST_RUN_HINT}", file=sys.stderr)
        return 2
    groups, superseded = group_runs(runs)
    for old, new in superseded:
        print(f"note: {old.path} is superseded by {new.path} (same experiment and seed; the later run counts)",
              file=sys.stderr)

    blocks = LAYOUTS[args.layout](groups)
    text = render(blocks)
    out = Path(args.out)
    try:
        write_atomic(out, text)
    except OSError as error:
        print(f"error: cannot write {out}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(f"read {len(runs)} runs ({len(groups)} experiments, {len(skipped)} skipped) from {args.logs}; "
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
