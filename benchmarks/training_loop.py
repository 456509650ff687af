"""Training-loop overhead: one epoch of the CIFAR CNN through our Lightning fit vs a plain PyTorch loop.

    python -m benchmarks.training_loop                     # appends to benchmarks/RESULTS.md
    python -m benchmarks.training_loop --samples 10000 --repeats 1 --no-record

Same model (configs/cifar10_cnn.yaml, the 12/24/48 ConvNet), same synthetic CIFAR-shaped uint8 batches
from our loader, same optimizer and schedule. Ours is `cli.py fit` with the default callbacks
(checkpointing, early stopping, efficiency, results, non-finite guard, progress bar) and TensorBoard
logging on; validation is off in both so only the training epoch is timed. The baseline is the course
notebook's loop: zero_grad / forward / loss / backward / step.
"""
import argparse
import tempfile
import time
from statistics import median

import torch

import cli
from benchmarks.common import cuda_peak, markdown_table, peak_rss_mb, report, reset_cuda_peak, sync
from benchmarks.input_pipeline import SyntheticData
from datamodules import CIFAR10DataModule


class SyntheticCIFAR10(SyntheticData, CIFAR10DataModule):
    """CIFAR-10-shaped random data in memory."""


def build(log_dir: str, device: str, epochs: int):
    return cli.main(["--config", "configs/cifar10_cnn.yaml", "--data", "benchmarks.training_loop.SyntheticCIFAR10",
                     "--data.init_args.batch_size", "128", "--data.init_args.augment", "false",
                     "--trainer.max_epochs", str(epochs), "--trainer.limit_val_batches", "0",
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
            images, labels = dm.transform(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=45_000)  # a CIFAR-10 training split after a 5k val split
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    SyntheticCIFAR10.samples = args.samples
    device = torch.device(args.device)
    ours, theirs, ratios = [], [], []
    with tempfile.TemporaryDirectory() as log_dir:
        for repeat in range(args.repeats + 1):  # the first pair warms up caches and kernels, not timed
            pair = {}
            for side in (("plain", "fit") if repeat % 2 else ("fit", "plain")):  # alternate who goes first
                torch.manual_seed(repeat)
                run = build(log_dir, device.type, args.epochs)
                run.datamodule.setup("fit")  # making the synthetic data is not training: untimed on both sides
                if side == "plain":
                    pair[side] = plain_loop(run, device, args.epochs)
                    continue
                sync(device)
                reset_cuda_peak(device)
                start = time.perf_counter()  # the whole trainer.fit call: setup, summary, checkpoint included
                run.trainer.fit(run.model, datamodule=run.datamodule)
                sync(device)
                pair[side] = time.perf_counter() - start
                peak = cuda_peak(device)
            if repeat:
                ours.append(pair["fit"]), theirs.append(pair["plain"]), ratios.append(pair["fit"] / pair["plain"])
    ours_s, theirs_s = median(ours), median(theirs)
    images = args.samples * args.epochs
    rows = [["CIFAR CNN 12/24/48, batch 128", f"{args.samples:,} x {args.epochs}", f"{ours_s:.2f}",
             f"{theirs_s:.2f}", f"{median(ratios):.2f}", f"{images / ours_s:,.0f}", f"{images / theirs_s:,.0f}",
             f"{peak_rss_mb():.0f} MB", peak]]
    header = ["model", "samples x epochs", "ours fit s", "plain loop s", "time ratio", "ours img/s",
              "plain img/s", "peak RSS", "CUDA max allocated (ours)"]
    report("Training-loop overhead: Lightning fit vs a plain PyTorch loop", markdown_table(header, rows), device,
           f"Medians of {args.repeats} pairs run back to back, alternating which side goes first; the time ratio is "
           f"the median of the pairs' ratios (per pair: {', '.join(f'{r:.3f}' for r in ratios)}), so a drift in "
           "machine speed between pairs cancels. Target: time ratio <= 1.10.", record=not args.no_record)


if __name__ == "__main__":
    main()
