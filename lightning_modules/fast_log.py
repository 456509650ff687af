"""Fast paths for `self.log` in the training loop (Lightning 2.6's `LightningModule.log` and `_ResultMetric.to`).

Every `self.log(...)` call ends in `_ResultMetric.to(value.device)`, which walks the whole `__dict__` of the
stored metric (an `nn.Module`: its hook and parameter dicts, its metadata dataclass, which it deep-copies) to
move tensors that are, from the second call on, already on that device. Measured on the 2-core CPU machine:
~0.5 ms per call, a third of Lightning's per-step overhead for the CIFAR CNN (benchmarks/training_loop.py).

The fast path returns at once when the same metric was already moved to the same device by the original
method and every tensor it holds directly is still there; anything else (the first call, a device change, a
new Lightning whose metric holds other things) goes through Lightning's own method. `install()` is idempotent
and a no-op when Lightning no longer has the method. tests/test_training_loop.py checks that every logged
value is unchanged.

`LightningModule.log` itself, for a value logged per step only (training_step's default: on_step, not on_epoch),
runs the same checks, builds and compares a metadata dataclass, clones the value twice and goes through
torchmetrics' update wrapper on every call: ~270 us per step inside a fit of the course notebook's ConvNet on the
2-core CPU, the largest per-step cost we add to Lightning's loop. After one call has gone through Lightning's method,
an identical call (same hook, name, options, a one-element float32/float64 tensor on the same device, the same
stored metric, no new epoch to reset) stores the value as that method would: a detached clone (synced as the
metadata says) as the metric's value and forward cache, one more update, nothing computed, not reset, the current
hook noted in the logger connector. Anything else goes through Lightning's method.
"""
from typing import NamedTuple, Optional

import torch

try:
    from lightning.pytorch import LightningModule
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultMetric
except ImportError:  # a Lightning that moved or removed it: keep its own behaviour
    LightningModule = _ResultMetric = None

_FLOATS = (torch.float32, torch.float64)  # what `_ResultMetric.update` stores without a conversion


def _tensors_on(metric, device: torch.device) -> bool:
    return all(value.device == device for value in metric.__dict__.values() if isinstance(value, torch.Tensor))


class _Slot(NamedTuple):
    """What an identical later call must match to update `metric` directly."""
    metric: object  # the stored _ResultMetric
    device: torch.device
    options: dict  # the keyword arguments of the call
    step: object  # the module's training_step function (Lightning checks its signature on every call)
    others: tuple  # the metric's other states (its batch-size count): Lightning's method would move them too


def _moved(slot: _Slot, device: torch.device) -> bool:
    for other in slot.others:  # a loop, not a generator: one Python frame less on a cold path
        if getattr(slot.metric, other).device != device:
            return True
    return False


def _step_value_slot(module, results, key: str, value: torch.Tensor, options: dict) -> Optional[_Slot]:
    """The slot of a per-step-only tensor value that an identical call may update directly, or None."""
    trainer = module._trainer
    metric = results.get(key)
    meta = getattr(metric, "meta", None)
    if (meta is None or not metric.is_tensor or not meta.on_step or meta.on_epoch or meta.enable_graph
            or results.dataloader_idx is not None or metric.compute_on_cpu or trainer.barebones
            or (options.get("logger") and trainer.logger is None)  # a warning Lightning gives on every call
            or any(key in metric.__dict__.get(where, ()) for where in ("_parameters", "_buffers", "_modules")
                   for key in ("value", "_forward_cache", "_computed", "_update_count", "has_reset"))):
        return None
    others = tuple(name for name in getattr(metric, "_defaults", {}) if name != "value")
    return _Slot(metric, value.device, dict(options), getattr(module.training_step, "__func__", None), others)


def _install_log() -> None:
    original = getattr(LightningModule, "log", None)
    if original is None or getattr(original, "_fast_path", False):
        return

    def log(self, name, value, *args, **options):
        trainer = self.__dict__.get("_trainer")
        results = trainer._results if trainer is not None and not args and type(value) is torch.Tensor else None
        if results is None or self._fabric is not None:
            return original(self, name, value, *args, **options)
        fx, device = self._current_fx_name, value.device
        key = f"{fx}.{name}"
        slot = results.__dict__.get("_fast_log_slots", {}).get(key)
        connector = trainer._logger_connector
        if (slot is None or slot.metric is not results.get(key) or slot.device != device or slot.options != options
                or slot.step is not getattr(self.training_step, "__func__", None) or value.dtype not in _FLOATS
                or value.numel() != 1 or results.dataloader_idx is not None or connector.should_reset_tensors(fx)
                or _moved(slot, device)):
            original(self, name, value, **options)
            if value.dtype in _FLOATS and (slot := _step_value_slot(self, results, key, value, options)):
                results.__dict__.setdefault("_fast_log_slots", {})[key] = slot
            return
        metric = slot.metric
        # `_ResultMetric.update`, on_step only; a 0-d value that needs no grad (the usual `loss.detach()`) is its own
        # detached 0-d view: no op is spent making one (this is the first Python after the forward: it runs cold)
        stored = value if value.ndim == 0 and not value.requires_grad else value.detach().reshape(())
        stored = metric.meta.sync(stored.clone())
        set_attribute = object.__setattr__  # none of these is a parameter, buffer or submodule (checked above)
        set_attribute(metric, "_computed", None)  # torchmetrics' update wrapper
        set_attribute(metric, "_update_count", metric._update_count + 1)
        set_attribute(metric, "_forward_cache", stored)
        set_attribute(metric, "value", stored)
        set_attribute(metric, "has_reset", False)  # `_ResultCollection.update_metrics`
        connector._current_fx = fx

    log._fast_path = True
    log.__wrapped__ = original
    LightningModule.log = log


def install() -> None:
    if LightningModule is not None:
        _install_log()
    original = getattr(_ResultMetric, "to", None)
    if original is None or getattr(original, "_fast_path", False):
        return

    def to(self, *args, **kwargs):
        device = args[0] if len(args) == 1 and not kwargs else None
        if isinstance(device, torch.device) and self.__dict__.get("_moved_to") == device and _tensors_on(self, device):
            return self
        result = original(self, *args, **kwargs)
        if isinstance(device, torch.device):
            object.__setattr__(self, "_moved_to", device)
        return result

    to._fast_path = True
    to.__wrapped__ = original
    _ResultMetric.to = to
