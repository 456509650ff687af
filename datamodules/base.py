"""The base LightningDataModule: whole splits as uint8 tensors, transforms on the device."""
import contextlib
import fcntl
import os
from typing import Literal, Optional, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from datamodules import batch_transforms as BT
from datamodules.loader import BatchLoader, EpochBatchSampler, InOrderBatchSampler, TensorBatches
from errors import Fraction, NonNegativeInt, PositiveInt, UserError, number_range

ValFraction = number_range("ValFraction", float, 0, 1, high_open=True)  # of the training split
Degrees = number_range("Degrees", float, 0, 180)  # rotations drawn from [-degrees, degrees]
Seed = number_range("Seed", int, 0, 2**32 - 1)  # what numpy accepts (seed_everything is linked here)


def default_data_dir() -> str:
    return os.environ.get("DATA_DIR", "data")


@contextlib.contextmanager
def download_lock(data_dir: str, create: bool):
    """Held while a dataset is checked and fetched: commands started together (a sweep's array tasks, two
    terminals) on one data_dir fetched into the same files at once, or read one another's half-written files as
    present. One waits for the other, then finds the dataset there. A data_dir that is not writable (a read-only
    shared copy, where nothing is fetched) is not locked; `create` (download on) makes a missing one first."""
    try:
        if create:
            os.makedirs(data_dir, exist_ok=True)
        handle = open(os.path.join(data_dir, ".download.lock"), "a")
    except OSError:
        handle = None
    try:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


