"""What the training step logs; the fast paths for `self.log` and for hook dispatch change no logged value or hook."""
import gc
import os
import sys
import weakref
from contextlib import nullcontext

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultMetric

from datamodules import DigitsDataModule
from lightning_modules import MLP, fast_log

DIGITS = [str(i) for i in range(10)]


class Record(pl.Callback):
    """Every step's logged metrics as the progress bar, the callbacks and the loggers see them."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({kind: {key: float(value) for key, value in metrics.items()} for kind, metrics in (
            ("bar", trainer.progress_bar_metrics), ("callback", trainer.callback_metrics),
            ("logged", trainer.logged_metrics))})
        stored = trainer._results["training_step.train/loss"]  # what self.log left in Lightning's result collection
        self.steps[-1]["stored"] = (float(stored.value), float(stored._forward_cache), stored._update_count,
                                    stored.has_reset, stored._computed, stored.value is stored._forward_cache,
                                    stored.value.dtype, stored.value.shape, trainer._logger_connector._current_fx)

    def on_train_epoch_end(self, trainer, pl_module):  # runs before the module's hook: the epoch values come after
        self.steps.append("epoch end")


def fit(tmp_path, epochs=2, **model_kwargs):
    pl.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=128, seed=0)
    model = MLP(hidden=[32], norm="none", dropout=0.0, class_names=DIGITS, input_shape=(1, 8, 8), **model_kwargs)
    record = Record()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[record], default_root_dir=str(tmp_path), limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    return model, datamodule, trainer, record


def test_train_accuracy_is_the_epochs_accuracy(tmp_path):
    # a learning rate too small to change a prediction: the model is fixed, so the epoch's accuracy is known
    model, datamodule, trainer, _ = fit(tmp_path, epochs=1, lr=1e-12, weight_decay=0.0)
    images, labels = datamodule.splits["train"].images, datamodule.splits["train"].labels
    with torch.no_grad():
        expected = (model(datamodule.transform(images)).argmax(1) == labels).float().mean()
    assert trainer.callback_metrics["train/acc"] == pytest.approx(float(expected), abs=1e-6)
    assert not model.train_metrics.update_called  # reset for the next epoch


def test_fast_log_path_leaves_every_logged_value_unchanged(tmp_path, monkeypatch):
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection

    original_log, lightning_calls = _ResultCollection.log, []
    monkeypatch.setattr(_ResultCollection, "log", lambda self, fx, name, *args, **kwargs: (
        lightning_calls.append(name), original_log(self, fx, name, *args, **kwargs))[1])
    fast_model, _, _, fast = fit(tmp_path / "fast")
    steps = sum(step != "epoch end" for step in fast.steps)
    assert lightning_calls.count("train/loss") <= 2 * 2  # at most two per epoch go through Lightning's method
    monkeypatch.setattr(_ResultMetric, "to", _ResultMetric.to.__wrapped__)  # Lightning's own methods
    monkeypatch.setattr(pl.LightningModule, "log", pl.LightningModule.log.__wrapped__)
    lightning_calls.clear()
    slow_model, _, _, slow = fit(tmp_path / "slow")
    assert lightning_calls.count("train/loss") == steps
    assert fast.steps == slow.steps and steps > 20
    assert {"train/loss", "train/acc"} <= set(fast.steps[-2]["callback"])  # the second epoch sees the first's acc
    for key, value in fast_model.state_dict().items():
        assert torch.equal(value, slow_model.state_dict()[key]), key


class Logs(pl.LightningModule):
    """Logs `calls(batch_idx)` in every training step: (name, value, options) each."""

    def __init__(self, calls):
        super().__init__()
        self.layer, self.calls = torch.nn.Linear(2, 1), calls

    def training_step(self, batch, batch_idx):
        for name, value, options in self.calls(batch_idx):
            self.log(name, value, **options)
            if isinstance(value, torch.Tensor):
                value.data.add_(100)  # changed in place after logging: the logged value must not change
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_logs(tmp_path, calls, steps=4):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(steps, 2)), batch_size=1)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(Logs(calls), data)
    return trainer


@pytest.mark.parametrize("late, error", [
    (("x", torch.tensor(1.0), {"prog_bar": True}), "twice in `training_step` with different arguments"),
    (("x", torch.ones(2), {}), "must have a single element"),
])
def test_a_per_step_log_that_differs_still_meets_lightnings_checks(tmp_path, late, error):
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    calls = lambda i: [("x", torch.tensor(float(i)), {})] if i < 2 else [late]  # noqa: E731
    with pytest.raises((MisconfigurationException, ValueError), match=error):
        _fit_logs(tmp_path, calls)


def test_per_step_logs_of_other_kinds_keep_lightnings_values(tmp_path):
    # not per-step-only tensors (a number, a half-precision loss, an epoch mean, a second key) keep their path and
    # values; each key's stored value is the last step's, converted as Lightning converts it
    calls = lambda i: [("n", i + 1, {}), ("h", torch.tensor(i + 0.5, dtype=torch.float16), {}),  # noqa: E731
                       ("m", torch.tensor(float(i)), {"on_epoch": True}), ("d", torch.tensor([[2.0 * i]]), {}),
                       ("g", torch.tensor(3.0, requires_grad=True) * i, {})]
    trainer = _fit_logs(tmp_path, calls)
    metrics = trainer.callback_metrics
    assert {key: float(metrics[key]) for key in ("n", "h", "m_step", "m_epoch", "d", "g")} == {
        "n": 4.0, "h": 3.5, "m_step": 3.0, "m_epoch": 1.5, "d": 6.0, "g": 9.0}
    assert metrics["h"].dtype == torch.float32 and metrics["d"].shape == () and not metrics["g"].requires_grad


def test_a_stored_metric_moved_behind_the_fast_paths_back_goes_through_lightnings_method(tmp_path, monkeypatch):
    # e.g. the result collection's .cpu() at a loop's teardown moved its states off the GPU: Lightning's method
    # moves them back, so the fast path must leave the call to it
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection

    original_log, through_lightning = _ResultCollection.log, []

    def log(self, fx, name, value, *args, **kwargs):
        through_lightning.append(float(value))
        stored = self.get(f"{fx}.{name}")
        if stored is not None and stored.cumulated_batch_size.device.type == "meta":  # what its .to() would do
            stored.cumulated_batch_size = torch.tensor(0)
        return original_log(self, fx, name, value, *args, **kwargs)

    monkeypatch.setattr(_ResultCollection, "log", log)

    class Moves(Logs):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:  # moved away (the meta device stands in for another device)
                stored = self.trainer._results["training_step.x"]
                stored.cumulated_batch_size = stored.cumulated_batch_size.to("meta")
            self.log("x", torch.tensor(float(batch_idx)))
            return self.layer(batch[0]).sum()

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(5, 2)), batch_size=1)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(Moves(None), data)
    assert through_lightning == [0.0, 2.0]  # the first call, and the one after the move; the others fast
    assert float(trainer.callback_metrics["x"]) == 4.0


def test_fast_log_path_skips_only_what_is_already_in_place():
    from lightning.pytorch.trainer.connectors.logger_connector.result import _Metadata

    fast_log.install()  # idempotent: installed once when lightning_modules is imported
    assert _ResultMetric.to._fast_path and not getattr(_ResultMetric.to.__wrapped__, "_fast_path", False)
    metric = _ResultMetric(_Metadata(fx="training_step", name="loss"), is_tensor=True)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert metric.to(cpu) is metric and metric.__dict__["_moved_to"] == cpu  # the first call: Lightning's method
    before = dict(metric.__dict__)
    assert metric.to(cpu) is metric and all(metric.__dict__[key] is value for key, value in before.items())
    metric.to(meta)  # another device goes through Lightning's method and really moves the state
    assert metric.value.device == meta and metric.cumulated_batch_size.device == meta
    metric.value = torch.tensor(1.0)  # a state put back on the CPU behind its back: the fast path notices
    metric.to(meta)
    assert metric.value.device == meta


def test_train_loss_reaches_the_bar_without_a_per_step_conversion(tmp_path):
    # prog_bar=True would make Lightning call .item() on the loss after every batch (a GPU sync per step)
    from callbacks.progress import LossProgressBar
    _, _, trainer, record = fit(tmp_path, epochs=1)
    assert all("train/loss" not in step["bar"] for step in record.steps if step != "epoch end")
    assert "train/loss" in record.steps[-2]["callback"]
    bar = LossProgressBar()
    metrics = bar.get_metrics(trainer, trainer.lightning_module)
    assert metrics["train/loss"] == pytest.approx(float(trainer.callback_metrics["train/loss"]))


@pytest.mark.parametrize("min_interval", [0.0, 3600.0])
def test_the_bar_redraws_once_per_refresh_and_at_most_every_min_interval(tmp_path, monkeypatch, min_interval):
    from callbacks.progress import LossProgressBar

    draws = []  # (epoch, batch, bar.n, postfix) at each terminal write in on_train_batch_end

    class Counted(LossProgressBar):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            bar, writes = self.train_progress_bar, []
            monkeypatch.setattr(bar, "refresh", lambda *a, **k: writes.append(1))
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            monkeypatch.undo()
            draws.extend([(trainer.current_epoch, batch_idx + 1, bar.n, bar.postfix)] * len(writes))

    pl.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64, seed=0)
    model = MLP(hidden=[16], class_names=DIGITS, input_shape=(1, 8, 8))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path),
                         callbacks=[Counted(refresh_rate=5, min_interval=min_interval)])
    trainer.fit(model, datamodule=datamodule)
    total = trainer.num_training_batches
    assert total % 5 and total > 10
    every_5 = [n for n in range(5, total + 1, 5)] + [total]
    if min_interval:  # the first multiple of 5 draws, then nothing until an epoch's last batch
        assert [(e, n) for e, n, _, _ in draws] == [(0, 5), (0, total), (1, total)]
    else:
        assert [(e, n) for e, n, _, _ in draws] == [(e, n) for e in (0, 1) for n in every_5]  # one write each
    assert all(shown == n and "train/loss=" in postfix for _, n, shown, postfix in draws)


def _recorded_fit(tmp_path, *extra):
    """A fit through cli.py with every default callback, recording each hook with the module's current fx name."""
    import cli
    from lightning.pytorch.callbacks import Callback

    calls = []

    class Everything(Callback):
        pass

    for name in dir(Callback):
        if name.startswith("on_") or name in ("setup", "teardown"):
            setattr(Everything, name, lambda self, trainer, module, *args, _name=name, **kwargs: calls.append(
                ("callback", _name, module._current_fx_name)))
    run = cli.main(["--config", "configs/quickstart.yaml", "--trainer.max_epochs", "2", "--log_dir",
                    str(tmp_path), "--trainer.enable_progress_bar", "false", *extra], run=False)
    model = run.model
    for name in dir(pl.LightningModule):
        # the batch-transfer hooks are left alone: Lightning takes the datamodule's unless the model overrides them
        if name.startswith("on_") and "batch_transfer" not in name:
            def hook(*args, _name=name, _bound=getattr(model, name), **kwargs):
                calls.append(("module", _name, model._current_fx_name))
                return _bound(*args, **kwargs)
            model.__dict__[name] = hook  # an instance attribute: found by getattr, never an empty hook
    run.trainer.callbacks.append(Everything())
    run.trainer.fit(model, datamodule=run.datamodule)
    return model, run.trainer, calls


