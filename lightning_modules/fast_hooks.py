"""A fast path for Lightning 2.6's hook dispatch (`lightning.pytorch.trainer.call`) when nothing profiles.

Every hook of every callback, of the LightningModule and of the strategy goes through three functions of
`lightning.pytorch.trainer.call`. Each call formats a `log.debug` message and, per callback, enters
`trainer.profiler.profile(f"[Callback]{callback.state_key}.{hook}")`, even with the default
`PassThroughProfiler`, whose start/stop do nothing; `ModelCheckpoint.state_key` alone repr()s a dict of its
settings. With ~10 callbacks and ~10 hooks per training step that is thousands of calls per epoch, most of
them to hooks a callback never overrides (the base `Callback`'s empty methods). And twice per training step
(`LightningModule.log`, the loop's `_build_kwargs`) Lightning runs `inspect.getfullargspec` on `training_step`
through `is_param_in_hook_signature` (~50 us each here): its answer depends only on the function, so it is cached
per function (weakly: a model's class can go away).

The fast path does exactly what Lightning does, minus the profiling context and the debug message, and skips
hooks whose function is empty (only a docstring or `pass`, checked on the bytecode); it is taken only while
the trainer's profiler is a plain `PassThroughProfiler` and Lightning's debug logging is off, so a `--trainer.
profiler simple` run still records every hook. The loops call these functions as `call.<name>` and call.py
calls them through its module globals, so replacing the module attributes covers every caller. `install()` is
idempotent and leaves Lightning alone when a function is missing. tests/test_training_loop.py checks the hook
order and every logged value against Lightning's own functions.

Two more pieces of Lightning's per-step path, each answer the same as Lightning's (measured inside a 2-core CPU fit of
the notebook ConvNet, where the code runs with cold caches after the backward; benchmarks/RESULTS.md):
- `_DataHookSelector.get_instance` (trainer/connectors/data_connector.py), asked three times per batch whether the
  model or the datamodule runs each batch-transfer hook, answered with up to three `is_overridden` calls each time
  (12-14 us per call): kept per hook for the fit (a selector is built per fit), and asked again when the model or the
  datamodule, their classes' hook or an instance's own hook attribute changed.
- `ClosureResult.from_training_step_output` (loops/optimization/automatic.py) divides the loss by the gradient
  accumulation factor, 1 by default, a new tensor and an autograd node per step that change no value: skipped for a
  floating-point tensor and a factor of 1 (a dict or anything else goes to Lightning's own code).
"""
import dis
import logging
import operator
import sys
import types
import weakref

import torch

try:
    from lightning.pytorch.profilers import PassThroughProfiler
    from lightning.pytorch.trainer import call
    from lightning.pytorch.callbacks import Checkpoint, EarlyStopping
    from lightning.pytorch.utilities import signature_utils
except ImportError:  # a Lightning that moved them: keep its own behaviour
    call = signature_utils = None
try:
    from lightning.pytorch.loops.optimization.automatic import ClosureResult
    from lightning.pytorch.trainer.connectors.data_connector import _DataHookSelector
except ImportError:
    ClosureResult = _DataHookSelector = None

NAMES = ("_call_callback_hooks", "_call_lightning_module_hook", "_call_strategy_hook")
_EMPTY: dict = {}  # code object -> whether it does nothing; keyed by code, which holds no class, module or closure


def _is_empty(function) -> bool:
    """A function that only returns None (a docstring and `pass` at most): calling it changes nothing."""
    code = getattr(function, "__code__", None)
    if code is None:
        return False
    empty = _EMPTY.get(code)
    if empty is None:
        empty = _EMPTY[code] = not code.co_flags & 0x20 and all(  # 0x20: a generator is not empty
            ins.opname in ("RESUME", "NOP", "RETURN_VALUE")
            or (ins.opname in ("LOAD_CONST", "RETURN_CONST") and ins.argval is None)
            for ins in dis.get_instructions(code))
    return empty


def _fast(trainer) -> bool:
    return type(trainer.profiler) is PassThroughProfiler and not call.log.isEnabledFor(logging.DEBUG)


