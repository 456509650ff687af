"""Checkpoint writes that survive a full disk: a temp file beside the target, renamed into place when complete."""
import contextlib
import glob
import io
import os
import shutil

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from errors import disk_error


class SafeCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes a local checkpoint next to its target and renames it; a failed write is one line.

    Lightning's own write (fsspec's transaction) puts the temp file in the system temp folder and copies it over the
    target, which on another file system is no rename: a disk that fills mid-copy truncated the target (an earlier
    last.ckpt) and the error was an OSError traceback."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec's transaction
        path = os.path.abspath(path)
        folder = os.path.dirname(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialised before anything touches the disk
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")  # hidden, one per process
            with open(tmp, "wb") as f:  # the umask's permissions, as Lightning's files had
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())  # the bytes are on the disk before the name points at them
            os.replace(tmp, path)
        except OSError as error:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            raise disk_error(error, f"the checkpoint {os.path.basename(path)}", folder, resume_hint(folder)) from error

    def link_checkpoint(self, source: str, path: str) -> None:
        """`path` becomes another name of the finished checkpoint file `source` (a hard link; a copy where the file
        system has none), swapped in by a rename like a save. Safe because no checkpoint is ever written in place:
        a later save of either name makes a new file and leaves the other name's file as it was."""
        path, folder = os.path.abspath(path), os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
        try:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            try:
                os.link(source, tmp)
            except OSError:  # no hard links here (some network or FAT file systems), or another device
                shutil.copyfile(source, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise disk_error(error, f"the checkpoint {os.path.basename(path)}", folder, resume_hint(folder)) from error


def resume_hint(folder: str) -> str:
    """How to continue from the newest complete checkpoint in `folder` (checkpoints/ or the run directory)."""
    # the newest; last.ckpt among files as new (it may be a hard link to the best checkpoint of the same step)
    saved = sorted(glob.glob(os.path.join(folder, "*.ckpt")),
                   key=lambda path: (os.path.getmtime(path), os.path.basename(path).startswith("last")))
    if not saved:
        return "run the command again"
    run_dir = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
    return f"resume: python cli.py fit --config {run_dir}/config.yaml --ckpt_path {saved[-1]}"