def _lightnings_own_loop(monkeypatch) -> None:
    """Every fast path of lightning_modules/fast_hooks.py replaced by the Lightning function it stands for."""
    from lightning.pytorch.loops.optimization.automatic import ClosureResult
    from lightning.pytorch.trainer import call
    from lightning.pytorch.trainer.connectors.data_connector import _DataHookSelector
    from lightning_modules import fast_hooks

    for name in fast_hooks.NAMES:
        assert getattr(call, name)._fast_path
        monkeypatch.setattr(call, name, getattr(call, name).__wrapped__)  # Lightning's own dispatch
    assert _DataHookSelector.get_instance._fast_path
    monkeypatch.setattr(_DataHookSelector, "get_instance", _DataHookSelector.get_instance.__wrapped__)
    fast = ClosureResult.__dict__["from_training_step_output"].__func__
    assert fast._fast_path
    monkeypatch.setattr(ClosureResult, "from_training_step_output", classmethod(fast.__wrapped__))


@pytest.mark.parametrize("extra", [[], ["--trainer.accumulate_grad_batches", "2"]], ids=["plain", "accumulate"])
def test_fast_hook_dispatch_calls_the_same_hooks_in_the_same_order(tmp_path, monkeypatch, extra):
    from lightning_modules import fast_hooks

    fast_model, fast_trainer, fast_calls = _recorded_fit(tmp_path / "fast", *extra)
    assert fast_hooks._fast(fast_trainer)  # the default profiler: the fast path was taken
    _lightnings_own_loop(monkeypatch)
    slow_model, slow_trainer, slow_calls = _recorded_fit(tmp_path / "slow", *extra)
    assert fast_calls == slow_calls and len(fast_calls) > 100
    assert ("callback", "on_train_batch_end", "on_train_batch_end") in fast_calls
    assert ("module", "on_before_backward", "on_before_backward") in fast_calls
    for key, value in fast_model.state_dict().items():
        assert torch.equal(value, slow_model.state_dict()[key]), key
    assert fast_trainer.callback_metrics.keys() == slow_trainer.callback_metrics.keys()
    for key, value in fast_trainer.callback_metrics.items():
        if not key.startswith("efficiency/"):  # timings
            assert torch.equal(value, slow_trainer.callback_metrics[key]), key
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= fast_trainer.callback_metrics.keys()