# hooks called once or more per batch: their callbacks' non-empty methods are looked up once per epoch, not per call
# (per step, the lookups for ~6 hooks x 11 callbacks of cli.py cost ~0.15 ms inside a 2-core CPU fit, mostly for hooks
# no callback implements); any other hook (an epoch or stage boundary) drops what was kept
PER_BATCH = frozenset(f"on_{stage}_batch_{when}" for stage in ("train", "validation", "test", "predict")
                      for when in ("start", "end")) | {"on_before_backward", "on_after_backward", "on_before_zero_grad",
                                                        "on_before_optimizer_step"}


def _callback_functions(trainer, hook_name: str, monitoring_callbacks) -> list:
    """The bound `hook_name` methods of the trainer's callbacks that do something, in the callbacks' order."""
    callbacks = trainer.callbacks
    kept = trainer.__dict__.get("_fast_hook_functions")
    if kept:  # only per-batch hooks are kept
        entry = kept.get((hook_name, monitoring_callbacks))
        # the same callbacks in the same order (one appended, removed or replaced is noticed); map(is_) compares
        # in C, without a Python frame per callback (this runs cold, right after the backward, several times a step)
        if entry is not None and len(entry[0]) == len(callbacks) and all(map(operator.is_, entry[0], callbacks)):
            return entry[1]
    selected = callbacks
    if monitoring_callbacks is True:
        selected = [cb for cb in callbacks if isinstance(cb, (EarlyStopping, Checkpoint))]
    elif monitoring_callbacks is False:
        selected = [cb for cb in callbacks if not isinstance(cb, (EarlyStopping, Checkpoint))]
    functions = [fn for fn in (getattr(callback, hook_name) for callback in selected)
                 if callable(fn) and not _is_empty(getattr(fn, "__func__", None))]
    if hook_name in PER_BATCH:
        if kept is None:
            kept = trainer.__dict__["_fast_hook_functions"] = {}
        kept[(hook_name, monitoring_callbacks)] = (tuple(callbacks), functions)
    elif kept:
        kept.clear()  # an epoch or stage boundary: a callback changed since is seen from the next batch on
    return functions


def _set_fx(pl_module, name) -> None:
    # nn.Module.__setattr__ checks parameters, buffers and submodules before storing a plain string
    if type(pl_module).__setattr__ is torch.nn.Module.__setattr__:
        object.__setattr__(pl_module, "_current_fx_name", name)
    else:
        pl_module._current_fx_name = name


def _install_signature_cache() -> None:
    original = getattr(signature_utils, "is_param_in_hook_signature", None)
    if original is None or getattr(original, "_fast_path", False):
        return
    answers = weakref.WeakKeyDictionary()  # function -> {(bound, param, explicit, min_args): answer}

    def is_param_in_hook_signature(hook_fx, param, explicit=False, min_args=None):
        if type(hook_fx) not in (types.FunctionType, types.MethodType):  # a partial, a callable object: uncached
            return original(hook_fx, param, explicit, min_args)
        function = getattr(hook_fx, "__func__", hook_fx)
        key = (function is not hook_fx, param, explicit, min_args)
        known = answers.setdefault(function, {})
        if key not in known:
            known[key] = original(hook_fx, param, explicit, min_args)
        return known[key]

    is_param_in_hook_signature._fast_path = True
    is_param_in_hook_signature.__wrapped__ = original
    is_param_in_hook_signature.__doc__ = original.__doc__
    for name, module in list(sys.modules.items()):  # every Lightning module imported it by name
        if name.startswith("lightning.pytorch") and getattr(module, "is_param_in_hook_signature", None) is original:
            module.is_param_in_hook_signature = is_param_in_hook_signature


def _hook_state(selector, hook_name: str) -> tuple:
    """What `get_instance(hook_name)` depends on: the two objects, their classes' hook and their own hook attributes."""
    model, datamodule = selector.model, selector.datamodule
    return (model, datamodule, getattr(type(model), hook_name, None), getattr(type(datamodule), hook_name, None),
            model.__dict__.get(hook_name), datamodule.__dict__.get(hook_name))


