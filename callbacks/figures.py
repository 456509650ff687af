"""Visual analysis figures: PNGs in the run directory plus images in TensorBoard, written after testing.

On in every config (cli.py adds this callback as the `figures` section); `--figures.enabled false` turns it off.
After a fit, the best checkpoint's test writes all seven figures and the last one's confusion_matrix_last.png;
a test-only run writes all seven. From a saved checkpoint afterwards:

    python -m visual.figures --ckpt logs/quickstart/<version>/checkpoints/last.ckpt
"""
import contextlib
import io
import os
from types import SimpleNamespace
from typing import Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.results import ResultsFile, run_dir_of, run_directory
from errors import NonNegativeInt, PositiveInt
from visual.inputs import read_image, sample_image
from visual.introspect import FigureSkipped, conv_pool_outputs, evaluating, first_conv_weight, input_device_dtype

FIGURE_NAMES = ("filters", "feature_maps", "filter_activations", "last_conv_activations", "predictions",
                "confusion_matrix", "curves")
CURVE_TAGS = ("train/loss", "val/loss", "val/acc", "train/acc")


class Figures(pl.Callback):
    """Filters, feature maps, filter/activation pairs, last conv channels, predictions, confusion matrix, curves."""

    def __init__(
        self,
        enabled: bool = True,
        image: Literal["test", "grace_hopper"] = "test",  # feature maps' sample: test image 0 or the bundled photo
        image_path: Optional[str] = None,  # any image file instead (center-cropped, resized, normalized)
        filter_indices: list[NonNegativeInt] = [14, 26, 32, 49, 52],  # first-conv filters shown with activations
        max_filters: PositiveInt = 64,  # filters.png shows at most this many
        predictions: PositiveInt = 8,  # correctly and incorrectly classified test images shown (each)
        confusion_full_max: PositiveInt = 20,  # more classes: the 20 most-confused ones plus the top confused pairs
    ):
        self.enabled, self.image, self.image_path = enabled, image, image_path
        self.filter_indices, self.max_filters = list(filter_indices), max_filters
        self.predictions, self.confusion_full_max = predictions, confusion_full_max
        if enabled and image_path:
            read_image(image_path)  # a missing or non-image file fails now, not after training
        self.notes: list[str] = []  # one line per skipped figure or clipped option
        self.written: dict[str, str] = {}  # PNG name -> path
        self._full_set_written = False
        # curves.png at the end of a fit that nobody tests; cli.py turns this off because it tests the best and
        # last checkpoints right after the fit and that test draws the curves (drawing them twice cost ~5% of a
        # one-epoch fit, benchmarks/training_loop.py)
        self.curves_after_fit = True

    # ---- Lightning hooks ----
    def _active(self, trainer: pl.Trainer) -> bool:
        return self.enabled and not trainer.fast_dev_run and not trainer.sanity_checking

    def _write_from(self, trainer: pl.Trainer, pl_module, **kwargs) -> dict[str, str]:
        for logger in trainer.loggers:  # the curves read the event files
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.flush()
        name = trainer.logger.name if trainer.logger is not None else None
        title = f"{name} ({type(pl_module).__name__})" if name else type(pl_module).__name__
        events = [run_dir_of(trainer)]  # only rank 0 writes figures
        if trainer.ckpt_path and os.path.isfile(trainer.ckpt_path):  # a test-only run: the tested run's curves
            events.append(run_directory(trainer.ckpt_path))
        return self.write(pl_module, trainer.datamodule, run_dir_of(trainer), title, events_dir=events,
                          loggers=trainer.loggers, step=trainer.global_step, **kwargs)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._full_set_written = False

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # curves.png also for a fit that is not tested; teardown comes after every on_fit_end, so the time
        # spent here stays out of EfficiencyMonitor's fit_seconds
        if stage == "fit" and self.curves_after_fit:
            self.write_curves(trainer, pl_module)

    def write_curves(self, trainer: pl.Trainer, pl_module) -> None:
        """curves.png (and its TensorBoard image) from the run's event files; rank 0 only."""
        if self._active(trainer) and trainer.is_global_zero:
            self._write_from(trainer, pl_module, names=("curves",))

    def on_test_end(self, trainer, pl_module) -> None:
        if not self._active(trainer):
            return
        metric = getattr(pl_module, "test_confusion", None)
        # computing syncs the counts across processes, so every rank takes part
        confusion = metric.compute().cpu() if metric is not None and metric.update_called else None
        if not trainer.is_global_zero:
            return
        tag = next((cb.tag for cb in trainer.callbacks if isinstance(cb, ResultsFile)), "final")
        if tag == "last" and self._full_set_written:  # the best checkpoint's figures are already there
            self.write_last_confusion(trainer, pl_module, confusion=confusion)
        else:
            self._write_from(trainer, pl_module, confusion=confusion, checkpoint=tag)
            self._full_set_written = True

    def write_last_confusion(self, trainer: pl.Trainer, pl_module, confusion: Optional[torch.Tensor] = None,
                             same_as_best: bool = False) -> None:
        """confusion_matrix_last.png: from the last checkpoint's test, or (cli.py, when last.ckpt holds the
        best's step and is not tested again) from the best's, still cached in the model's test_confusion."""
        if not self._active(trainer) or not trainer.is_global_zero:
            return
        if confusion is None:
            metric = getattr(pl_module, "test_confusion", None)
            confusion = metric.compute().cpu() if metric is not None and metric.update_called else None
        self._write_from(trainer, pl_module, names=("confusion_matrix",), suffix="_last", confusion=confusion,
                         checkpoint="last (= best)" if same_as_best else "last")

    # ---- the figures ----
    def write(self, model, datamodule, out_dir: str, title: str, confusion: Optional[torch.Tensor] = None,
              events_dir: Union[str, Sequence[str], None] = None, loggers: Sequence = (), step: int = 0,
              names: Sequence[str] = FIGURE_NAMES, suffix: str = "", checkpoint: str = "final") -> dict[str, str]:
        """Writes `names` as <name><suffix>.png into out_dir (and to TensorBoard); a figure that does not apply
        to the model is skipped with a note, never an exception."""
        run = self._context(model, datamodule, title, confusion, events_dir, checkpoint)
        written = {}
        for name in names:
            try:
                fig = getattr(self, f"_{name}")(run)
                written[f"{name}{suffix}.png"] = self._save(fig, out_dir, f"{name}{suffix}", loggers, step)
            except Exception as error:  # a figure must never cost a finished run its results
                reason = str(error) if isinstance(error, FigureSkipped) else f"{type(error).__name__}: {error}"
                self._note(f"skipped {name}{suffix}.png: {reason}")
        self.written.update(written)
        return written

    def figure(self, name: str, model, datamodule, title: str = "", confusion: Optional[torch.Tensor] = None,
               events_dir: Union[str, Sequence[str], None] = None, checkpoint: str = "final"):
        """One figure (a matplotlib Figure) by name; raises FigureSkipped when it does not apply to the model."""
        return getattr(self, f"_{name}")(self._context(model, datamodule, title, confusion, events_dir, checkpoint))

    @staticmethod
    def _context(model, datamodule, title, confusion, events_dir, checkpoint) -> SimpleNamespace:
        from visual import plots  # matplotlib is imported only when figures are made

        return SimpleNamespace(model=model, datamodule=datamodule, title=title, confusion=confusion,
                               events_dir=events_dir, checkpoint=checkpoint, sample=None, plots=plots)

    @staticmethod
    def _tested(run) -> str:
        """The title plus which checkpoint was tested (a test-only run's "final" says nothing)."""
        return run.title if run.checkpoint == "final" else f"{run.title}, {run.checkpoint} checkpoint"

    def _note(self, text: str) -> None:
        self.notes.append(text)
        print(f"figures: {text}")

    @staticmethod
    def _save(fig, out_dir: str, stem: str, loggers: Sequence, step: int) -> str:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)  # rendered once, for the file and for TensorBoard
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{stem}.png")
        tmp = os.path.join(out_dir, f".{stem}.png.tmp{os.getpid()}")  # a failed write keeps the earlier PNG whole
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getvalue())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                from PIL import Image

                array = np.asarray(Image.open(buffer).convert("RGB"))  # (H, W, 3)
                logger.experiment.add_image(f"figures/{stem}", array, step, dataformats="HWC")
        return path

    def _sample(self, run):
        """(display image, its label, conv/pool outputs) for the sample image: one forward, shared by 3 figures."""
        if run.sample is None:
            try:
                hparams = getattr(run.model, "hparams", {})
                shape = getattr(run.datamodule, "input_shape", None) or hparams.get("input_shape")
                image, x, label = sample_image(self.image, self.image_path, run.datamodule, shape)
                device, dtype = input_device_dtype(run.model)
                run.sample = (image, label, conv_pool_outputs(run.model, x.to(device, dtype)))
            except Exception as error:
                run.sample = error
        if isinstance(run.sample, Exception):
            raise run.sample
        return run.sample

    def _filters(self, run):
        layer, weight = first_conv_weight(run.model)
        return run.plots.filters(weight.float().cpu(), layer, self.max_filters)

    def _feature_maps(self, run):
        image, label, records = self._sample(run)
        return run.plots.feature_maps(image, label, [(r.name, r.output[0]) for r in records], run.title)

    def _filter_activations(self, run):
        layer, weight = first_conv_weight(run.model)
        _, _, records = self._sample(run)
        convs = [r for r in records if r.kind == "conv"]
        record = next((r for r in convs if r.name == layer), convs[0] if convs else None)
        if record is None:
            raise FigureSkipped(f"no activation of {layer} in the forward pass")
        count = weight.shape[0]
        indices = [i for i in self.filter_indices if 0 <= i < count]
        skipped = [i for i in self.filter_indices if i not in indices]
        note = f"indices {skipped} skipped: {layer} has {count} filters" if skipped else None
        if not indices:
            indices = list(range(min(5, count)))
            note = f"none of {self.filter_indices} exist in the {count} filters of {layer}; showing {indices}"
        if note:
            self._note(f"filter_activations.png: {note}")
        return run.plots.filter_activations(weight.float().cpu(), record.output[0].float().cpu(), indices, layer, note)

    def _last_conv_activations(self, run):
        _, _, records = self._sample(run)
        convs = [r for r in records if r.kind == "conv"]
        if not convs:
            raise FigureSkipped(f"{type(run.model).__name__} has no convolution")
        return run.plots.channels(convs[-1].output[0].float().cpu(), convs[-1].name, 10)

    def _predictions(self, run, batch_size: int = 64, scan_limit: int = 512):
        test = getattr(run.datamodule, "splits", {}).get("test")
        if test is None or len(test) == 0:
            raise FigureSkipped("no test split loaded")
        names = list(getattr(run.model, "class_names", None) or run.datamodule.class_names)
        correct, incorrect, scanned = [], [], 0
        device, dtype = input_device_dtype(run.model)
        with evaluating(run.model):
            for start in range(0, min(len(test), scan_limit), batch_size):  # a few batches, not the test set
                images, labels = test.images[start:start + batch_size], test.labels[start:start + batch_size]
                x = run.datamodule.transform(images.to(device), training=False).to(dtype)  # (B, *input_shape)
                predicted = run.model(x).argmax(-1).cpu()  # (B,)
                for image, pred, true in zip(images, predicted.tolist(), labels.tolist()):
                    row = correct if pred == true else incorrect
                    if len(row) < self.predictions:
                        row.append((image, pred, true))
                scanned += len(labels)
                if len(correct) == len(incorrect) == self.predictions:
                    break
        title = f"{self._tested(run)}: {len(correct)} right, {len(incorrect)} wrong of the first {scanned} test images"
        return run.plots.predictions(correct, incorrect, names, title)

    def _confusion_matrix(self, run):
        if run.confusion is None or run.confusion.sum() == 0:
            raise FigureSkipped("no test confusion matrix (the model has no test_confusion, or nothing was tested)")
        names = list(getattr(run.model, "class_names", None) or run.datamodule.class_names)
        return run.plots.confusion_matrix(run.confusion, names, self._tested(run), self.confusion_full_max)

    def _curves(self, run):
        folders = [run.events_dir] if isinstance(run.events_dir, str) else list(run.events_dir or ())
        for folder in folders:  # the first with a fit's losses
            scalars = read_scalars(folder)
            if {"train/loss", "val/loss"} & scalars.keys():
                return run.plots.curves(scalars, run.title)
        raise FigureSkipped(f"no train/val losses in the event files of {' or '.join(folders) or 'no folder'}")


def read_scalars(events_dir: str, tags: Sequence[str] = CURVE_TAGS) -> dict[str, tuple[list[int], list[float]]]:
    """{tag: (steps, values)} from every TensorBoard event file in events_dir (a resumed run has several)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(events_dir):
        return {}
    accumulator = EventAccumulator(events_dir, size_guidance={"scalars": 0, "images": 1, "tensors": 1,
                                                              "histograms": 1, "audio": 1})
    accumulator.Reload()
    present = set(accumulator.Tags().get("scalars", []))
    return {tag: ([e.step for e in accumulator.Scalars(tag)], [e.value for e in accumulator.Scalars(tag)])
            for tag in tags if tag in present}