def test_callbacks_added_or_removed_during_an_epoch_are_seen_from_the_next_hook(tmp_path, monkeypatch):
    from lightning.pytorch.trainer import call
    from lightning_modules import fast_hooks

    def run():
        seen = []

        class Late(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                seen.append(("late", batch_idx))

            def on_after_backward(self, trainer, pl_module):
                seen.append(("late backward", trainer.global_step))

        late = Late()

        class Changer(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx == 2:
                    trainer.callbacks.append(late)
                elif batch_idx == 4:
                    trainer.callbacks.remove(late)
                elif batch_idx == 5:  # replaced in place: the same list, the same length
                    trainer.callbacks[trainer.callbacks.index(self)] = late

        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(7, 2)), batch_size=1)
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False, callbacks=[Changer()],
                             default_root_dir=str(tmp_path))
        trainer.fit(Logs(lambda i: []), data)
        return seen

    fast = run()
    assert fast == [("late backward", 2), ("late", 2), ("late backward", 3), ("late", 3),
                    ("late backward", 5), ("late", 5), ("late backward", 6), ("late", 6)]
    for name in fast_hooks.NAMES:
        monkeypatch.setattr(call, name, getattr(call, name).__wrapped__)  # Lightning's own dispatch
    assert run() == fast


def test_a_profiler_still_sees_every_callback_hook(tmp_path):
    _, trainer, _ = _recorded_fit(tmp_path, "--trainer.profiler", "simple")
    recorded = trainer.profiler.recorded_durations
    for callback in trainer.callbacks:  # Lightning profiles every callback's hook, empty or not
        assert f"[Callback]{callback.state_key}.on_train_batch_end" in recorded, callback
    assert any(key.startswith("[LightningModule]") for key in recorded)
    assert any(key.startswith("[Strategy]") for key in recorded)