def _install_hook_selector_cache() -> None:
    original = getattr(_DataHookSelector, "get_instance", None)
    if original is None or getattr(original, "_fast_path", False):
        return

    def get_instance(self, hook_name: str):
        if self.datamodule is None:  # Lightning answers at once
            return original(self, hook_name)
        kept = self.__dict__.setdefault("_fast_instances", {})
        entry = kept.get(hook_name)
        state = _hook_state(self, hook_name)
        if entry is None or len(entry[0]) != len(state) or not all(map(operator.is_, entry[0], state)):
            entry = kept[hook_name] = (state, original(self, hook_name))  # Lightning's answer (and its warnings)
        return entry[1]

    get_instance._fast_path = True
    get_instance.__wrapped__ = original
    get_instance.__doc__ = original.__doc__
    _DataHookSelector.get_instance = get_instance


def _install_closure_result_fast_path() -> None:
    original = ClosureResult.__dict__.get("from_training_step_output")
    if not isinstance(original, classmethod) or getattr(original.__func__, "_fast_path", False):
        return
    lightning_function = original.__func__

    def from_training_step_output(cls, training_step_output, normalize: int = 1):
        if normalize == 1 and type(training_step_output) is torch.Tensor and training_step_output.is_floating_point():
            return cls(training_step_output, extra={})  # Lightning: cls(training_step_output / 1, extra={})
        return lightning_function(cls, training_step_output, normalize)

    from_training_step_output._fast_path = True
    from_training_step_output.__wrapped__ = lightning_function
    from_training_step_output.__doc__ = lightning_function.__doc__
    ClosureResult.from_training_step_output = classmethod(from_training_step_output)


def install() -> None:
    if signature_utils is not None:
        _install_signature_cache()
    if _DataHookSelector is not None:
        _install_hook_selector_cache()
    if ClosureResult is not None:
        _install_closure_result_fast_path()
    if call is None or not all(callable(getattr(call, name, None)) for name in NAMES):
        return
    if getattr(call._call_callback_hooks, "_fast_path", False):
        return
    callback_hooks, module_hook, strategy_hook = (getattr(call, name) for name in NAMES)

    def _call_callback_hooks(trainer, hook_name, *args, monitoring_callbacks=None, **kwargs):
        if not _fast(trainer):
            return callback_hooks(trainer, hook_name, *args, monitoring_callbacks=monitoring_callbacks, **kwargs)
        functions = _callback_functions(trainer, hook_name, monitoring_callbacks)
        if not functions:  # no callback does anything here: nobody could see the module's current hook name
            return
        pl_module = trainer.lightning_module
        if pl_module:
            prev_fx_name = pl_module._current_fx_name
            _set_fx(pl_module, hook_name)
        for fn in functions:
            fn(trainer, trainer.lightning_module, *args, **kwargs)
        if pl_module:
            _set_fx(pl_module, prev_fx_name)

    def _call_lightning_module_hook(trainer, hook_name, *args, pl_module=None, **kwargs):
        if not _fast(trainer):
            return module_hook(trainer, hook_name, *args, pl_module=pl_module, **kwargs)
        pl_module = pl_module or trainer.lightning_module
        if pl_module is None:
            raise TypeError("No `LightningModule` is available to call hooks on.")
        fn = getattr(pl_module, hook_name)
        if not callable(fn) or _is_empty(getattr(fn, "__func__", None)):
            return None
        prev_fx_name = pl_module._current_fx_name
        _set_fx(pl_module, hook_name)
        output = fn(*args, **kwargs)
        _set_fx(pl_module, prev_fx_name)  # restore current_fx when nested context
        return output

    def _call_strategy_hook(trainer, hook_name, *args, **kwargs):
        if not _fast(trainer):
            return strategy_hook(trainer, hook_name, *args, **kwargs)
        pl_module = trainer.lightning_module
        prev_fx_name = pl_module._current_fx_name
        _set_fx(pl_module, hook_name)
        fn = getattr(trainer.strategy, hook_name)
        if not callable(fn):
            return None
        output = fn(*args, **kwargs)
        _set_fx(pl_module, prev_fx_name)
        return output

    for name, original, fast in zip(NAMES, (callback_hooks, module_hook, strategy_hook),
                                    (_call_callback_hooks, _call_lightning_module_hook, _call_strategy_hook)):
        fast._fast_path = True
        fast.__wrapped__ = original
        fast.__doc__ = original.__doc__
        setattr(call, name, fast)
