"""Efficiency accounting: what a fit cost, for results.json and TensorBoard."""
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn

from lightning_modules.base import count_parameters


def device_name(trainer: pl.Trainer) -> str:
    device = trainer.strategy.root_device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class EfficiencyMonitor(pl.Callback):
    """Records device, precision, epochs, samples per epoch, trainable params per stage, time, throughput, memory."""

    def __init__(self):
        self.fit_seconds = 0.0
        self.train_seconds = 0.0
        self.images_seen = 0  # training images of every rank (a resume may change the number of processes)
        self.epochs_completed = 0
        self.fit_devices = None  # the processes of the latest fit (a test of its checkpoint may use others)
        self.epoch_samples = 0  # this rank's training images since the epoch (or its resume) started
        self.train_samples_per_epoch = 0
        # an epoch stopped mid-way (preemption, a step checkpoint) and resumed: what it had done before the stop
        self.epoch_images_before = 0  # of every rank
        self.epoch_seconds_before = 0.0  # training only
        self._in_epoch = False
        self.trainable_per_epoch: dict[str, int] = {}
        self._epoch_validation = 0.0
        self._fit_start = None

    def state_dict(self) -> dict:  # a resumed fit keeps adding to the same totals
        state = {k: getattr(self, k) for k in ("fit_seconds", "train_seconds", "images_seen", "epochs_completed",
                                                 "fit_devices", "train_samples_per_epoch", "trainable_per_epoch")}
        if self._fit_start is not None:  # saved inside a fit: its seconds so far (a stop never reaches on_fit_end)
            now = time.perf_counter()
            state["fit_seconds"] += now - self._fit_start
            if self._in_epoch:  # a resume from here goes on with this epoch: its images and seconds so far
                state["epoch_images_before"] = self._epoch_images()
                state["epoch_seconds_before"] = self._epoch_seconds(now)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        if "samples_seen" in state:  # an earlier version's checkpoint: one rank's count (exact for one process)
            state.setdefault("images_seen", state.pop("samples_seen"))
        self.__dict__.update(state)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()
        self.fit_devices = trainer.world_size
        if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def on_train_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()  # a mid-epoch resume skips on_train_epoch_start
        self._epoch_validation = 0.0
        self._in_epoch, self._world_size = True, trainer.world_size

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_samples, self.epoch_images_before, self.epoch_seconds_before = 0, 0, 0.0
        self._epoch_start = time.perf_counter()
        self._epoch_validation = 0.0  # seconds of validation inside this epoch (at its end, or val_check_interval)
        self._in_epoch, self._world_size = True, trainer.world_size
        trainable = count_parameters(pl_module)["trainable"]
        last = list(self.trainable_per_epoch.values())[-1] if self.trainable_per_epoch else None
        if trainable != last:  # a new stage (staged unfreezing) or the first epoch
            self.trainable_per_epoch[str(trainer.current_epoch)] = trainable

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        labels = batch[1]  # a tensor's shape[0] is its len() without Tensor.__len__'s Python frame and checks
        self.epoch_samples += labels.shape[0] if isinstance(labels, torch.Tensor) and labels.ndim else len(labels)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # not a separate `validate` run (the sanity check: reset later)
            self._epoch_validation += time.perf_counter() - self._validation_start

    def _epoch_images(self) -> int:
        return self.epoch_images_before + self.epoch_samples * self._world_size

    def _epoch_seconds(self, now: float) -> float:
        # Lightning validates at the end of the epoch before on_train_epoch_end: training time only
        return self.epoch_seconds_before + now - self._epoch_start - self._epoch_validation

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seconds = self._epoch_seconds(time.perf_counter())
        self._in_epoch = False
        self.train_seconds += seconds
        self.train_samples_per_epoch = self._epoch_images()
        self.images_seen += self.train_samples_per_epoch
        self.epochs_completed += 1
        if seconds > 0:
            pl_module.log("efficiency/images_per_s", self.train_samples_per_epoch / seconds)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_seconds += time.perf_counter() - self._fit_start
        self._fit_start, self._in_epoch = None, False

    def summary(self, trainer: pl.Trainer) -> dict:
        device = trainer.strategy.root_device
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        return {
            "device": device_name(trainer),
            "devices": self.fit_devices or trainer.world_size,
            "precision": str(trainer.precision),
            "epochs": max(trainer.current_epoch, self.epochs_completed),
            "train_samples_per_epoch": self.train_samples_per_epoch,
            "trainable_params_per_stage": self.trainable_per_epoch,
            "fit_seconds": round(self.fit_seconds, 2),
            "throughput_images_per_s": round(self.images_seen / self.train_seconds, 1) if self.train_seconds else None,
            "peak_memory_mb": round(peak, 1) if peak is not None else None,
        }