def test_the_batch_hook_selector_answers_as_lightning_and_notices_a_changed_hook():
    import warnings

    from lightning.pytorch.trainer.connectors.data_connector import _DataHookSelector

    lightning = _DataHookSelector.get_instance.__wrapped__

    class Data(pl.LightningDataModule):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            return batch

    class Model(pl.LightningModule):
        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return batch

    model, data, other = Model(), Data(), Data()
    selector = _DataHookSelector(model, data)

    def agrees():
        for hook in selector._valid_hooks:
            for _ in range(2):  # the second answer comes from what was kept
                assert selector.get_instance(hook) is lightning(selector, hook), hook

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's note that the model's transfer hook is used
        agrees()
        assert [selector.get_instance(h) for h in selector._valid_hooks] == [model, model, data]
        data.on_before_batch_transfer = lambda batch, dataloader_idx: batch  # an instance's own hook
        agrees()
        assert selector.get_instance("on_before_batch_transfer") is data
        Data.transfer_batch_to_device = lambda self, batch, device, dataloader_idx: batch  # the class's hook
        try:
            agrees()
            assert selector.get_instance("transfer_batch_to_device") is data
        finally:
            del Data.transfer_batch_to_device
        agrees()
        selector.datamodule = other  # another datamodule: its own answers
        agrees()
        assert selector.get_instance("on_before_batch_transfer") is model
        selector.datamodule = None
        agrees()
        with pytest.raises(ValueError, match="not a shared hook"):
            _DataHookSelector(model, data).get_instance("training_step")


