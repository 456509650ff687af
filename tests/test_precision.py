"""The precision matrix: every value `--trainer.precision` accepts trains (tiny fits on the CPU) or is refused
before training with one line. The policy is in cli.py (MIXED_PRECISIONS, CUDA_ONLY_PRECISIONS) and the README."""
import json
import os

import lightning.pytorch as pl
from lightning.pytorch.plugins import MixedPrecision
import pytest
import torch

import cli
from datamodules import DigitsDataModule
from errors import UserError
from lightning_modules.scratch_cnn import ScratchCNN

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false", "--figures.enabled", "false"]
# value given -> the precision the fit runs at on a machine without CUDA
TRAINS_ON_CPU = {
    "32": "32-true", "32-true": "32-true", "64": "64-true", "64-true": "64-true", "bf16-true": "bf16-true",
    "16-mixed": "32-true", "bf16-mixed": "32-true", "16": "32-true", "bf16": "32-true",  # the GPU-only fallback
}
REFUSED_ON_CPU = {"transformer-engine": "needs a CUDA GPU", "transformer-engine-float16": "needs a CUDA GPU"}


def _fit(tmp_path, config: str, precision: str, *extra) -> dict:
    run = cli.run_cli(["fit", "--config", config, "--trainer.precision", precision, "--log_dir", str(tmp_path),
                       "--trainer.accelerator", "cpu", *TINY, *extra])
    with open(os.path.join(run.trainer.log_dir, "results.json")) as f:
        return json.load(f)


def test_the_matrix_names_every_value_lightning_accepts():
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
    accepted = set(_PRECISION_INPUT_STR.__args__) | set(_PRECISION_INPUT_STR_ALIAS.__args__)
    assert accepted == set(TRAINS_ON_CPU) | set(REFUSED_ON_CPU) | {"16-true"}  # 16-true: see the tests below


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side of the matrix")
@pytest.mark.parametrize("precision", sorted(TRAINS_ON_CPU))
def test_precision_trains_on_cpu(tmp_path, precision):
    results = _fit(tmp_path, "configs/quickstart.yaml", precision)
    assert results["efficiency"]["precision"] == TRAINS_ON_CPU[precision]
    assert 0 <= results["test"]["last"]["acc"] <= 1 and results["test"]["last"]["loss"] == results["test"]["last"]["loss"]


@pytest.mark.slow
def test_16_true_trains_with_sgd_and_refuses_adam_in_one_line(tmp_path):
    results = _fit(tmp_path, "configs/quickstart.yaml", "16-true", "--model.init_args.optimizer", "sgd")
    assert results["efficiency"]["precision"] == "16-true"
    assert results["test"]["last"]["loss"] == results["test"]["last"]["loss"]  # not nan
    runs = os.listdir(tmp_path / "quickstart")
    with pytest.raises(UserError, match="adamw cannot train float16 parameters"):
        _fit(tmp_path, "configs/quickstart.yaml", "16-true")
    assert os.listdir(tmp_path / "quickstart") == runs  # the refused run left no folder


@pytest.mark.parametrize("precision", sorted(REFUSED_ON_CPU))
def test_precision_refused_before_training(tmp_path, precision):
    with pytest.raises(UserError, match=REFUSED_ON_CPU[precision]):
        _fit(tmp_path, "configs/quickstart.yaml", precision)
    assert not os.listdir(tmp_path)  # refused before a run folder was claimed


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true"])
def test_scratch_cnn_trains_at_true_precisions(tmp_path, precision):
    results = _fit(tmp_path, "configs/digits_scratch_cnn.yaml", precision)
    assert results["efficiency"]["precision"] == precision


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "16-mixed with a GradScaler"])
def test_scratch_cnn_trains_under_mixed_precision(precision):
    """Lightning's CPU autocast (bf16; 16-mixed becomes bf16-mixed on a CPU): the scratch CNN turns it off. On a GPU,
    16-mixed also brings a GradScaler, whose unscale_ failed ("_scale is None": nothing was scaled, the hand-written
    backward computes in float32): the CPU plugin with a scaler stands in for it here."""
    model = ScratchCNN(channels=[4], padding=1, num_classes=10, input_shape=(1, 8, 8), lr=0.05, scheduler="none")
    before = model.scratch_params["0_weight"].clone()
    scaled = precision.endswith("GradScaler")
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))] if scaled else None
    trainer = pl.Trainer(accelerator="cpu", precision=None if scaled else precision, plugins=plugins, max_epochs=1,
                         limit_train_batches=2,
                         limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert model.scratch_params["0_weight"].dtype == torch.float32
    assert not torch.equal(model.scratch_params["0_weight"], before)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true"])
@pytest.mark.parametrize("config", ["configs/quickstart.yaml", "configs/digits_scratch_cnn.yaml"])
def test_precision_trains_on_gpu(tmp_path, config, precision):
    results = _fit(tmp_path, config, precision, "--trainer.accelerator", "gpu", "--trainer.devices", "1")
    assert results["efficiency"]["precision"] == precision
    assert results["test"]["last"]["loss"] == results["test"]["last"]["loss"]


def test_loss_means_sum_in_float32_in_a_16_bit_model():
    """At 16-true the precision plugin converts the metrics with the module; 100,000 losses of 2.5 overflow float16."""
    from lightning_modules import CNN

    model = CNN(num_classes=10, input_shape=(1, 8, 8), channels=[4]).to(dtype=torch.float16)
    model.on_test_epoch_start()
    model.test_loss.update(torch.tensor(2.5, dtype=torch.float16), weight=100_000)
    assert model.test_loss.compute().item() == 2.5
