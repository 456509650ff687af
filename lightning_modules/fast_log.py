"""A fast path for `self.log` in the training loop (Lightning 2.6's `_ResultMetric.to`).

Every `self.log(...)` call ends in `_ResultMetric.to(value.device)`, which walks the whole `__dict__` of the
stored metric (an `nn.Module`: its hook and parameter dicts, its metadata dataclass, which it deep-copies) to
move tensors that are, from the second call on, already on that device. Measured on the 2-core CPU machine:
~0.5 ms per call, a third of Lightning's per-step overhead for the CIFAR CNN (benchmarks/training_loop.py).

The fast path returns at once when the same metric was already moved to the same device by the original
method and every tensor it holds directly is still there; anything else (the first call, a device change, a
new Lightning whose metric holds other things) goes through Lightning's own method. `install()` is idempotent
and a no-op when Lightning no longer has the method. tests/test_training_loop.py checks that every logged
value is unchanged.
"""
import torch

try:
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultMetric
except ImportError:  # a Lightning that moved or removed it: keep its own behaviour
    _ResultMetric = None


def _tensors_on(metric, device: torch.device) -> bool:
    return all(value.device == device for value in metric.__dict__.values() if isinstance(value, torch.Tensor))


def install() -> None:
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