def test_the_closure_result_without_the_division_by_one_holds_the_same_loss_and_gradients():
    from lightning.pytorch.loops.optimization.automatic import ClosureResult

    lightning = ClosureResult.__dict__["from_training_step_output"].__func__.__wrapped__
    weight = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    cases = [((weight * 2).sum(), 1), ((weight * 2).sum(), 4), ((weight * 2).double().sum(), 1),
             ({"loss": (weight ** 2).sum(), "extra": 7}, 1), ({"loss": (weight ** 2).sum()}, 3), (None, 1)]
    for output, normalize in cases:
        fast = ClosureResult.from_training_step_output(output, normalize)
        slow = lightning(ClosureResult, output, normalize)
        assert fast.extra == slow.extra and (fast.closure_loss is None) == (slow.closure_loss is None)
        if slow.closure_loss is None:
            continue
        assert fast.closure_loss.dtype == slow.closure_loss.dtype and torch.equal(fast.closure_loss, slow.closure_loss)
        assert torch.equal(fast.loss, slow.loss) and not fast.loss.requires_grad
        fast_grad, = torch.autograd.grad(fast.closure_loss, weight, retain_graph=True)
        slow_grad, = torch.autograd.grad(slow.closure_loss, weight, retain_graph=True)
        assert torch.equal(fast_grad, slow_grad)
        # the fast path hands over the step's own tensor exactly where Lightning would divide by 1
        assert (fast.closure_loss is output) == (normalize == 1 and isinstance(output, torch.Tensor))
    integer = ClosureResult.from_training_step_output(torch.tensor(3), 1)  # not floating: Lightning's division
    assert integer.closure_loss.dtype == lightning(ClosureResult, torch.tensor(3), 1).closure_loss.dtype
    with pytest.raises(Exception, match="must return a Tensor, a dict, or None"):
        ClosureResult.from_training_step_output(3.0, 1)


def test_empty_hooks_are_recognised_on_their_bytecode():
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning_modules import fast_hooks

    def documented():
        """Only a docstring."""

    def returns_zero():
        return 0

    def generator():
        yield

    assert fast_hooks._is_empty(Callback.on_train_batch_end) and fast_hooks._is_empty(documented)
    assert fast_hooks._is_empty(pl.LightningModule.on_before_backward)
    assert not fast_hooks._is_empty(ModelCheckpoint.on_train_batch_end)
    assert not fast_hooks._is_empty(pl.LightningModule.on_after_batch_transfer)
    assert not any(fast_hooks._is_empty(f) for f in (returns_zero, generator, None, print))
    for _ in range(2):  # the second answers come from the cache
        assert fast_hooks._is_empty(documented) and not fast_hooks._is_empty(returns_zero)

    class Redefined(Callback):  # a notebook cell run again defines a new class: the old one must not be kept
        def on_train_start(self, trainer, pl_module):
            pass

    assert fast_hooks._is_empty(Redefined.on_train_start) and Redefined.on_train_start.__code__ in fast_hooks._EMPTY
    cached = [weakref.ref(f) for f in (Redefined, Redefined.on_train_start, documented, returns_zero)]
    del Redefined, documented, returns_zero
    gc.collect()
    assert all(ref() is None for ref in cached)


class GradsAtBackward(pl.Callback):
    """Whether every gradient was cleared before each backward (Lightning zeroes between forward and backward)."""

    def __init__(self):
        self.cleared = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.cleared.append(all(p.grad is None for p in pl_module.parameters()))


def _fit_with(tmp_path, optimizer, accumulate, profile=False):
    pl.seed_everything(0)
    model = MLP(hidden=[32], norm="batch", dropout=0.1, class_names=DIGITS, input_shape=(1, 8, 8), optimizer=optimizer)
    grads = GradsAtBackward()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[grads], default_root_dir=str(tmp_path), limit_val_batches=0,
                         accumulate_grad_batches=accumulate)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else nullcontext() as prof:
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=128, seed=0))
    return model, grads.cleared, prof


