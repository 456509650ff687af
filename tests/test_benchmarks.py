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
    "training_loop": ["--samples", "512", "--repeats", "1"],
    "scratch_conv": ["--repeats", "1", "--warmup-s", "0", "--images", "128", "--epochs", "1"],
    "clip_zero_shot": ["--images", "8", "--batch_size", "4", "--repeats", "1"],
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
