"""The classification base every model shares: loss, metrics per stage, optimizer and schedule."""
import math
from typing import Literal, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)

from errors import BelowOne, Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, Probability, UserError
from lightning_modules import fast_hooks, fast_log

fast_log.install()  # self.log without Lightning's per-call walk over the stored metric (see fast_log.py)
fast_hooks.install()  # hook dispatch without profiling contexts nobody reads, nor calls to empty hooks


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),  # top-1 over all samples
        "precision_macro": MulticlassPrecision(num_classes, average="macro"),
        "recall_macro": MulticlassRecall(num_classes, average="macro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    }, prefix=prefix)


class TopOneAccuracy(Metric):
    """Top-1 accuracy from two counts summed across ranks: MulticlassAccuracy(average="micro")'s value (argmax,
    first index on ties) for the per-step training update, at a third of its cost (it builds four stat-score
    tensors per update: 90-130 us against 35-45 us on the 2-core CPU).

    `add(logits, labels)` is the per-step call: it holds the step's (detached) logits and labels and counts them
    together every `every` steps and before any sync or compute (`flush`). Right after a forward pass the first
    tensor ops of a step are the slow ones (~150 us in a fit of the course notebook's ConvNet, ~20 us on their own:
    the forward's activations have pushed the dispatcher's state out of the caches), so a step pays one list
    append, and the count runs once per `every` steps. At most `every` batches of logits are held."""
    full_state_update = False

    def __init__(self, every: int = 32):
        super().__init__()
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")
        self.every = every
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        pending = self._pending
        pending.append((logits.detach(), labels))
        if len(pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        """Counts what `add` holds; compute(), the counts and `update_called` include it only after this."""
        pending, self._pending = self._pending, []
        if len(pending) == 1:
            self.update(*pending[0])
        elif pending:
            self.update(torch.cat([logits for logits, _ in pending]), torch.cat([labels for _, labels in pending]))

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        # in place: `+=` on a state would also run nn.Module's and Metric's __setattr__ (~50 us per step in a fit)
        self.correct.add_((logits.argmax(1) == labels).sum())
        self.total.add_(labels.numel())

    def sync(self, *args, **kwargs) -> None:
        self.flush()  # every rank counts what it holds before the counts are summed
        super().sync(*args, **kwargs)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total

    def reset(self) -> None:
        self._pending = []
        super().reset()


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Total and trainable parameters; a hand-trained model (scratch/) trains all of its own."""
    total = sum(p.numel() for p in module.parameters())
    if getattr(module, "hand_trained", False):
        return {"total": total, "trainable": total}
    return {"total": total, "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad)}


class ClassificationModule(pl.LightningModule):
    """Cross-entropy classification with torchmetrics per stage; subclasses build `self.net`."""

    def __init__(
        self,
        num_classes: Optional[int] = None,  # linked from the datamodule
        input_shape: tuple[int, int, int] = (1, 28, 28),  # linked from the datamodule
        class_names: Optional[list[str]] = None,  # linked from the datamodule
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        momentum: BelowOne = 0.9,  # SGD only; in [0, 1)
        nesterov: bool = False,  # SGD only
        scheduler: Literal["none", "cosine", "onecycle", "step"] = "cosine",
        warmup_epochs: NonNegativeFloat = 0.0,  # linear warmup before the cosine decay
        step_size: PositiveInt = 10,  # epochs between decays ("step")
        gamma: Fraction = 0.1,  # decay factor ("step"), in (0, 1]
        label_smoothing: Probability = 0.0,
        max_params: Optional[PositiveInt] = None,  # parameter budget, e.g. 5_000_000 for the CIFAR-100 assignment
        # a torch.compile backend for self.net (inductor, ...); auto: inductor on a GPU and eager on a CPU, where
        # compiling cost more than it saved (benchmarks/notebook_parity.py --compile); None: eager
        compile: Optional[str] = None,
    ):
        super().__init__()
        if num_classes is None:
            if not class_names:
                raise UserError("the model needs num_classes or class_names (cli.py links both from the data)")
            num_classes = len(class_names)
        if lr <= 0:
            raise UserError(f"learning rate must be positive, got lr={lr}; set --model.lr to e.g. 1e-3")
        if num_classes < 2:
            raise UserError(f"num_classes must be at least 2, got {num_classes}")
        self.save_hyperparameters(ignore=["class_names"])
        self.hparams.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise UserError(f"num_classes={num_classes} disagrees with the data's {len(self.class_names)} classes; "
                            "remove the num_classes override (it is linked from the datamodule)")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_metrics = TopOneAccuracy()  # updated every training step: the cheap one
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        # mean loss per sample over every rank's shard (sum and count are gathered at epoch end); logging the
        # per-step loss with sync_dist would average the ranks' means, which differ in size under DDP
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.example_input_array = torch.zeros(2, *input_shape)  # per-layer shapes in the model summary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def check_parameter_budget(self) -> None:
        count = count_parameters(self)["trainable"]
        limit = self.hparams.max_params
        if limit is not None and count > limit:
            raise UserError(f"{type(self).__name__} has {count:,} trainable parameters, over the budget of "
                            f"{limit:,} (max_params); make it narrower or raise max_params")

    def setup(self, stage: str) -> None:
        self.check_parameter_budget()
        device_type = self._trainer.strategy.root_device.type if self._trainer is not None else self.device.type
        backend = compile_backend(self.hparams.compile, device_type)
        if backend is None and self.hparams.compile == "auto" and not getattr(self, "_auto_noted", False):
            self._auto_noted = True
            if self._trainer is None or self._trainer.is_global_zero:  # self.print drops it before a bar exists
                print(f"compile=auto: eager on {device_type} (compiling cost more than it saved on a CPU; on a GPU "
                      "auto compiles with inductor)")
        if backend and not getattr(self, "_net_compiled", False):  # once: fit's tests call setup again
            try:  # in place (nn.Module.compile): state_dict keys and checkpoints stay the same
                self.net.compile(backend=backend)  # compiles lazily: the first batches pay for it
                self._net_compiled = True
            except Exception as error:  # an unknown backend name
                raise UserError(f"compile={self.hparams.compile!r} failed ({str(error).splitlines()[0]}); use a "
                                "torch.compile backend such as inductor, or null") from None

    def on_train_start(self) -> None:
        counts = count_parameters(self)
        self.print(f"{type(self).__name__}: {counts['total']:,} parameters, {counts['trainable']:,} trainable")
        for logger in self.loggers:
            logger.log_metrics({f"params/{key}": float(value) for key, value in counts.items()}, step=self.global_step)

    # ---- one step shared by all stages ----
    def model_step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        return self.criterion(logits, labels), logits, labels

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, logits, labels = self.model_step(batch)
        self.log_training_step(loss, logits, labels)
        return loss

    def log_training_step(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Per step: the loss (TensorBoard every log_every_n_steps, the bar when it redraws) and an accuracy update.
        Train accuracy is computed once per epoch in on_train_epoch_end: handing the Metric to `self.log` every
        step costs Lightning a walk over the metric's state per call (measured in benchmarks/training_loop.py)."""
        self.train_metrics.add(logits, labels)  # counted every 32 steps and at the epoch's end
        # not prog_bar=True: Lightning would then call .item() on it after every batch (a GPU sync per step);
        # cli.py's bar (callbacks/progress.py) reads it from callback_metrics when it redraws
        # detached first: Lightning clones the value before it detaches it, and a clone of the loss would be
        # recorded in its autograd graph (~70 us per step of a 2-core CPU fit); the logged value is the same
        self.log("train/loss", loss.detach())

    def on_train_epoch_end(self) -> None:
        # runs before the monitoring callbacks (checkpoint, early stopping) read the epoch's metrics
        self.train_metrics.flush()
        if self.train_metrics.update_called:
            self.log("train/acc", self.train_metrics.compute())  # syncs the counts across DDP ranks
        self.train_metrics.reset()

    # the precision plugin converted these with the module (16-true, bf16-true): a float16 sum of losses overflows
    # past ~30k samples and a bfloat16 one rounds to steps of 128, so they sum in float32 whatever the model's dtype
    def on_validation_epoch_start(self) -> None:
        self.val_loss.set_dtype(torch.float32)

    # val/test: per step only metric updates (no collective: under DDP ranks may run different numbers of
    # batches); the metrics gather their states across ranks once, in compute() at epoch end
    def validation_step(self, batch, batch_idx: int) -> None:
        if len(batch[1]) == 0:
            return  # the empty batch of a rank whose evaluation shard is empty (datamodules/loader.py)
        loss, logits, labels = self.model_step(batch)
        self.val_metrics.update(logits, labels)
        self.val_loss.update(loss, weight=len(labels))

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/acc", metrics.pop("val/acc"), prog_bar=True)
        self.log_dict(metrics)
        self.val_metrics.reset()
        self.val_loss.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        if len(batch[1]) == 0:
            return
        loss, logits, labels = self.model_step(batch)
        self.test_metrics.update(logits, labels)
        self.test_confusion.update(logits, labels)
        self.test_loss.update(loss, weight=len(labels))

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()  # kept after the epoch (figures read it), so a second test starts from zero
        self.test_loss.set_dtype(torch.float32)

    def on_test_epoch_end(self) -> None:
        self.log_dict({**self.test_metrics.compute(), "test/loss": self.test_loss.compute()})
        # gathered here, on every rank (a rank with an empty shard has no update); the figures read the cached result
        self.test_confusion.compute()
        self.test_metrics.reset()
        self.test_loss.reset()

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        images, labels = batch
        if len(labels) == 0:  # the empty batch of a rank whose shard is empty (CLIP cannot preprocess it)
            return {"pred": labels.clone(), "prob": images.new_empty(0, dtype=torch.float32), "target": labels}
        probs = F.softmax(self(images), dim=-1)
        return {"pred": probs.argmax(-1), "prob": probs.max(-1).values, "target": labels}

    # ---- exact resume: Lightning does not store the global RNG states (dropout draws) by itself ----
    # (torch's states only: byte tensors, loadable with weights_only=True)
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["model_class"] = type(self).__name__
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        if torch.cuda.is_available():
            checkpoint["cuda_rng_states"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("model_class", type(self).__name__)
        if saved != type(self).__name__:
            raise UserError(f"the checkpoint was saved by a {saved} model but this config builds a "
                            f"{type(self).__name__}; use the config.yaml saved next to that checkpoint's run")
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
        if "cuda_rng_states" in checkpoint and torch.cuda.is_available():
            # saved where N GPUs were visible: restore the states of the devices this process has (fewer GPUs,
            # or none: a CPU skips them); set_rng_state_all would fail on the first device that does not exist
            for index, state in enumerate(checkpoint["cuda_rng_states"][:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, index)

    # ---- optimizer and schedule from YAML ----
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # called after every backward; without a clip value Lightning's clip_gradients only validates its arguments
        # and returns (~50 us per step inside a 2-core CPU fit)
        if gradient_clip_val or (self._trainer is not None and self._trainer.gradient_clip_val):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        # Lightning's default is optimizer.zero_grad(), i.e. every .grad set to None; torch wraps that loop in a
        # dynamo guard and a profiler record_function that run even when nothing profiles (~0.12 ms per step cold
        # inside a 2-core CPU fit, against ~0.02 ms for the loop itself). The loop alone where torch's own method
        # is the optimizer's and no torch profiler records (a profile keeps its Optimizer.zero_grad entries)
        if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad or torch._C._autograd._profiler_enabled():
            return optimizer.zero_grad()
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # frozen modules and stages not yet unfrozen
        if not params:  # torch's own error is a traceback: "optimizer got an empty parameter list"
            raise UserError("nothing to train in the first epoch: every parameter is frozen (the model's freeze "
                            "list and the StagedUnfreezing stages name every module between them); leave at least "
                            "one module trainable from epoch 0, e.g. fc", every_rank=True)
        return self.with_schedule(self.build_optimizer(params))

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer != "sgd" and self.dtype == torch.float16:  # the parameters' dtype at 16-true
            raise UserError(f"{hp.optimizer} cannot train float16 parameters (precision 16-true): its eps of 1e-8 "
                            "is 0 in float16, so the first step divides by zero; use 16-mixed or bf16-true, "
                            "or --model.init_args.optimizer sgd")
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                                        weight_decay=hp.weight_decay)
        else:
            cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
            optimizer = cls(params, lr=hp.lr, weight_decay=hp.weight_decay, fused=self._fused_adam())
        return optimizer

    def _fused_adam(self) -> bool:
        """torch's fused Adam/AdamW kernel: one call per parameter tensor instead of ~8 (0.26 against 0.56 ms a
        step for the MNIST CNN on a 2-core CPU; the fastest on GPUs too). Not where Lightning's mixed-precision
        gradient clipping runs: it refuses optimizers that unscale gradients inside step()."""
        from lightning.pytorch.plugins.precision import MixedPrecision

        trainer = self._trainer
        mixed = trainer is not None and isinstance(trainer.precision_plugin, MixedPrecision)
        return not (mixed and trainer.gradient_clip_val)

    def with_schedule(self, optimizer: torch.optim.Optimizer):
        """The optimizer plus the configured LR schedule, in Lightning's configure_optimizers format."""
        hp = self.hparams
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "step":
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=hp.step_size, gamma=hp.gamma)}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.scheduler == "onecycle":
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total)
        else:
            warmup = int(hp.warmup_epochs * total / max(1, self.trainer.max_epochs or 1))
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_with_warmup(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def compile_backend(option: Optional[str], device_type: str) -> Optional[str]:
    """The torch.compile backend for the model's `compile` option on a device type; None: eager."""
    if option == "auto":
        return "inductor" if device_type == "cuda" else None
    return option or None


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear from ~0 to 1 over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))