@pytest.mark.parametrize("optimizer, accumulate", [("adamw", 1), ("sgd", 2)])
def test_zero_grad_and_batch_transfer_train_as_lightnings_defaults(tmp_path, monkeypatch, optimizer, accumulate):
    from datamodules.base import ImageDataModule
    from lightning_modules.base import ClassificationModule

    model, cleared, _ = _fit_with(tmp_path / "ours", optimizer, accumulate)
    # Lightning's own hooks
    monkeypatch.setattr(ClassificationModule, "optimizer_zero_grad", pl.LightningModule.optimizer_zero_grad)
    monkeypatch.setattr(ImageDataModule, "transfer_batch_to_device", pl.LightningDataModule.transfer_batch_to_device)
    reference, reference_cleared, _ = _fit_with(tmp_path / "lightning", optimizer, accumulate)
    assert cleared == reference_cleared and len(cleared) > 10
    # cleared before a backward only where an optimizer step came before it (accumulation keeps the sum)
    assert all(cleared) if accumulate == 1 else (any(cleared) and not all(cleared))
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key


def test_a_torch_profile_still_records_the_optimizers_zero_grad(tmp_path):
    _, cleared, prof = _fit_with(tmp_path, "adamw", 1, profile=True)
    assert all(cleared)
    names = {event.key for event in prof.key_averages()}
    assert any(name.startswith("Optimizer.zero_grad#AdamW") for name in names), sorted(names)[:20]


def test_a_batch_already_on_the_device_is_not_walked_again(tmp_path):
    datamodule = DigitsDataModule(batch_size=4)
    batch = (torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert datamodule.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch
    kept = datamodule.transfer_batch_to_device(list(batch), torch.device("cpu"), 0)
    assert len(kept) == 2 and all(a is b for a, b in zip(kept, batch))
    for other in (list(batch), {"images": batch[0]}):  # to another device, and any other type: Lightning's walk
        moved = datamodule.transfer_batch_to_device(other, torch.device("meta"), 0)
        assert type(moved) is type(other)
        assert all(t.device.type == "meta" for t in (moved.values() if isinstance(moved, dict) else moved))
    mixed = (batch[0].to("meta"), batch[1])  # one tensor elsewhere: everything goes to the device
    assert all(t.device.type == "meta" for t in datamodule.transfer_batch_to_device(mixed, torch.device("meta"), 0))


class OwnTransfer(MLP):
    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        images, labels = super().transfer_batch_to_device(batch, device, dataloader_idx)
        self.moved = getattr(self, "moved", 0) + 1
        return images, labels


def test_a_models_own_batch_transfer_is_still_used_and_a_fit_warns_about_none_of_ours(tmp_path, recwarn):
    for model_class in (MLP, OwnTransfer):
        model = model_class(hidden=[8], class_names=DIGITS, input_shape=(1, 8, 8))
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                             default_root_dir=str(tmp_path), limit_val_batches=0, limit_train_batches=3)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, seed=0))
    assert model.moved == 3
    messages = [str(w.message) for w in recwarn if "overridden" in str(w.message)]
    assert all("both" in m for m in messages), messages  # only the model that overrides it is warned about


def test_top_one_accuracy_is_torchmetrics_micro_accuracy():
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_modules.base import TopOneAccuracy

    ours, reference = TopOneAccuracy(), MulticlassAccuracy(7, average="micro")
    generator = torch.Generator().manual_seed(0)
    for size in (5, 64, 1):
        logits = torch.randint(0, 3, (size, 7), generator=generator).float()  # many ties: first index wins
        labels = torch.randint(0, 7, (size,), generator=generator)
        ours.update(logits, labels)
        reference.update(logits, labels)
    assert ours.compute() == pytest.approx(float(reference.compute()), abs=1e-7) and ours.total == 70
    ours.reset()
    assert ours.correct == 0 and ours.total == 0
    ours.update(logits, labels)  # counted in place: the defaults that reset() restores must not move
    ours.reset()
    assert ours.correct == 0 and ours.total == 0


def test_top_one_accuracy_counts_what_it_holds_before_any_value_is_read():
    from lightning_modules.base import TopOneAccuracy

    held, direct = TopOneAccuracy(every=3), TopOneAccuracy()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(size, 5, generator=generator, requires_grad=True),
                torch.randint(0, 5, (size,), generator=generator)) for size in (4, 7, 1, 6, 2)]
    for i, (logits, labels) in enumerate(batches):
        held.add(logits, labels)
        direct.update(logits.detach(), labels)
        assert len(held._pending) == (i + 1) % 3  # counted together every third step
        assert all(not logits.requires_grad for logits, _ in held._pending)  # no autograd graph is kept alive
    assert held.total == 12  # the first three batches are counted
    held.sync(should_sync=False)  # a sync (what compute() does first) counts the rest, on every rank
    held.unsync(should_unsync=False)
    assert (held.correct, held.total) == (direct.correct, direct.total) == (held.correct, 20)
    assert held.compute() == direct.compute()
    held.add(*batches[0])
    held.reset()  # a new epoch forgets what the last one held
    held.flush()
    assert held.total == 0 and not held.update_called


