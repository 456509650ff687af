"""Shared by the benchmarks: hardware description, tables, and appending to benchmarks/RESULTS.md."""
import datetime
import math
import os
import platform
import resource
import shlex
import sys
from typing import Optional

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores"
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak(device: torch.device) -> str:
    """torch.cuda.max_memory_allocated since the last reset_cuda_peak, or "-" off a GPU."""
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB" if device.type == "cuda" else "-"


def median_interval(values: list[float], confidence: float = 0.95) -> Optional[tuple[float, float]]:
    """A distribution-free confidence interval for the median of `values` (order statistics of the sorted values,
    from the binomial distribution of how many fall below the median; no assumption on the noise's shape).
    None when there are too few values for that confidence (5 values give at most 94%)."""
    n, ordered = len(values), sorted(values)
    below = 0.0  # P(fewer than k of n values below the median), k = 0, 1, ...
    for k in range(n // 2 + 1):
        next_below = below + math.comb(n, k) / 2 ** n
        if next_below > (1 - confidence) / 2:
            return (ordered[k - 1], ordered[n - k]) if k else None
        below = next_below
    return None


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, table: str, device: torch.device, notes: str = "", record: bool = True) -> None:
    """Prints the table; appends it with the exact command, hardware, torch version and date."""
    command = "python -m " + " ".join([__import__("__main__").__spec__.name] + [shlex.quote(a) for a in sys.argv[1:]])
    header = (f"## {title}\n\n`{command}` — {hardware(device)}, device {device}, torch {torch.__version__}, "
              f"{datetime.date.today().isoformat()}\n")
    text = f"{header}\n{table}\n" + (f"\n{notes}\n" if notes else "")
    print(text)
    if record:
        new = not os.path.exists(RESULTS)
        with open(RESULTS, "a") as f:
            f.write(("# Benchmark results\n\n" if new else "\n") + text)
