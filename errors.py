"""Mistakes a user can fix, and turning any of them into one line for the terminal."""
import contextlib
import re
import sys
from typing import Optional


class UserError(Exception):
    """A configuration, data or path problem, with a message that says what to do."""


VALID_CLASSES = {
    "datamodules": "datamodules.DigitsDataModule, MNISTDataModule, FashionMNISTDataModule, CIFAR10DataModule, "
                   "CIFAR100DataModule, EMNISTDataModule",
    "lightning_modules": "lightning_modules.MLP, CNN, ScratchCNN, ResNet18, CLIPZeroShot",
}


def one_line_parse_error(message: str, subcommand: str = "fit") -> str:
    """Condenses jsonargparse's multi-line error (Union subtypes, usage) into one actionable line."""
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


def user_error_in(error: BaseException) -> Optional[BaseException]:
    """The UserError (or Lightning misconfiguration) behind an exception; jsonargparse wraps __init__ errors."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (UserError, MisconfigurationException)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class CommandInterrupted(Exception):
    """Ctrl-C, SIGTERM or SLURM's SIGUSR1 stopped a command; what could be saved was saved."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def one_line_errors():
    """The error boundary of every entry point: a UserError (however wrapped) becomes `error: <one line>` on
    stderr and exit status 2; an interrupted command prints its line and exits with its own status."""
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
        print(f"error: {found}", file=sys.stderr, flush=True)
        sys.exit(2)
