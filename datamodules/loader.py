"""Batches of uint8 tensors by index: one gather per batch, resumable mid-epoch."""
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler


class TensorBatches(Dataset):
    """Images (N, C, H, W) uint8 and labels (N,) int64, indexed a whole batch at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]  # (B, C, H, W) uint8, (B,) int64


class EpochBatchSampler(Sampler):
    """Yields index batches; the order is a function of (seed, epoch) only, sharded by rank.

    Training (`even_shards`) gives every rank the same number of samples, dropping the tail that does not
    divide (DDP's gradient all-reduce needs the same number of steps on every rank). Evaluation shards
    everything, so each sample is scored exactly once: ranks may then differ by one sample and one batch,
    and a rank whose shard is empty (a split smaller than the world) yields one empty batch, so that it
    still runs the epoch's hooks (the metrics' gather at epoch end is a collective every rank must join).
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, even_shards: bool = True):
        self.num_samples, self.batch_size, self.shuffle = num_samples, batch_size, shuffle
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.even_shards = even_shards
        self.epoch = 0
        self._resume: Optional[tuple[int, int]] = None  # (epoch, batches already consumed)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        self._resume = (epoch, batches_done)

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        if self.even_shards:  # the tail that does not divide evenly is dropped
            order = order[:self.num_samples - self.num_samples % self.world_size]
        return order[self.rank::self.world_size]

    def _per_rank(self) -> int:
        if self.even_shards:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        per_rank = self._per_rank()
        if per_rank == 0 and not self.even_shards and self.num_samples:
            return 1  # the one empty batch (see the class docstring); an empty split has no batches on any rank
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self):
        skip = 0
        if self._resume is not None:  # Lightning may iterate once before set_epoch: keep it until the epoch comes
            epoch, done = self._resume
            if epoch == self.epoch:
                skip, self._resume = done, None
            elif self.epoch > epoch:
                self._resume = None
        indices = self._indices()
        batches = list(indices.split(self.batch_size)) if len(indices) else []
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if not batches and not self.even_shards and self.num_samples:
            batches = [indices]  # empty
        yield from batches[skip:]


class InOrderBatchSampler(EpochBatchSampler, SequentialSampler):
    """An EpochBatchSampler that never shuffles (evaluation, and training under `trainer.overfit_batches`), and says
    so to Lightning: with `overfit_batches` it rebuilds any loader whose sampler is not a SequentialSampler, which
    cannot work for a loader of index batches (and failed with "Trying to inject parameters into BatchLoader")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert not self.shuffle


class BatchLoader(DataLoader):
    """A DataLoader over whole index batches with `state_dict()` so Lightning can resume mid-epoch.

    `progress` returns how many batches of the current epoch training has consumed; the loader itself
    cannot know, because Lightning pre-fetches one batch ahead.
    """

    def __init__(self, dataset: TensorBatches, sampler: EpochBatchSampler, pin_memory: bool = False,
                 progress: Optional[Callable[[], int]] = None):
        # its own generator: DataLoader draws a base seed per iterator, which must not consume the
        # global RNG (dropout's), or a resumed run would draw different dropout masks
        super().__init__(dataset, batch_size=None, sampler=sampler, pin_memory=pin_memory,
                         generator=torch.Generator())
        self.progress = progress

    def state_dict(self) -> dict:
        done = self.progress() if self.progress is not None else 0
        return {"epoch": self.sampler.epoch, "batches_done": done}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume(state["epoch"], state["batches_done"])
