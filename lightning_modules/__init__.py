"""LightningModules: one classification base and the models built on it."""
from lightning_modules.base import ClassificationModule
from lightning_modules.cnn import CNN
from lightning_modules.mlp import MLP

__all__ = ["ClassificationModule", "MLP", "CNN"]
