"""Building a config's model and datamodule exactly as cli.py does, without training or a run directory."""
import inspect
import os
import tempfile
import warnings

import lightning.pytorch as pl
import yaml

from errors import UserError

MODEL_KEYS = {"self", "model", "train_dataloaders", "val_dataloaders", "dataloaders", "datamodule"}


def model_only_config(path: str, folder: str) -> str:
    """A copy of a config without the trainer method's arguments (ckpt_path, weights_only, ...), which
    `cli.py fit/test` save into a run's config.yaml but a model-only build (cli.main(run=False)) does not accept."""
    method_keys = set()
    for method in (pl.Trainer.fit, pl.Trainer.validate, pl.Trainer.test, pl.Trainer.predict):
        method_keys |= set(inspect.signature(method).parameters) - MODEL_KEYS
    if not os.path.isfile(path):
        raise UserError(f"config {path} does not exist; give a file from configs/ or a run's config.yaml")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a config file (a YAML mapping)")
    copy = os.path.join(folder, f"{len(os.listdir(folder))}-{os.path.basename(path)}")
    with open(copy, "w") as f:
        yaml.safe_dump({k: v for k, v in config.items() if k not in method_keys}, f, sort_keys=False)
    return copy


def build_experiment(configs: list[str], overrides=()):
    """cli.main(run=False) on the configs (composed in order) plus cli.py overrides: .model, .datamodule, ..."""
    import cli

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended")  # our args are not sys.argv
        arguments = [arg for path in configs for arg in ("--config", model_only_config(path, folder))]
        return cli.main([*arguments, "--trainer.logger", "false", *overrides], run=False)