def test_signature_answers_are_cached_per_function_and_stay_right():
    from lightning.pytorch.utilities import signature_utils
    from lightning.pytorch.core import module as core_module
    from lightning.pytorch.loops import training_epoch_loop

    cached = signature_utils.is_param_in_hook_signature
    assert cached._fast_path and core_module.is_param_in_hook_signature is cached
    assert training_epoch_loop.is_param_in_hook_signature is cached

    class Steps:
        def with_index(self, batch, batch_idx):
            pass

        def iterator(self, dataloader_iter):
            pass

    for _ in range(2):  # the second answer comes from the cache
        assert cached(Steps().with_index, "batch_idx", min_args=2)
        assert not cached(Steps().iterator, "batch_idx", min_args=2)
        assert cached(Steps().iterator, "dataloader_iter", explicit=True)
        assert not cached(Steps().with_index, "dataloader_iter", explicit=True)
        assert cached(lambda *args: None, "batch_idx") and not cached(lambda *args: None, "x", explicit=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_for_the_next_step():
    # glibc's defaults hand a step's freed heap back to the OS and fault it in again on the next step. Its mmap
    # threshold moves up with what the process has freed so far (imports included), so both runs first pin the
    # defaults it starts from (128 KiB), the state in which a training process met the re-faulting.
    import subprocess

    from tests.conftest import ROOT

    program = """import ctypes, resource, sys, torch
import cli
libc = ctypes.CDLL(None)
assert libc.mallopt(-3, 128 << 10) and libc.mallopt(-1, 128 << 10)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
applied = cli.keep_freed_memory() if sys.argv[1] == "tuned" else None
def step():
    blocks = [torch.ones(1 << 18) for _ in range(30)]  # 30 x 1 MiB, as a step's activations
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {}
    for kind in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", program, kind], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
        assert out.returncode == 0, out.stderr[-2000:]
        applied, count = out.stdout.split()[-2:]
        faults[kind] = int(count)
    assert applied == "True"
    assert faults["default"] > 20 * 30 * 128 and faults["tuned"] < faults["default"] / 20, faults


@pytest.mark.parametrize("nvml_loads", [False, True])
def test_the_nvml_check_is_dropped_only_where_nvml_cannot_load(monkeypatch, nvml_loads):
    import ctypes

    import cli

    def load(name):
        assert name == "libnvidia-ml.so.1"
        if not nvml_loads:
            raise OSError(f"{name}: cannot open shared object file")

    real_cdll = ctypes.CDLL
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as lightning.fabric sets it; restored after
    answers = torch.cuda.is_available(), torch.accelerator.current_accelerator(check_available=True)
    monkeypatch.setattr(ctypes, "CDLL", load)
    assert cli.skip_absent_nvml() is not nvml_loads
    assert (os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1") is nvml_loads
    monkeypatch.setattr(ctypes, "CDLL", real_cdll)  # torch's own loads again, the variable as it was left
    assert (torch.cuda.is_available(), torch.accelerator.current_accelerator(check_available=True)) == answers


def test_a_cli_fit_without_nvml_does_not_try_to_load_it_every_step(tmp_path, monkeypatch):
    import ctypes

    import cli

    loads = []
    real_cdll = ctypes.CDLL

    def load(name, *args, **kwargs):
        if name == "libnvidia-ml.so.1":  # a machine without NVML, whatever this one has
            loads.append(name)
            raise OSError(f"{name}: cannot open shared object file")
        return real_cdll(name, *args, **kwargs)

    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    monkeypatch.setattr(ctypes, "CDLL", load)
    run = cli.main(["--config", "configs/quickstart.yaml", "--trainer.max_epochs", "2", "--log_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"], run=False)
    loads.clear()  # building the trainer may ask; training steps must not
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step > 5 and loads == []
