"""On a CUDA GPU: the device-side input pipeline never waits for the GPU, equals the CPU path, and a
mixed-precision fit runs end to end. Marked `gpu`: skipped without CUDA, run with `pytest -m gpu`."""
import contextlib
import json
import os

import pytest
import torch

import cli
from datamodules import CIFAR10DataModule, EMNISTDataModule
from datamodules import batch_transforms as BT
from benchmarks.input_pipeline import synthetic

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@contextlib.contextmanager
def sync_raises():
    """Any host-device synchronisation inside the block raises (torch's sync debug mode)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("case", ["cifar", "emnist"])
def test_the_training_transform_never_waits_for_the_gpu_and_equals_the_cpu_path(case):
    if case == "cifar":  # crop + flip as one gather, normalize
        dm = CIFAR10DataModule(batch_size=64, seed=3)
    else:  # rotation + resized crop as one affine_grid, resize to 224, gray -> RGB, ImageNet normalization
        dm = EMNISTDataModule(batch_size=64, seed=3, channels=3, resize=224, normalize="imagenet", rotation=10.0,
                              resized_crop_scale=(0.8, 1.0), hflip=False, crop_padding=0)
    images, _ = synthetic(dm, 256)
    batch = images[:64].pin_memory()  # what the loader yields on a GPU machine
    state = dm.augment_generator.get_state()
    dm.transform(batch.to(CUDA, non_blocking=True), training=True)  # the first call moves mean/std, once
    torch.cuda.synchronize()
    dm.augment_generator.set_state(state)
    with sync_raises():
        ours = dm.transform(batch.to(CUDA, non_blocking=True), training=True)
    dm.augment_generator.set_state(state)
    reference = dm.transform(batch, training=True)  # the same draws, on the CPU
    assert ours.shape == reference.shape
    assert torch.allclose(ours.cpu(), reference, atol=1e-4)


def test_crop_flip_on_the_gpu_is_exact():
    x = torch.rand(32, 3, 32, 32)
    cpu = BT.random_crop_flip(x, 4, True, torch.Generator().manual_seed(0))
    gpu = BT.random_crop_flip(x.to(CUDA), 4, True, torch.Generator().manual_seed(0))
    assert torch.equal(gpu.cpu(), cpu)


def test_a_bf16_fit_on_the_gpu_writes_results_with_its_device_and_memory(tmp_path):
    run = cli.main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "2",
                    "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
                    "--log_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    results = json.load(open(os.path.join(run.trainer.log_dir, "results.json")))
    efficiency = results["efficiency"]
    assert efficiency["device"] == torch.cuda.get_device_name(0) or "cuda" in efficiency["device"].lower()
    assert efficiency["precision"] == "bf16-mixed" and efficiency["peak_memory_mb"] > 0
    assert results["test"]["best"]["acc"] > 0.8