class ImageDataModule(pl.LightningDataModule):
    """Loads a split once as uint8 (N, C, H, W); `on_after_batch_transfer` augments and normalizes."""

    name = "dataset"  # the key used by `python -m datamodules.download` and in results.json
    native_channels = 1
    native_size = 28
    # default augmentation policy of the dataset (used when augment is true and no override is given)
    default_rotation = 0.0
    default_crop_padding = 0
    default_hflip = False

    def __init__(
        self,
        data_dir: Optional[str] = None,  # default: $DATA_DIR, else data/
        download: bool = True,
        batch_size: PositiveInt = 128,
        eval_batch_size: Optional[PositiveInt] = None,  # default: batch_size
        val_size: Union[NonNegativeInt, ValFraction] = 0.1,  # a count, or a fraction of the training split
        seed: Seed = 0,  # train/val split, shuffling and augmentation draws
        augment: bool = True,
        rotation: Optional[Degrees] = None,  # degrees; None: the dataset's default
        crop_padding: Optional[NonNegativeInt] = None,  # pixels; None: the dataset's default
        hflip: Optional[bool] = None,  # None: the dataset's default
        resized_crop_scale: Optional[tuple[Fraction, Fraction]] = None,  # area range, e.g. [0.8, 1.0]
        channels: Optional[Literal[1, 3]] = None,  # None: the dataset's own
        resize: Optional[PositiveInt] = None,  # square side in pixels, e.g. 224
        normalize: Literal["dataset", "imagenet", "none"] = "dataset",
        pin_memory: bool = True,
    ):
        super().__init__()
        if batch_size <= 0 or (eval_batch_size is not None and eval_batch_size <= 0):
            raise UserError(f"batch_size must be positive, got {batch_size}; set --data.batch_size to e.g. 128")
        if channels not in (None, 1, 3):
            raise UserError(f"channels must be 1 or 3, got {channels}")
        if resized_crop_scale is not None and resized_crop_scale[0] > resized_crop_scale[1]:
            raise UserError(f"data.resized_crop_scale={list(resized_crop_scale)}: the smaller area comes first, "
                            "e.g. [0.8, 1.0]")
        if isinstance(val_size, float) and not 0 <= val_size < 1:
            raise UserError(f"val_size as a fraction must be in [0, 1), got {val_size}")
        self.data_dir = data_dir or default_data_dir()
        self.download, self.seed, self.normalize = download, seed, normalize
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.val_size, self.pin_memory = val_size, pin_memory
        self.rotation = (rotation if rotation is not None else self.default_rotation) if augment else 0.0
        self.crop_padding = (crop_padding if crop_padding is not None else self.default_crop_padding) if augment else 0
        self.hflip = (hflip if hflip is not None else self.default_hflip) if augment else False
        self.resized_crop_scale = resized_crop_scale if augment else None
        self.channels = channels or self.native_channels
        self.resize = resize
        self.augment_generator = torch.Generator().manual_seed(seed)
        self.splits: dict[str, TensorBatches] = {}
        self.mean = self.std = None
        self._train_loader: Optional[BatchLoader] = None
        self._pending_loader_state: Optional[dict] = None

    # ---- what the model is told ----
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, int, int]:
        side = self.resize or self.native_size
        return (self.channels, side, side)

    # ---- what a dataset class provides ----
    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns images (N, C, H, W) uint8 and labels (N,) int64 of the original train or test split."""
        raise NotImplementedError

    def fetch(self) -> None:
        """Downloads the dataset into data_dir (only called when download is true)."""

    def is_present(self) -> bool:
        return True

    def missing_message(self) -> str:
        return (f"{self.name} not found in {os.path.abspath(self.data_dir)} and download is off or failed; "
                f"on a machine with internet run: python -m datamodules.download {self.name} "
                f"--data_dir {self.data_dir}")

    # ---- Lightning hooks ----
    def prepare_data(self) -> None:
        bundled = type(self).fetch is ImageDataModule.fetch  # nothing on disk to fetch (scikit-learn's digits)
        with contextlib.nullcontext() if bundled else download_lock(self.data_dir, create=self.download):
            if self.is_present():
                return
            if self.download:
                try:
                    self.fetch()
                except Exception as error:  # offline: URLError, RuntimeError from torchvision's mirrors, ...
                    raise UserError(f"{self.missing_message()} ({type(error).__name__})") from None
            if not self.is_present():
                raise UserError(self.missing_message())

    def setup(self, stage: Optional[str] = None) -> None:
        if "train" in self.splits:  # idempotent: the whole split stays loaded
            return
        images, labels = self._load_checked(train=True)
        val_count = self.val_size if isinstance(self.val_size, int) else round(self.val_size * len(labels))
        if not 0 <= val_count < len(labels):
            raise UserError(f"val_size {self.val_size} leaves no training data ({len(labels)} samples)")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        train_idx, val_idx = order[val_count:], order[:val_count]
        self.splits["train"] = TensorBatches(images[train_idx], labels[train_idx])
        self.splits["val"] = TensorBatches(images[val_idx], labels[val_idx])
        self.splits["test"] = TensorBatches(*self._load_checked(train=False))
        self.mean, self.std = self._statistics(self.splits["train"].images)

    def _load_checked(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_present():
            raise UserError(self.missing_message())
        try:
            images, labels = self.load_split(train)
        except UserError:
            raise
        except Exception as error:
            raise UserError(f"could not read {self.name} from {os.path.abspath(self.data_dir)} "
                            f"({type(error).__name__}: {error}); delete the folder and download it again") from None
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise UserError(f"{self.name} labels outside 0..{self.num_classes - 1}: the files are corrupt")
        return images, labels

    def _statistics(self, images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std in [0, 1] units, over the training split (native resolution)."""
        if self.normalize == "imagenet":
            mean, std = BT.IMAGENET_MEAN, BT.IMAGENET_STD
            if self.channels == 1:
                return (sum(mean) / 3,), (sum(std) / 3,)
            return mean, std
        if self.normalize == "none":
            return (0.0,) * self.channels, (1.0,) * self.channels
        total = torch.zeros(self.channels, dtype=torch.float64)
        total_sq = torch.zeros(self.channels, dtype=torch.float64)
        for chunk in images.split(8192):  # chunks keep EMNIST (~550 MB uint8) from becoming 4 GB of float
            x = BT.convert_channels(chunk.double() / 255, self.channels)  # (b, C, H, W)
            total += x.sum((0, 2, 3))
            total_sq += (x * x).sum((0, 2, 3))
        count = images.shape[0] * images.shape[2] * images.shape[3]
        mean = total / count
        std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
        return tuple(mean.tolist()), tuple(std.tolist())

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, split: str, train: bool) -> BatchLoader:
        if split not in self.splits:
            self.setup()
        data = self.splits[split]
        rank, world_size = self._rank()
        # `trainer.overfit_batches`: the same first batches every epoch, as Lightning does for any loader
        shuffle = train and not (self.trainer is not None and self.trainer.overfit_batches > 0)
        sampler = (EpochBatchSampler if shuffle else InOrderBatchSampler)(
            len(data), self.batch_size if train else self.eval_batch_size, shuffle=shuffle, seed=self.seed,
            drop_last=False, rank=rank, world_size=world_size, even_shards=train)
        pin = self.pin_memory and torch.cuda.is_available()
        progress = self._batches_consumed if train else None
        return BatchLoader(data, sampler, pin_memory=pin, progress=progress)

    def _batches_consumed(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0

    def train_dataloader(self) -> BatchLoader:
        self._train_loader = self._loader("train", train=True)
        if self._pending_loader_state is not None:
            self._train_loader.load_state_dict(self._pending_loader_state)
        return self._train_loader

    def val_dataloader(self) -> BatchLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> BatchLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        # a plain DataLoader: Lightning rebuilds predict loaders with its own index-tracking sampler
        loader = self._loader("test", train=False)
        return DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, pin_memory=loader.pin_memory)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # an (images, labels) batch already on the device (every CPU run) moves nowhere: Lightning's generic
        # move_data_to_device walk would return the same tensors after ~0.04 ms per step cold; anything else goes
        # through it. Here, not in the LightningModule: Lightning warns on every fit with a datamodule when the
        # module overrides it. A model's own override still moves the batch, as it did before this one existed
        model = self.trainer.lightning_module if self.trainer is not None else None
        default = pl.LightningModule.transfer_batch_to_device
        if model is not None and type(model).transfer_batch_to_device is not default:
            return model.transfer_batch_to_device(batch, device, dataloader_idx)
        if type(batch) in (tuple, list) and all(isinstance(item, torch.Tensor) and item.device == device
                                                for item in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        trainer = self.trainer
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and batch[0].dtype == torch.uint8:
            batch = self.transform(batch[0], trainer is not None and trainer.training), batch[1]
        # else not one of our batches (e.g. the model summary's float32 example input)
        # The model's input dtype: Lightning converts float inputs before the transfer (16-true, bf16-true,
        # 64-true), when ours are still uint8; the same conversion after the transform (a no-op at 32-true
        # and under mixed precision, where autocast casts inside the model).
        return trainer.precision_plugin.convert_input(batch) if trainer is not None else batch

    def transform(self, images: torch.Tensor, training: bool = False) -> torch.Tensor:
        """uint8 (B, C, H, W) on any device -> normalized float (B, *input_shape)."""
        if self.mean is None:
            self.setup()
        x = images.float().div_(255)  # (B, C, H, W) in [0, 1]
        if training:
            if self.crop_padding or self.hflip:
                x = BT.random_crop_flip(x, self.crop_padding, self.hflip, self.augment_generator)
            if self.rotation or self.resized_crop_scale:
                x = BT.random_affine(x, self.rotation, self.resized_crop_scale, self.augment_generator)
        if self.resize and x.shape[-1] != self.resize:
            x = BT.resize(x, self.resize)  # (B, C, S, S)
        x = BT.convert_channels(x, self.channels)  # (B, channels, S, S)
        mean, std = self._normalization(x.device)
        return (x - mean) / std

    def _normalization(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as (1, C, 1, 1) tensors on `device`, made once: building them per batch from Python
        lists was two blocking host-to-device copies per batch (each waits for the GPU's queue to drain)."""
        key = (device, tuple(self.mean), tuple(self.std))
        if getattr(self, "_normalization_key", None) != key:
            self._normalization_tensors = tuple(torch.tensor(v).view(1, -1, 1, 1).to(device) for v in key[1:])
            self._normalization_key = key
        return self._normalization_tensors

    # The augmentation stream and the position in the epoch travel in checkpoints, so a resumed run
    # draws and reads what it would have. (The loader's own state is not enough: Lightning skips
    # restoring it when the loader was built early, e.g. for `estimated_stepping_batches`.)
    def state_dict(self) -> dict:
        state = {"augment_generator": self.augment_generator.get_state()}
        if self._train_loader is not None:
            state["train_loader"] = self._train_loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if "augment_generator" in state_dict:
            self.augment_generator.set_state(state_dict["augment_generator"])
        self._pending_loader_state = state_dict.get("train_loader")
        if self._train_loader is not None and self._pending_loader_state is not None:
            self._train_loader.load_state_dict(self._pending_loader_state)
