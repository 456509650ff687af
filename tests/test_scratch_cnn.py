"""The scratch CNN trained through Lightning: no autograd graph, same steps as torch, exact resume."""
import glob
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from datamodules import DigitsDataModule
from lightning_modules.base import count_parameters
from lightning_modules.scratch_cnn import ScratchCNN


def _model(**kwargs):
    return ScratchCNN(channels=[4, 8], padding=1, class_names=list("0123456789"), input_shape=(1, 8, 8),
                      lr=0.05, momentum=0.9, weight_decay=1e-3, **kwargs)


def _trainer(max_epochs=1, **kwargs):
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def test_parameters_are_registered_counted_and_shared_with_the_scratch_layers():
    model = _model()
    conv = model.net.layers[0]
    assert conv.weight is model.scratch_params["0_weight"] and not conv.weight.requires_grad
    counts = count_parameters(model)
    assert counts["total"] == counts["trainable"] == 36 + 4 + 288 + 8 + 320 + 10


def test_training_steps_match_torch_autograd_and_sgd_and_build_no_graph():
    torch.manual_seed(0)
    model = _model(scheduler="none")
    reference = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1),
                              nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32, 10))
    reference.load_state_dict({k.replace("_", "."): v for k, v in model.scratch_params.items()})
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    datamodule = DigitsDataModule(batch_size=64, augment=False)
    outputs = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, out, batch, batch_idx):
            outputs.append(out)
            images, labels = batch
            optimizer.zero_grad()
            nn.functional.cross_entropy(reference(images), labels).backward()
            optimizer.step()

    _trainer(max_steps=5, callbacks=[Record()], enable_checkpointing=False).fit(model, datamodule=datamodule)
    assert len(outputs) == 5
    assert all(out["loss"].grad_fn is None and not out["loss"].requires_grad for out in outputs)
    assert not any(p.requires_grad for p in model.parameters())
    for key, value in reference.state_dict().items():
        assert torch.allclose(model.scratch_params[key.replace(".", "_")], value, atol=1e-5), key


def test_mid_epoch_resume_restores_weights_and_momentum(tmp_path):
    def fit(ckpt_path=None, every=None):
        pl.seed_everything(0)
        callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1, filename="{step}")]
        model = _model()
        _trainer(max_epochs=2, callbacks=callbacks if every else [], enable_checkpointing=bool(every)).fit(
            model, datamodule=DigitsDataModule(batch_size=64), ckpt_path=ckpt_path, weights_only=True)
        return model

    uninterrupted = fit(every=10)
    resumed = fit(ckpt_path=glob.glob(os.path.join(tmp_path, "step=30*.ckpt"))[0])
    for key, value in uninterrupted.scratch_params.items():
        assert torch.equal(value, resumed.scratch_params[key]), key


def test_ddp_is_refused_once_before_any_rank_starts(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run([sys.executable, "cli.py", "fit", "--config", "configs/digits_scratch_cnn.yaml",
                             "--log_dir", str(tmp_path), "--trainer.strategy", "ddp", "--trainer.devices", "2",
                             "--trainer.accelerator", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "one device only" in errors[0] and "--trainer.devices 1" in errors[0]
    assert "Initializing distributed" not in result.stderr + result.stdout  # no second process was launched
    assert not glob.glob(str(tmp_path / "*" / "*"))  # nothing left behind
