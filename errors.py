"""Mistakes a user can fix, and turning any of them into one line for the terminal."""
import contextlib
import errno
import itertools
import math
import os
import re
import sys
import threading
from typing import Optional

from jsonargparse.typing import register_type


class UserError(Exception):
    """A configuration, data or path problem, with a message that says what to do. `every_rank`: each DDP rank
    meets this very mistake at the same point (a config checked after the ranks started), so only rank 0 says it."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


def number_range(name: str, base: type, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> type:
    """A config type: a finite int or float in a range. jsonargparse checks it while parsing, before anything is
    built or loaded, and hands __init__ a plain int/float (a jsonargparse.typing object would be pickled into the
    checkpoint's hyperparameters, which a weights_only load then refuses)."""
    show = lambda bound, infinite: infinite if bound is None else f"{base(bound):g}" if base is float else str(bound)
    bounds = ("(" if low_open else "[") + show(low, "-inf") + ", " + show(high, "inf") + \
        (")" if high_open or high is None else "]")
    kind = "an integer" if base is int else "a number"
    valid = f"{kind} in {bounds}"

    def check(value):
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            number = base(float(value)) if base is int and isinstance(value, float) else base(value)
            if base is int and float(value) != number or not math.isfinite(number):
                raise ValueError
        except ValueError:
            raise ValueError(f"{value} is out of range: expected {valid}") from None
        too_low = low is not None and (number <= low if low_open else number < low)
        too_high = high is not None and (number >= high if high_open else number > high)
        if too_low or too_high:
            raise ValueError(f"{value} is out of range: expected {valid}")
        return number

    range_type = type(name, (base,), {"__doc__": valid, "check": staticmethod(check), "low": low, "high": high,
                                      "low_open": low_open, "high_open": high_open})
    register_type(range_type, serializer=base, deserializer=check, type_check=lambda value, type_: False)
    return range_type


PositiveInt = number_range("PositiveInt", int, 0, low_open=True)
NonNegativeInt = number_range("NonNegativeInt", int, 0)
PositiveFloat = number_range("PositiveFloat", float, 0, low_open=True)
NonNegativeFloat = number_range("NonNegativeFloat", float, 0)
Probability = number_range("Probability", float, 0, 1)  # label smoothing
BelowOne = number_range("BelowOne", float, 0, 1, high_open=True)  # dropout, momentum: 1 zeroes or never decays
Fraction = number_range("Fraction", float, 0, 1, low_open=True)  # a share of a whole, e.g. a crop's area


# Numbers of the Lightning classes configured as sections, whose signatures we do not own: jsonargparse only
# checks their types, and Lightning lets these through (or fails later with a traceback)
SECTION_NUMBERS = {
    "trainer": {"accumulate_grad_batches": PositiveInt, "check_val_every_n_epoch": PositiveInt,
                "log_every_n_steps": PositiveInt, "num_nodes": PositiveInt, "min_epochs": NonNegativeInt,
                "min_steps": NonNegativeInt, "gradient_clip_val": NonNegativeFloat},
    "early_stopping": {"patience": NonNegativeInt, "min_delta": NonNegativeFloat},
}


def check_section_numbers(config) -> None:
    """Checks SECTION_NUMBERS, trainer.max_epochs (-1: no limit) and trainer.devices (-1: all) in a parsed config."""
    for section, ranges in SECTION_NUMBERS.items():
        values = config.get(section) or {}
        for key, range_type in ranges.items():
            if values.get(key) is not None:
                try:
                    range_type.check(values[key])
                except ValueError as error:
                    raise UserError(f"{section}.{key}={error}") from None
    trainer = config.get("trainer") or {}
    for key, kind in (("max_epochs", "no limit"), ("devices", "all")):
        value = trainer.get(key)
        if isinstance(value, str) and value.lstrip("-").isdigit():  # devices: "2" is a str to jsonargparse
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1 and value != -1:
            raise UserError(f"trainer.{key}={value} is out of range: expected -1 ({kind}) or an integer in (0, inf)")


def bad_value_error(message: str) -> Optional[str]:
    """`<option>=<value> is out of range: expected ...` from jsonargparse's error about a number_range or Literal
    option (nested in Union and subclass blocks); None for any other parser error."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    lines = message.splitlines()
    start = max((i for i, line in enumerate(lines) if 'Parser key "' in line), default=0)
    depth = len(lines[start]) - len(lines[start].lstrip())
    block = [lines[start]] + list(itertools.takewhile(lambda line: len(line) - len(line.lstrip()) > depth,
                                                      lines[start + 1:]))
    inner = "\n".join(block)  # the innermost key's own lines, not its parents' (a model may also be null)
    expected = [found.strip() for found in re.findall(r"is out of range: expected ([^\n]+)", inner)]
    ranged = bool(expected)
    expected += re.findall(r"Expected a typing\.Literal\[(.*?)\]", inner)  # the choices, e.g. 'adamw', 'adam'
    if not expected:
        return None
    if "Expected a <class 'NoneType'>" in inner:
        expected.append("null")
    value = re.search(r"(?:Got value|Given value): ([^\n]+)", inner) or re.search(r"(\S+) is out of range", inner)
    option = keys[0] if keys else "option"
    for key in keys[1:]:  # a subclass's own key, reported inside its parent's ("model" then "lr")
        option = key if key.startswith(option + ".") else f"{option}.init_args.{key}"
    problem = "is out of range" if ranged else "is not accepted"
    return f"{option}={value.group(1).strip()} {problem}: expected {' or '.join(dict.fromkeys(expected))}"


VALID_CLASSES = {
    "datamodules": "datamodules.DigitsDataModule, MNISTDataModule, FashionMNISTDataModule, CIFAR10DataModule, "
                   "CIFAR100DataModule, EMNISTDataModule",
    "lightning_modules": "lightning_modules.MLP, CNN, ScratchCNN, ResNet18, CLIPZeroShot",
}


def one_line_parse_error(message: str, subcommand: str = "fit") -> str:
    """Condenses jsonargparse's multi-line error (Union subtypes, usage) into one actionable line."""
    bad_value = bad_value_error(message)
    if bad_value:
        return bad_value
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    head = lines[0] if lines else message
    key = re.search(r'Parser key "([^"]+)"', head)
    problem = next((i for i, line in enumerate(lines) if line.startswith("- Problem with given class_path")), None)
    if problem is not None:
        class_path = re.search(r"class_path '([^']+)'", lines[problem]).group(1)
        details = []
        for line in lines[problem + 1:]:
            if line.startswith("- ") or line.startswith("Given value"):
                break
            details.append(line.rstrip(":"))
        where = key.group(1) if key else "config"
        package = class_path.split(".")[0]
        if any("has no attribute" in d or "No module named" in d for d in details):
            text = f"{where}: unknown class_path '{class_path}'"
            return text + (f"; valid ones: {VALID_CLASSES[package]}" if package in VALID_CLASSES else "")
        text = f"{where}: {': '.join(details)}"
        return f"{text}; see python cli.py {subcommand} --help for the accepted keys"
    head = head.replace(f"Subcommand '{subcommand}' does not accept option", "unknown config key")
    detail = next((line for line in lines[1:] if line.startswith("- ")), "")
    text = f"{head} {detail}".strip()
    return f"{text}; see python cli.py {subcommand} --help for the accepted keys"


def written_path(error: OSError) -> Optional[str]:
    """The file a failed write was for: the error's filename, else the innermost `filename`/`path` argument on its
    traceback (a write() or close() error has no filename; TensorBoard's writer thread hands its error on bare)."""
    found, frames = error.filename, error.__traceback__
    while error.filename is None and frames is not None:
        for name in ("filename", "path", "filepath"):
            value = frames.tb_frame.f_locals.get(name)
            if isinstance(value, (str, bytes, os.PathLike)):  # TensorBoard's gfile passes bytes
                found = value
        frames = frames.tb_next
    return os.path.abspath(os.fsdecode(found)) if found is not None else None


def user_error_in(error: BaseException) -> Optional[BaseException]:
    """The UserError (or Lightning misconfiguration) behind an exception; jsonargparse wraps __init__ errors."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (UserError, MisconfigurationException)):
            return error
        if isinstance(error, OSError) and error.errno in DISK_FULL:  # a write nobody wrapped: events, figures
            path = written_path(error)
            return disk_error(error, os.path.basename(path) if path else "a file",
                              os.path.dirname(path) if path else "the log directory (--log_dir)")
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # a write failed for want of space or a writable disk


def disk_error(error: OSError, what: str, folder: str, then: str = "run the command again") -> UserError:
    """The one line for a write that failed (full disk, quota, read-only or unwritable folder)."""
    reason = error.strerror or type(error).__name__
    return UserError(f"cannot write {what} in {folder} ({reason}); free space there or make it writable, then {then}")


class CommandInterrupted(Exception):
    """Ctrl-C, SIGTERM or SLURM's SIGUSR1 stopped a command; what could be saved was saved."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def _global_rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only  # set by Lightning once the ranks started

    return getattr(rank_zero_only, "rank", 0)


def _thread_errors(args) -> None:
    """A writer thread's full disk is reported by the main thread (TensorBoard re-raises it there), not twice."""
    if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in DISK_FULL):
        threading.__excepthook__(args)


@contextlib.contextmanager
def one_line_errors():
    """The error boundary of every entry point: a UserError (however wrapped) becomes `error: <one line>` on
    stderr and exit status 2; an interrupted command prints its line and exits with its own status; a full disk
    in a writer thread is left to the main thread, which reports it (one line, not a thread traceback too)."""
    threading.excepthook = _thread_errors
    try:
        yield
    except CommandInterrupted as interrupted:
        print(str(interrupted), file=sys.stderr, flush=True)
        sys.exit(interrupted.exit_code)
    except KeyboardInterrupt:  # Ctrl-C in an entry point without a safe point to reach (report, figures, ...)
        print("interrupted by SIGINT", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as error:
        found = user_error_in(error)
        if found is None:
            raise
        if not (getattr(found, "every_rank", False) and _global_rank() > 0):  # else rank 0 says the same line
            print(f"error: {found}", file=sys.stderr, flush=True)
        sys.exit(2)
