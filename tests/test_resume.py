"""A run stopped mid-epoch and resumed from its checkpoint ends with the weights of one never stopped."""
import glob
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import DigitsDataModule
from lightning_modules import CNN


def _fit(tmp_path, max_epochs, ckpt_path=None, every_n_train_steps=None):
    pl.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64, seed=0, rotation=15.0)  # augmentation draws must resume too
    model = CNN(channels=[8, 16], head_hidden=[32], head_dropout=0.3, class_names=list("0123456789"),
                input_shape=(1, 8, 8), scheduler="cosine")
    callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every_n_train_steps, save_top_k=-1,
                                 filename="{step}")] if every_n_train_steps else []
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=bool(callbacks), callbacks=callbacks, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model.state_dict(), trainer


def test_mid_epoch_resume_gives_identical_weights(tmp_path):
    uninterrupted, trainer = _fit(tmp_path, max_epochs=3, every_n_train_steps=10)
    assert trainer.num_training_batches == 21  # 1,293 training images / 64, so step 30 is mid-epoch 1
    checkpoint = glob.glob(os.path.join(tmp_path, "step=30*.ckpt"))[0]
    resumed, trainer = _fit(tmp_path / "resumed", max_epochs=3, ckpt_path=checkpoint)
    assert trainer.global_step == 63
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key
