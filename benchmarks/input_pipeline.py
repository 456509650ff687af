"""Input pipelines: ours (uint8 batches, device-side per-sample augmentation) vs the course notebook's.

    python -m benchmarks.input_pipeline                  # both cases, appends to benchmarks/RESULTS.md
    python -m benchmarks.input_pipeline --case cifar --batches 100 --no-record

cifar:  50,000 x 3x32x32 uint8, training batches of 128. Ours: BatchLoader + random crop (4-px padding)
        + flip + normalize on the device. Baseline: RandomCrop(32, padding=4), RandomHorizontalFlip,
        ToTensor, Normalize on PIL images, DataLoader(num_workers=2), then .to(device).
emnist: 28x28 gray -> 3x224x224 normalized. Ours: BatchLoader + resize + gray->RGB + normalize on the
        device. Baseline: Resize(224), Grayscale(3), ToTensor, Normalize on PIL with as many workers as
        CPU cores.
Both pipelines yield the same shapes; the timing covers only iterating the batches onto the device.
"""
import argparse
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from benchmarks.common import markdown_table, peak_rss_mb, report, sync
from datamodules import CIFAR10DataModule, EMNISTDataModule
from datamodules.loader import TensorBatches


class PILDataset(Dataset):
    """What a notebook does: one PIL image and one transform call per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def synthetic(datamodule, n: int, seed: int = 0):
    """Random uint8 data of the dataset's shape, installed as the datamodule's training split."""
    g = torch.Generator().manual_seed(seed)
    c, s = datamodule.native_channels, datamodule.native_size
    images = torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, datamodule.num_classes, (n,), generator=g)
    datamodule.splits = {"train": TensorBatches(images, labels)}
    datamodule.mean, datamodule.std = datamodule._statistics(images)
    return images, labels


class SyntheticData:
    """Mixin for a datamodule class: random data of its dataset's shape in memory instead of files (benchmarks
    need no download); `samples` images, the same ones as train, val and test."""

    samples = 10_000

    def is_present(self) -> bool:
        return True

    def setup(self, stage=None) -> None:
        if "train" not in self.splits:
            synthetic(self, self.samples)
            self.splits["val"] = self.splits["test"] = self.splits["train"]


def time_batches(batches, n_batches: int, device, step) -> float:
    """Seconds for n_batches after 3 warmup batches; `step` moves one batch to the device and finishes it."""
    iterator = iter(batches)
    for _ in range(3):
        step(next(iterator))
    sync(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        step(next(iterator))
    sync(device)
    return time.perf_counter() - start


def run_case(case: str, n_batches: int, device: torch.device, batch_size: int, repeats: int = 5):
    if case == "cifar":
        dm = CIFAR10DataModule(batch_size=batch_size)
        images, labels = synthetic(dm, 50_000)
        pil = images.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3) as torchvision's CIFAR10 keeps it
        baseline_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                 T.Normalize(dm.mean, dm.std)])
        workers = 2
    else:
        dm = EMNISTDataModule(batch_size=batch_size, channels=3, resize=224, normalize="imagenet", augment=False)
        images, labels = synthetic(dm, 20_000)
        pil = images[:, 0].numpy()
        baseline_tf = T.Compose([T.Resize(224), T.Grayscale(3), T.ToTensor(), T.Normalize(dm.mean, dm.std)])
        workers = os.cpu_count()
    dm.pin_memory = device.type == "cuda"

    def ours_step(batch):
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        return dm.transform(x, training=True), y

    def baseline_step(batch):
        return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)

    ours_loader = dm.train_dataloader()
    baseline_loader = DataLoader(PILDataset(pil, labels.numpy(), baseline_tf), batch_size=batch_size, shuffle=True,
                                 num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=True)
    shape = tuple(ours_step(next(iter(ours_loader)))[0].shape)
    rss_before = peak_rss_mb()
    # ours takes ~1 ms a batch, so one pass alone is mostly noise; all of ours first: the baseline's worker
    # processes keep prefetching after a pass and would take the CPU from ours if the two alternated
    ours = statistics.median(time_batches(ours_loader, n_batches, device, ours_step) for _ in range(repeats))
    rss_ours = peak_rss_mb()
    theirs = statistics.median(time_batches(baseline_loader, n_batches, device, baseline_step)
                               for _ in range(repeats))
    cuda_peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB" if device.type == "cuda" else "-"
    return [case, str(shape), f"{n_batches / ours:.1f}", f"{n_batches / theirs:.1f}", f"{theirs / ours:.1f}x",
            f"{rss_ours:.0f} MB (+{rss_ours - rss_before:.0f})", cuda_peak, workers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["cifar", "emnist", "all"], default="all")
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per side (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    cases = ["cifar", "emnist"] if args.case == "all" else [args.case]
    rows = [run_case(case, args.batches, device, args.batch_size, args.repeats) for case in cases]
    header = ["case", "batch shape (ours)", "ours batches/s", "baseline batches/s", "speed-up",
              "peak RSS after ours", "CUDA max allocated", "baseline workers"]
    notes = (f"Batches/s: median of {args.repeats} passes of {args.batches} batches per side (ours first). Targets: cifar >= 10x on a 2-core CPU; emnist >= 10x on a GPU (on a CPU the resize is "
             "memory-bound and is reported without a target).")
    report("Input pipeline: ours vs the course-notebook PIL pipeline", markdown_table(header, rows), device,
           notes, record=not args.no_record)


if __name__ == "__main__":
    main()
