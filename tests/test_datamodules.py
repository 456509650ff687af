import os
import string

import pytest
import torch

from datamodules import (CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule, EMNISTDataModule,
                         FashionMNISTDataModule, MNISTDataModule)
from datamodules.datasets import CIFAR100_CLASSES
from datamodules.loader import BatchLoader, EpochBatchSampler, TensorBatches
from errors import UserError
from tests.fixtures import write_emnist, write_mnist

CASES = [
    (MNISTDataModule, (1, 28, 28), list(string.digits), 60, 20),
    (FashionMNISTDataModule, (1, 28, 28), ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                           "Shirt", "Sneaker", "Bag", "Ankle boot"], 60, 20),
    (CIFAR10DataModule, (3, 32, 32), ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                      "ship", "truck"], 100, 40),
    (CIFAR100DataModule, (3, 32, 32), [n.replace("_", " ") for n in CIFAR100_CLASSES], 200, 100),
    (EMNISTDataModule, (1, 28, 28), list(string.digits + string.ascii_uppercase + string.ascii_lowercase), 124, 62),
]


@pytest.mark.parametrize("cls, shape, names, n_train, n_test", CASES)
def test_splits_shapes_dtypes_and_names(data_dir, cls, shape, names, n_train, n_test):
    dm = cls(data_dir=data_dir, download=False, val_size=0.2, batch_size=16)
    assert dm.class_names == names and dm.num_classes == len(names) and dm.input_shape == shape
    dm.prepare_data()
    dm.setup()
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == n_train and len(dm.splits["test"]) == n_test
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (16, *shape)
    assert labels.dtype == torch.int64 and labels.max() < dm.num_classes
    x = dm.transform(images, training=True)
    assert x.dtype == torch.float32 and x.shape == (16, *shape)


def test_cifar100_names_come_from_the_meta_file(data_dir):
    dm = CIFAR100DataModule(data_dir=data_dir, download=False)
    dm.setup()
    assert dm.class_names[1] == "aquarium fish" and dm.num_classes == 100


def test_emnist_characters_come_out_upright(tmp_path):
    upright = torch.zeros(28, 28, dtype=torch.uint8)
    upright[4:24, 6] = 255  # the vertical stroke of an "L", on the left
    upright[23, 6:20] = 255  # its foot, at the bottom, pointing right
    stored = upright.T.contiguous()  # EMNIST files hold every image transposed
    images = {"train": stored.expand(124, 28, 28).numpy(), "test": stored.expand(62, 28, 28).numpy()}
    write_emnist(str(tmp_path), images=images)
    dm = EMNISTDataModule(data_dir=str(tmp_path), download=False)
    dm.setup()
    assert torch.equal(dm.splits["test"].images[0, 0], upright)


def test_emnist_resized_to_224_in_3_channels_with_imagenet_normalization(data_dir):
    dm = EMNISTDataModule(data_dir=data_dir, download=False, channels=3, resize=224, normalize="imagenet",
                          resized_crop_scale=(0.8, 1.0), batch_size=4)
    dm.setup()
    assert dm.input_shape == (3, 224, 224)
    images, _ = next(iter(dm.train_dataloader()))
    for training in (True, False):
        x = dm.transform(images, training)
        assert x.shape == (4, 3, 224, 224)
    background = dm.transform(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))[0, :, 0, 0]
    assert torch.allclose(background, -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))


def test_unknown_emnist_split_is_a_clear_error():
    with pytest.raises(UserError, match="unknown EMNIST split 'byclas'.*byclass"):
        EMNISTDataModule(split="byclas")


def _content(split: TensorBatches) -> set[bytes]:
    return {image.numpy().tobytes() for image in split.images}


