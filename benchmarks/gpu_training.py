"""Training throughput on a GPU: the CIFAR-10 fast CNN, and ResNet-18 at 224 in fp32 vs bf16-mixed + channels_last.

    python -m benchmarks.gpu_training                    # on a CUDA GPU; appends to benchmarks/RESULTS.md
    python -m benchmarks.gpu_training --device cpu --fast-samples 512 --resnet-batches 2 \
        --resnet-batch-size 8 --no-record    # a smoke test on a CPU

Every row is `cli.py fit` of the config users run (configs/cifar10_fast_cnn.yaml, configs/emnist_resnet18.yaml)
on synthetic uint8 data of the dataset's shape held in memory (no download), validation off, with the default
callbacks and logging on. "fit s" is the whole trainer.fit call; images/s is the steady state, timed from the
start of the second training batch to the end of the last (synchronised); peak memory is
torch.cuda.max_memory_allocated, reset before each run. The ResNet rows train every layer (the config's staged
unfreezing would train only fc in epoch 0) from random weights (`weights: null`; the speed is the same).
On a CPU the script runs (that is what the smoke test is for), but the figures mean nothing: bf16-mixed falls
back to 32-true there.
"""
import argparse
import tempfile
import time

import lightning.pytorch as pl
import torch

import cli
from benchmarks.common import cuda_peak, markdown_table, peak_rss_mb, report, reset_cuda_peak, sync
from benchmarks.input_pipeline import SyntheticData
from benchmarks.training_loop import SyntheticCIFAR10
from datamodules import EMNISTDataModule


class SyntheticEMNIST(SyntheticData, EMNISTDataModule):
    """EMNIST-shaped (28x28 gray, 62 classes) random data in memory."""


class SteadyState(pl.Callback):
    """Seconds and samples from the start of the second training batch to the end of the last one."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.seconds, self.samples = device, None, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1 and self.start is None:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.samples += len(batch[1])
            if batch_idx == trainer.num_training_batches - 1:
                sync(self.device)
                self.seconds = time.perf_counter() - self.start


def timed_fit(args: list[str], device: torch.device) -> tuple[float, float, str, tuple]:
    """(fit seconds, steady-state images/s, CUDA peak, input batch shape) of one `cli.py fit`."""
    with tempfile.TemporaryDirectory() as log_dir:
        run = cli.main([*args, "--trainer.accelerator", device.type, "--trainer.devices", "1",
                        "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0", "--log_dir", log_dir,
                        "--early_stopping.monitor", "train/loss", "--checkpoint.monitor", "train/loss",
                        "--figures.enabled", "false"], run=False)
        steady = SteadyState(device)
        run.trainer.callbacks.append(steady)
        run.datamodule.setup("fit")  # making the synthetic data is not training
        images, _ = next(iter(run.datamodule.train_dataloader()))
        shape = tuple(run.datamodule.transform(images[:1].to(device)).shape[1:])
        sync(device)
        reset_cuda_peak(device)
        start = time.perf_counter()
        run.trainer.fit(run.model, datamodule=run.datamodule)
        sync(device)
        return time.perf_counter() - start, steady.samples / max(steady.seconds, 1e-9), cuda_peak(device), shape


def main() -> None:
    cli.quiet_lightning_chatter()  # for the whole script: its fits run after cli.main(run=False) returned
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast-samples", type=int, default=45_000)  # a CIFAR-10 training split
    parser.add_argument("--resnet-batches", type=int, default=100)
    parser.add_argument("--resnet-batch-size", type=int, default=128)  # images at 224x224 per batch
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    SyntheticCIFAR10.samples = args.fast_samples
    SyntheticEMNIST.samples = args.resnet_batches * args.resnet_batch_size
    fast = ["--config", "configs/cifar10_fast_cnn.yaml", "--data", "benchmarks.training_loop.SyntheticCIFAR10",
            "--data.init_args.batch_size", "256"]
    resnet = ["--config", "configs/emnist_resnet18.yaml", "--data", "benchmarks.gpu_training.SyntheticEMNIST",
              "--data.init_args.split", "byclass", "--data.init_args.channels", "3", "--data.init_args.resize", "224",
              "--data.init_args.normalize", "imagenet", "--data.init_args.batch_size", str(args.resnet_batch_size),
              "--model.init_args.weights", "null", "--trainer.callbacks", "[]",
              "--trainer.limit_train_batches", str(args.resnet_batches)]
    cases = [
        ("CIFAR-10 fast CNN (64/128/256 residual), batch 256", "32-true", fast + ["--trainer.precision", "32-true"]),
        ("CIFAR-10 fast CNN (64/128/256 residual), batch 256", "bf16-mixed",
         fast + ["--trainer.precision", "bf16-mixed"]),
        (f"ResNet-18 at 224, EMNIST 62 classes, batch {args.resnet_batch_size}", "32-true",
         resnet + ["--trainer.precision", "32-true", "--model.init_args.channels_last", "false"]),
        (f"ResNet-18 at 224, EMNIST 62 classes, batch {args.resnet_batch_size}", "bf16-mixed + channels_last",
         resnet + ["--trainer.precision", "bf16-mixed", "--model.init_args.channels_last", "true"]),
    ]
    rows, speeds = [], {}
    for name, setting, case_args in cases:
        seconds, speed, peak, shape = timed_fit(case_args, device)
        speeds[(name, setting)] = speed
        base = speeds.get((name, "32-true"))
        rows.append([name, setting, "x".join(map(str, shape)), f"{seconds:.2f}", f"{speed:,.0f}",
                     f"{speed / base:.2f}x" if base else "-", peak])
    header = ["model", "precision", "input", "fit s (1 epoch)", "steady images/s", "vs 32-true", "CUDA max allocated"]
    report("GPU training throughput: fast CNN epoch, ResNet-18 fp32 vs bf16-mixed + channels_last",
           markdown_table(header, rows) + f"\n\nPeak RSS {peak_rss_mb():.0f} MB.", device,
           f"fast CNN: {args.fast_samples:,} images; ResNet: {args.resnet_batches} batches. No target: reported.",
           record=not args.no_record)


if __name__ == "__main__":
    main()
