"""One thin class per dataset: where the files live, how to read them, names and augmentation."""
import os
import string
from typing import Literal

import torch
from torchvision import datasets as tvd

from datamodules.base import ImageDataModule
from errors import UserError

# The meta files' label names (batches.meta / meta: fine_label_names), needed before any download
# because the model is built from them; load_split checks the real meta file against them.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split()


class _TorchvisionDataModule(ImageDataModule):
    """Reads a torchvision dataset's `.data` / `.targets` (the real on-disk parsers, no per-image work)."""

    torchvision_class = None

    def _dataset(self, train: bool, download: bool = False):
        return self.torchvision_class(self.data_dir, train=train, download=download)

    def fetch(self) -> None:
        for train in (True, False):
            self._dataset(train, download=True)

    def required_files(self) -> list[str]:
        """The files torchvision reads (MNIST family: raw IDX files under <data_dir>/<Class>/raw/)."""
        raw = os.path.join(self.data_dir, self.torchvision_class.__name__, "raw")
        return [os.path.join(raw, os.path.splitext(os.path.basename(url))[0])
                for url, _ in self.torchvision_class.resources]

    def is_present(self) -> bool:
        return all(os.path.isfile(path) for path in self.required_files())

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self._dataset(train)
        images = torch.as_tensor(ds.data)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
        return images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST handwritten digits, 28x28 gray, 60k train / 10k test."""

    name, torchvision_class = "mnist", tvd.MNIST
    default_rotation = 10.0

    @property
    def class_names(self) -> list[str]:
        return list(string.digits)


class FashionMNISTDataModule(_TorchvisionDataModule):
    """Fashion-MNIST garments, 28x28 gray, 60k train / 10k test."""

    name, torchvision_class = "fashion_mnist", tvd.FashionMNIST
    default_rotation = 10.0

    @property
    def class_names(self) -> list[str]:
        return list(tvd.FashionMNIST.classes)


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10, 32x32 RGB, 50k train / 10k test."""

    name, torchvision_class = "cifar10", tvd.CIFAR10
    native_channels, native_size = 3, 32
    default_crop_padding, default_hflip = 4, True
    meta_names = CIFAR10_CLASSES

    def required_files(self) -> list[str]:
        tv = self.torchvision_class
        folder = os.path.join(self.data_dir, tv.base_folder)
        return [os.path.join(folder, name) for name, _ in tv.train_list + tv.test_list + [(tv.meta["filename"], 0)]]

    @property
    def class_names(self) -> list[str]:
        return [name.replace("_", " ") for name in self.meta_names]

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self._dataset(train)
        if list(ds.classes) != self.meta_names:
            raise UserError(f"the {self.name} meta file in {self.data_dir} does not list the expected class names")
        images = torch.as_tensor(ds.data).permute(0, 3, 1, 2)  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        return images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels), 32x32 RGB, 50k train / 10k test."""

    name, torchvision_class = "cifar100", tvd.CIFAR100
    meta_names = CIFAR100_CLASSES


class EMNISTDataModule(_TorchvisionDataModule):
    """EMNIST letters and digits (default split byclass: 62 classes), turned upright on load."""

    name, torchvision_class = "emnist", tvd.EMNIST
    default_rotation = 10.0

    def __init__(self, split: Literal["byclass", "bymerge", "balanced", "letters", "digits", "mnist"] = "byclass",
                 **kwargs):
        if split not in tvd.EMNIST.splits:
            raise UserError(f"unknown EMNIST split {split!r}; choose one of {', '.join(tvd.EMNIST.splits)}")
        self.split = split
        super().__init__(**kwargs)

    def _dataset(self, train: bool, download: bool = False):
        return tvd.EMNIST(self.data_dir, split=self.split, train=train, download=download)

    def required_files(self) -> list[str]:
        raw = os.path.join(self.data_dir, "EMNIST", "raw")
        return [os.path.join(raw, f"emnist-{self.split}-{part}-{kind}-ubyte") for part in ("train", "test")
                for kind in ("images-idx3", "labels-idx1")]

    @property
    def class_names(self) -> list[str]:
        return list(tvd.EMNIST.classes_split_dict[self.split])

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = super().load_split(train)
        # EMNIST stores every image transposed; rotate -90 then flip horizontally == swap H and W
        return images.transpose(2, 3).contiguous(), labels  # (N, 1, 28, 28), characters upright


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): the offline default, no download."""

    name = "digits"
    native_size = 8
    test_fraction = 0.2  # fixed stratified split (random_state 0): the same test set for every seed

    @property
    def class_names(self) -> list[str]:
        return list(string.digits)

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.as_tensor(digits.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8)
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=self.test_fraction,
                                               stratify=labels.numpy(), random_state=0)
        index = torch.as_tensor(train_idx if train else test_idx)
        return images[index], labels[index]
