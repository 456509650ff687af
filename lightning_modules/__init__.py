"""LightningModules: one classification base and the models built on it."""
from lightning_modules.base import ClassificationModule
from lightning_modules.clip_zero_shot import CLIPZeroShot
from lightning_modules.cnn import CNN
from lightning_modules.mlp import MLP
from lightning_modules.resnet import ResNet18
from lightning_modules.scratch_cnn import ScratchCNN

__all__ = ["ClassificationModule", "MLP", "CNN", "ScratchCNN", "ResNet18", "CLIPZeroShot"]
