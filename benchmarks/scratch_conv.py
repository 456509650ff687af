"""Scratch Conv2d forward+backward and a scratch training epoch against torch with autograd.

Example:
    python -m benchmarks.scratch_conv                 # CPU; prints the table, appends it to benchmarks/RESULTS.md
    python -m benchmarks.scratch_conv --device cuda --no-record

Both sides do the same work: the torch input has requires_grad=True so autograd also computes
the input gradient, as our backward always does (in the epoch, torch skips the first conv's
input gradient, which the images do not need; ours computes it). Ours and torch's runs
alternate, so machine noise hits both alike; times are medians after warmup.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import scratch
from benchmarks import common
from benchmarks.common import sync
from scratch.models import mnist_cnn

# (name, batch, in_channels, size, out_channels, padding); kernel 3x3, stride 1
CONV_SHAPES = [
    ("MNIST conv1", 64, 1, 28, 8, 0),
    ("MNIST conv2", 64, 8, 13, 16, 0),  # 13 = (28 - 2) // 2 after conv1 and the 2x2 pool
    ("CIFAR conv1", 128, 3, 32, 32, 1),
    ("CIFAR conv2", 128, 32, 32, 64, 1),
]


def paired_times(ours, theirs, device, repeats: int, warmup_s: float) -> tuple[list[float], list[float]]:
    """Seconds per call of each callable, timed alternately (order swapped every repeat) after warmup_s of both."""
    start = time.perf_counter()
    ours(), theirs()  # at least once: first calls allocate, build kernels and wake threads
    while time.perf_counter() - start < warmup_s:  # then by time, not count, so every shape gets settled
        ours(), theirs()
    times = {ours: [], theirs: []}
    for repeat in range(repeats):
        for fn in (ours, theirs) if repeat % 2 == 0 else (theirs, ours):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[fn].append(time.perf_counter() - start)
    return times[ours], times[theirs]


def bench_conv(batch, in_channels, size, out_channels, padding, device, repeats, warmup_s):
    torch_conv = nn.Conv2d(in_channels, out_channels, 3, padding=padding, device=device)
    our_conv = scratch.Conv2d(in_channels, out_channels, 3, padding=padding, device=device)
    our_conv.load_state_dict(torch_conv.state_dict())
    x = torch.randn(batch, in_channels, size, size, device=device)  # (B, C, H, W)
    x_leaf = x.clone().requires_grad_()  # autograd then also computes the input gradient, as ours does
    dy = torch.randn_like(torch_conv(x))  # (B, O, Ho, Wo)

    def ours():
        our_conv.weight.grad = our_conv.bias.grad = None
        our_conv(x)
        our_conv.backward(dy)

    def theirs():
        torch_conv.zero_grad()
        x_leaf.grad = None
        torch_conv(x_leaf).backward(dy)

    return paired_times(ours, theirs, device, repeats, warmup_s)


def bench_epoch(images: int, batch: int, device, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per SGD epoch over synthetic MNIST-shaped data, ours and torch's."""
    x = torch.randn(images, 1, 28, 28, device=device)  # (N, 1, 28, 28)
    y = torch.randint(0, 10, (images,), device=device)  # (N,)
    torch_model = mnist_cnn(nn).to(device)
    our_model = mnist_cnn(scratch).to(device)
    our_model.load_state_dict(torch_model.state_dict())
    torch_opt = torch.optim.SGD(torch_model.parameters(), lr=0.01, momentum=0.9)
    our_opt = scratch.SGD(our_model.parameters(), lr=0.01, momentum=0.9)
    torch_loss, our_loss = nn.CrossEntropyLoss(), scratch.CrossEntropyLoss()

    def ours():
        for start in range(0, images, batch):
            our_opt.zero_grad()
            our_loss(our_model(x[start : start + batch]), y[start : start + batch])
            our_model.backward(our_loss.backward())
            our_opt.step()

    def theirs():
        for start in range(0, images, batch):
            torch_opt.zero_grad()
            torch_loss(torch_model(x[start : start + batch]), y[start : start + batch]).backward()
            torch_opt.step()

    return paired_times(ours, theirs, device, repeats, warmup_s=0)  # 0: one warmup epoch each


def summary(ours: list[float], theirs: list[float], show) -> str:
    """'median | median | ratio | best, best; ratio' cells; show turns seconds into the unit printed."""
    cells = []
    for pick in (statistics.median, min):
        ours_s, theirs_s = pick(ours), pick(theirs)
        cells.append((f"{show(ours_s):,.2f}", f"{show(theirs_s):,.2f}", f"{ours_s / theirs_s:.2f}"))
    (ours_med, theirs_med, ratio_med), (ours_min, theirs_min, ratio_min) = cells
    return f"{ours_med} | {theirs_med} | {ratio_med} | {ours_min}, {theirs_min}; {ratio_min}"


def hardware(device: torch.device) -> str:
    return f"{common.hardware(device)}, {torch.get_num_threads()} torch thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=51, help="timed repeats per conv shape (median reported)")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="seconds of untimed runs per shape first")
    parser.add_argument("--images", type=int, default=10_000, help="synthetic images in the training epoch")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per side (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_at_start = os.getloadavg()[0]  # other jobs on the machine skew timings; recorded with them

    # medians as the headline; minimums too, since other jobs on a shared machine only ever add time
    rows = [
        "| Conv2d forward+backward | input -> output | ours ms | torch ms | ratio ours/torch | min: ours, torch ms; ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, batch, in_channels, size, out_channels, padding in CONV_SHAPES:
        shape = (batch, in_channels, size, out_channels, padding)
        ours, theirs = bench_conv(*shape, device, args.repeats, args.warmup_s)
        out_size = size + 2 * padding - 2  # 3x3 kernel, stride 1
        shapes = f"{batch}x{in_channels}x{size}x{size} -> {batch}x{out_channels}x{out_size}x{out_size}, pad {padding}"
        rows.append(f"| {name} | {shapes} | {summary(ours, theirs, lambda s: s * 1e3)} |")
    ours, theirs = bench_epoch(args.images, 64, device, args.epochs)
    rows += [
        "",
        "| training epoch: MNIST CNN, batch 64, SGD momentum 0.9 | ours img/s | torch img/s | ratio ours/torch "
        "(time) | max: ours, torch img/s; ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| {args.images} 1x28x28 synthetic images | {summary(ours, theirs, lambda s: args.images / s)} |",
    ]
    command = "python -m benchmarks.scratch_conv" + "".join(f" {arg}" for arg in sys.argv[1:])
    header = [
        f"## Scratch Conv2d vs nn.Conv2d + autograd ({datetime.date.today().isoformat()})",
        "",
        f"- command: `{command}`",
        f"- device: {device.type}; hardware: {hardware(device)}; 1-min load average at start {load_at_start:.1f}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- forward+backward: median of {args.repeats} alternating repeats after {args.warmup_s} s of warmup; "
        f"epoch: median of {args.epochs} alternating epochs after one warmup epoch each",
        "",
    ]
    report = "\n".join(header + rows) + "\n"
    print(report)
    if not args.no_record:
        path = os.path.join(os.path.dirname(__file__), "RESULTS.md")
        new_file = not os.path.exists(path)
        with open(path, "a") as results:
            results.write(("# Benchmark results\n" if new_file else "") + "\n" + report)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
