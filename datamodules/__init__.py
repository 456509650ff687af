"""LightningDataModules: one base class, one thin class per dataset."""
from datamodules.base import ImageDataModule
from datamodules.datasets import (CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule, EMNISTDataModule,
                                  FashionMNISTDataModule, MNISTDataModule)

DATAMODULES = {cls.name: cls for cls in (DigitsDataModule, MNISTDataModule, FashionMNISTDataModule,
                                         CIFAR10DataModule, CIFAR100DataModule, EMNISTDataModule)}

__all__ = ["ImageDataModule", "DigitsDataModule", "MNISTDataModule", "FashionMNISTDataModule",
           "CIFAR10DataModule", "CIFAR100DataModule", "EMNISTDataModule", "DATAMODULES"]