def test_split_is_reproducible_disjoint_and_seeded(data_dir):
    a, b, c = (MNISTDataModule(data_dir=data_dir, download=False, val_size=12, seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert len(a.splits["val"]) == 12
    assert torch.equal(a.splits["val"].images, b.splits["val"].images)
    assert not _content(a.splits["train"]) & _content(a.splits["val"])
    assert len(_content(a.splits["train"]) | _content(a.splits["val"])) == 60
    assert _content(a.splits["val"]) != _content(c.splits["val"])


def test_digits_is_offline_with_a_fixed_stratified_test_split():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=5)
    a.prepare_data()
    a.setup(), b.setup()
    assert a.input_shape == (1, 8, 8) and len(a.splits["test"]) == 360
    assert torch.equal(a.splits["test"].labels, b.splits["test"].labels)
    assert torch.bincount(a.splits["test"].labels).min() >= 35  # stratified: every digit ~36 times
    assert a.splits["train"].images.max() == 255


def test_augmentation_draws_differ_per_sample_and_eval_is_deterministic(data_dir):
    for dm in (CIFAR10DataModule(data_dir=data_dir, download=False), MNISTDataModule(data_dir=data_dir, download=False)):
        dm.setup()
        one = dm.splits["train"].images[:1]
        batch = one.expand(32, *one.shape[1:])  # the same image 32 times
        x = dm.transform(batch, training=True)
        assert x.shape == (32, *dm.input_shape)
        distinct = {tuple(row.flatten().tolist()) for row in x}
        assert len(distinct) > 16  # per-sample draws, not one draw per batch
        e1, e2 = dm.transform(batch, training=False), dm.transform(batch, training=False)
        assert torch.equal(e1, e2) and torch.equal(e1[0], e1[31])


def test_dataset_normalization_standardizes_the_training_split(data_dir):
    dm = CIFAR10DataModule(data_dir=data_dir, download=False)
    dm.setup()
    x = dm.transform(dm.splits["train"].images)
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=1e-2)


def test_missing_data_offline_names_the_folder_and_the_command(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(UserError, match=r"mnist not found in .*nowhere.*python -m datamodules.download mnist"):
        dm.prepare_data()


def test_failed_download_is_the_same_one_line_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://..., got:\n<urlopen error>")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    with pytest.raises(UserError) as error:
        MNISTDataModule(data_dir=str(tmp_path), download=True).prepare_data()
    assert "\n" not in str(error.value) and "python -m datamodules.download mnist" in str(error.value)


def test_truncated_file_is_a_clear_error(tmp_path):
    write_mnist(str(tmp_path))
    path = os.path.join(tmp_path, "MNIST", "raw", "train-images-idx3-ubyte")
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match="could not read mnist"):
        MNISTDataModule(data_dir=str(tmp_path), download=False).setup()


def test_sampler_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch():
    data = TensorBatches(torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1), torch.arange(50))
    sampler = EpochBatchSampler(50, 8, shuffle=True, seed=3)
    loader = BatchLoader(data, sampler)
    sampler.set_epoch(2)
    full = [labels for _, labels in loader]
    assert len(full) == len(loader) == 7 and sorted(torch.cat(full).tolist()) == list(range(50))
    again = BatchLoader(data, EpochBatchSampler(50, 8, shuffle=True, seed=3))
    again.sampler.set_epoch(2)
    again.load_state_dict({"epoch": 2, "batches_done": 3})
    resumed = [labels for _, labels in again]
    assert len(resumed) == 4 and all(torch.equal(a, b) for a, b in zip(resumed, full[3:]))
    sampler.set_epoch(3)
    assert not torch.equal(next(iter(loader))[1], full[0])


def test_distributed_shards_are_disjoint():
    shards = [torch.cat(list(EpochBatchSampler(50, 8, True, seed=0, rank=r, world_size=2))) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 25 and not set(shards[0].tolist()) & set(shards[1].tolist())


class SlowFetch(MNISTDataModule):
    """MNIST whose fetch writes its four files one after the other, each in two halves (a download in progress)."""

    def fetch(self) -> None:
        import time

        write_mnist(self.data_dir + "/staging", n_train=20, n_test=10)
        staging, raw = (os.path.join(self.data_dir, *parts, "MNIST", "raw") for parts in (("staging",), ()))
        os.makedirs(raw, exist_ok=True)
        for name in sorted(os.listdir(staging)):
            data = open(os.path.join(staging, name), "rb").read()
            with open(os.path.join(raw, name), "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                time.sleep(1.0)  # every file of the dataset exists, the last one half-written
                f.write(data[len(data) // 2:])


def test_a_command_finds_a_dataset_another_is_fetching_only_once_it_is_complete(tmp_path):
    # a sweep's array tasks, or two terminals, on one data_dir: the second read the first's half-written files as
    # the dataset ("could not read mnist"), or fetched into the same files at once
    import threading
    import time

    found = {}

    def prepare_and_load(name: str) -> None:
        dm = SlowFetch(data_dir=str(tmp_path), download=True, val_size=2)
        try:
            dm.prepare_data()
            dm.setup()
            found[name] = len(dm.splits["train"]) + len(dm.splits["val"])
        except UserError as error:
            found[name] = str(error)

    first = threading.Thread(target=prepare_and_load, args=("first",))
    first.start()
    last_file = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    deadline = time.time() + 60
    while not last_file.exists():  # the fetch is writing the last file
        assert time.time() < deadline
        time.sleep(0.01)
    prepare_and_load("second")
    first.join(60)
    assert found == {"first": 20, "second": 20}
