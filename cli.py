"""The experiment CLI: one YAML config is one experiment.

    python cli.py fit --config configs/quickstart.yaml
    python cli.py fit --config configs/cifar100_cnn.yaml --config configs/ablations/no_batchnorm.yaml
    python cli.py test --config configs/cifar100_clip.yaml
    python cli.py fit --config configs/mnist_cnn.yaml --print_config
"""
import ctypes
import glob
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from typing import Optional

import torch
from lightning.fabric.utilities.imports import _IS_INTERACTIVE
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.checkpoint_io import SafeCheckpointIO, resume_hint
from callbacks.early_stopping import StayingEarlyStopping
from callbacks.monitoring import improving_mode
from callbacks.efficiency import EfficiencyMonitor
from callbacks.predictions import PredictionsFile
from callbacks.figures import Figures
from callbacks.progress import LossProgressBar
from callbacks.results import ResultsFile, run_dir_of, run_directory, run_fields
from callbacks.checkpoints import BestAndLastCheckpoint
from callbacks.safety import (STOP, NonFiniteLossGuard, SafeInterrupt, StopNow, TrainingDiverged, discard_run_dirs,
                              interrupted_message)
from callbacks.trainable_set import TrainableSetSync
from datamodules import ImageDataModule
from errors import (CommandInterrupted, UserError, check_section_numbers, one_line_errors, one_line_parse_error,
                    user_error_in)
from lightning_modules import ClassificationModule
from run_dirs import (claim_run_dir, created_run_dirs, forget_run_version, is_worker_process, lock_run_dir,
                      release_run_dirs)

# --trainer.precision without a GPU (README "Precision"): automatic mixed precision is a GPU speed-up, so the
# shipped GPU configs (bf16-mixed) fall back to 32-true there with a warning; the "-true" precisions (the model
# itself in 16/64 bits) train on a CPU as asked; NVIDIA's Transformer Engine is refused without CUDA + package
MIXED_PRECISIONS = {"16-mixed", "bf16-mixed", "16", "bf16"}
CUDA_ONLY_PRECISIONS = {"transformer-engine", "transformer-engine-float16"}
_subcommand = ["fit"]  # for the "see python cli.py fit --help" hint


class OneLineErrorParser(LightningArgumentParser):
    """Config mistakes become one line (`error: ...`) instead of a page of usage."""

    def error(self, message: str, ex=None):
        if not self.exit_on_error:  # jsonargparse is probing (e.g. a Union type): let it catch this
            return super().error(message, ex)
        # raised, not printed: cli.main's boundary prints `error: ...` (exit 2), a notebook gets the exception
        raise UserError(one_line_parse_error(message, _subcommand[0])) from None

    def save(self, cfg, path, **kwargs):
        # the run's config.yaml (SaveConfigCallback): validated when it was parsed; validating it again on the
        # way out cost ~25 ms of every fit (2/3 of the save)
        kwargs.setdefault("skip_validation", True)
        return super().save(cfg, path, **_skip_unset(kwargs))

    def dump(self, cfg, *args, **kwargs):
        return super().dump(cfg, *args, **_skip_unset(kwargs))


def _skip_unset(kwargs: dict) -> dict:
    """Lightning 2.6 passes jsonargparse's `skip_none`, deprecated (a warning in every fit) for `skip_unset` since
    jsonargparse 4.49 and gone in 5.0: the same setting under its new name."""
    if "skip_none" in kwargs:
        kwargs.setdefault("skip_unset", kwargs.pop("skip_none"))
    return kwargs


# Lightning's lines that tell a user of this CLI nothing: an advertisement, and that our own ModelSummary is used
_CHATTER = ("💡 Tip: For seamless cloud logging", "Trainer already configured with model summary callbacks")
# epoch-level values our modules and callbacks log already reduced across DDP ranks (torchmetrics' compute(); the
# efficiency callback's rate counts every rank), which Lightning cannot tell from a rank's own value: it advised
# `sync_dist=True` for each, 11 lines per DDP fit, a redundant all-reduce if followed
_SYNCED = r"(val/|test/|train/acc|efficiency/)"


def _not_chatter(record) -> bool:
    return not (isinstance(record.msg, str) and record.msg.startswith(_CHATTER))


def quiet_lightning_chatter() -> None:
    """Drops `_CHATTER` from Lightning's rank-zero log, torch 2.14's FutureWarning about the `LeafSpec` that
    Lightning 2.6's batch-size helper (lightning.pytorch.utilities._pytree) still builds, Lightning's advice to
    sync the `_SYNCED` values again under DDP and its note that our tests pass `args`. The warning filters are
    the caller's to scope (run_cli: inside `warnings.catch_warnings()`, so a notebook's own code warns as before);
    the log filter is idempotent and only ever matches `_CHATTER`."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where every rank_zero_info goes
    if _not_chatter not in log.filters:
        log.addFilter(_not_chatter)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=rf"It is recommended to use `self\.log\('{_SYNCED}")
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


def with_safe_plugins(plugins) -> list:
    """The trainer's plugins plus ours where the user chose none of that kind: SafeCheckpointIO (checkpoints written
    beside their target; a full disk is one line) and, under SLURM, SLURMEnvironment without Lightning's own
    requeue (SafeInterrupt requeues safely). A user's own CheckpointIO or cluster environment is kept as it is."""
    plugins = _as_list(plugins)
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(SafeCheckpointIO())
    if os.environ.get("SLURM_JOB_ID") and not any(isinstance(plugin, ClusterEnvironment) for plugin in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


class ExperimentCLI(LightningCLI):
    """LightningCLI plus run directories, checkpoints, early stopping and results.json."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--experiment", type=str, default="experiment", help="name of the run folder under log_dir")
        parser.add_argument("--variant", type=Optional[str], default=None, help="ablation/variant name, appended")
        parser.add_argument("--log_dir", type=str, default="logs")
        parser.add_argument("--run_version", type=Optional[str], default=None,
                            help="fixed run folder name (sweep.py sets it); a re-run continues in that folder")
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")  # last.ckpt = the newest state
        parser.set_defaults({"checkpoint.monitor": "val/loss", "checkpoint.mode": "auto", "checkpoint.save_last": True,
                             "checkpoint.filename": "best-epoch{epoch:02d}", "checkpoint.auto_insert_metric_name": False,
                             # a run folder is one run's: a resumed fit that redoes an epoch replaces its file
                             # (Lightning's counter wrote best-epoch03-v1.ckpt, last-v1.ckpt beside the old ones)
                             "checkpoint.enable_version_counter": False})
        parser.add_lightning_class_args(StayingEarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val/loss", "early_stopping.mode": "auto",
                             "early_stopping.patience": 5})  # mode auto: max for val/acc and the like, else min
        parser.add_lightning_class_args(Figures, "figures")  # PNGs + TensorBoard; figures.enabled: false turns off
        for key in ("num_classes", "input_shape", "class_names"):
            parser.link_arguments("data", f"model.init_args.{key}", compute_fn=lambda dm, key=key: getattr(dm, key),
                                  apply_on="instantiate")
        parser.link_arguments("seed_everything", "data.init_args.seed")

    def _config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    @property
    def experiment_name(self) -> str:
        config = self._config()
        return config.experiment + (f"-{config.variant}" if config.variant else "")

    def before_instantiate_classes(self) -> None:
        for section in ("checkpoint", "early_stopping"):  # mode auto becomes min or max: config.yaml says which
            values = self._config().get(section)
            if values is not None:
                values.mode = improving_mode(values.monitor, values.mode)
        init_args = self._config().model.init_args
        self.given_num_classes = init_args.get("num_classes") if init_args is not None else None

    def instantiate_trainer(self, **kwargs):
        config = self._config()
        data_classes = getattr(self.datamodule, "num_classes", None)
        if self.given_num_classes is not None and self.given_num_classes != data_classes:
            raise UserError(f"model.num_classes={self.given_num_classes} disagrees with the data's {data_classes} "
                            "classes; remove the override (cli.py links num_classes from the datamodule)")
        trainer_config = config.trainer
        if trainer_config.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise UserError("trainer.accelerator is gpu but this machine has no CUDA GPU; "
                            "use --trainer.accelerator auto (or cpu)")
        self._check_precision(str(trainer_config.precision), trainer_config.accelerator, kwargs)
        check_section_numbers(config)  # the Lightning sections' numbers that Lightning lets through
        if trainer_config.barebones:  # Lightning would raise a ValueError over the logger it then refuses
            raise UserError("trainer.barebones turns off what every run of this CLI keeps (checkpoints, TensorBoard, "
                            "results.json, the safe stop on a signal); leave it false. Lightning's bare loop against "
                            "ours: python -m benchmarks.training_loop")
        if trainer_config.logger in (None, True, False):  # a user's own logger chooses its own folder
            fixed_version = config.run_version or self._resumed_run()
            run_dir = claim_run_dir(config.log_dir, self.experiment_name, fixed_version)
            if fixed_version:
                lock_run_dir(run_dir)
            if trainer_config.logger is not False:
                kwargs["logger"] = TensorBoardLogger(save_dir=config.log_dir, name=self.experiment_name,
                                                     version=os.path.basename(run_dir), default_hp_metric=False)
            # SLURM's hpc checkpoints land here too; without a logger it is the run folder (not the working directory)
            kwargs.setdefault("default_root_dir", run_dir)
            STOP.run_dir = run_dir
        self.results = ResultsFile()
        self.efficiency_summary = None
        self.efficiency = EfficiencyMonitor()
        self.interrupt = SafeInterrupt()
        extra_callbacks = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        if trainer_config.enable_checkpointing is False:  # Lightning refuses a ModelCheckpoint next to it
            extra_callbacks = [c for c in extra_callbacks if not isinstance(c, BestAndLastCheckpoint)]
        extra_callbacks += [self.results, self.efficiency, ModelSummary(max_depth=3), NonFiniteLossGuard(),
                            self.interrupt, TrainableSetSync(), PredictionsFile()]  # the last: `predict` only
        self.figures = next((c for c in extra_callbacks if isinstance(c, Figures)), None)
        if self.figures is not None:
            self.figures.curves_after_fit = False  # after_fit tests the checkpoints and the test draws the curves
        trainer_init = self._get(self.config_init, "trainer", default={})  # instantiated: callbacks, plugins are objects
        configured = trainer_init.get("callbacks") or []
        if trainer_config.enable_progress_bar is not False and not any(
                isinstance(c, ProgressBar) for c in (configured if isinstance(configured, list) else [configured])):
            extra_callbacks.append(LossProgressBar())  # tqdm every 5 batches, the loss without a per-step sync
        kwargs["plugins"] = with_safe_plugins(trainer_init.get("plugins"))
        torchrun_devices(trainer_config.devices, trainer_config.num_nodes, kwargs)
        one_gpu_in_a_notebook(trainer_config, kwargs)
        trainer = self._instantiate_trainer({**trainer_init, **kwargs}, extra_callbacks)
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            # ddp_spawn, ddp_fork, ddp_notebook (Lightning's choice for several devices in a notebook): the ranks run
            # in child processes that hand back rank 0's weights and callback_metrics only; the tests' results,
            # last.ckpt and the efficiency figures stayed there (results.json came out empty), and spawn could
            # not even pickle this CLI
            strategy = trainer_config.strategy if trainer_config.strategy != "auto" else "auto (ddp_fork here)"
            raise UserError(f"--trainer.strategy {strategy} runs the ranks in child processes of this one, whose "
                            "test results do not come back; use --trainer.strategy ddp from a terminal (or "
                            "torchrun), or in a notebook a cell of its own: !python cli.py fit ... --trainer.devices N")
        return trainer

    @staticmethod
    def _check_precision(precision: str, accelerator, kwargs: dict) -> None:
        gpu = torch.cuda.is_available() and accelerator != "cpu"
        if precision in CUDA_ONLY_PRECISIONS and not (gpu and importlib.util.find_spec("transformer_engine")):
            raise UserError(f"precision {precision} needs a CUDA GPU and NVIDIA's transformer_engine package; "
                            "use bf16-mixed (GPU) or 32-true")
        if precision in MIXED_PRECISIONS and not torch.cuda.is_available():
            print(f"warning: precision {precision} needs a GPU and there is none; training in 32-true", file=sys.stderr)
            kwargs["precision"] = "32-true"

    def _write_results(self) -> None:
        trainer, config = self.trainer, self._config()
        path = os.path.join(run_dir_of(trainer), "results.json")
        fields = run_fields(self.experiment_name, config.experiment, config.variant, self.model, self.datamodule,
                            config.seed_everything, run_dir_of(trainer))
        fields["efficiency"] = self.efficiency_summary or self.efficiency.summary(trainer)
        if getattr(self, "untrained", False):
            fields["untrained"] = True  # cli.py test without --ckpt_path: report.py leaves it out
        callback, tested = trainer.checkpoint_callback, self._config().get("ckpt_path")
        if self.subcommand == "test" and tested and os.path.isfile(tested):
            # the checkpoint scored (not the fit's best/last, which testing restores into the callback); report.py
            # leaves this file out where that checkpoint's own run has a results.json (a re-test, not a new run)
            fields["tested_checkpoint"] = os.path.abspath(tested)
            fields["checkpoints"] = {"tested": os.path.abspath(tested)}
        elif callback is not None and callback.best_model_path:
            fields["checkpoints"] = {"best": callback.best_model_path, "last": callback.last_model_path}
        self.results.write(path, **fields)
        print(f"results: {path}")
        print(f"Run directory: {run_dir_of(trainer)}")

    def _parse_ckpt_path(self) -> None:
        """Lightning rebuilds the model from the checkpoint's saved init args; a bad file is one line, and a
        checkpoint of another model class than the config's is an error (not a silent switch of model)."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        try:
            if path and os.path.isfile(path):
                hparams = torch.load(path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
                self._check_checkpoint_fits(path, hparams, self.config[subcommand])
            super()._parse_ckpt_path()
        except UserError:
            raise
        except Exception as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"cannot read the checkpoint {path} ({first_line}); is it a complete .ckpt file "
                            "written by this project?") from None

    @staticmethod
    def _check_checkpoint_fits(path: str, hparams: dict, config) -> None:
        """The checkpoint's model class, classes and input shape against what the config builds (the model is
        rebuilt from the checkpoint, but its classes and input shape are linked from the config's data)."""
        saved_class = (hparams.get("_class_path") or "").rsplit(".", 1)[-1]
        wanted_class = config.model.class_path.rsplit(".", 1)[-1]
        module, name = config.data.class_path.rsplit(".", 1)
        datamodule = getattr(importlib.import_module(module), name)(**config.data.init_args.as_dict())  # no data read
        saved = (saved_class or wanted_class, hparams.get("num_classes"), tuple(hparams.get("input_shape") or ()))
        wanted = (wanted_class, datamodule.num_classes, tuple(datamodule.input_shape))
        if saved[0] != wanted[0] or any(saved[i] and saved[i] != wanted[i] for i in (1, 2)):  # known fields only
            describe = lambda model, classes, shape: (f"a {model} for {classes} classes, input "
                                                      f"{'x'.join(map(str, shape)) or 'unknown'}")
            raise UserError(f"{path} holds {describe(*saved)} but the config builds {describe(*wanted)} "
                            f"({datamodule.name}); use the config.yaml saved in that checkpoint's run directory")

    def _resumed_run(self) -> Optional[str]:
        """`fit --ckpt_path <run>/checkpoints/<file>.ckpt` (or `<run>/hpc_ckpt_N.ckpt`) holding the newest state of a
        run of this experiment under this log_dir, the command an interrupted fit prints: the run goes on in that
        folder (its version), as a requeued SLURM job's does. In a new folder Lightning's ModelCheckpoint drops its
        top-k record (the dirpath changed), so "best" became the best epoch since the resume, and TensorBoard split
        the run in two."""
        path = self._config().get("ckpt_path")
        if self.subcommand != "fit" or not path or not os.path.isfile(path):
            return None
        run = run_directory(path)
        parent = os.path.join(self._config().log_dir, self.experiment_name)
        if not os.path.isfile(os.path.join(run, "config.yaml")) or not os.path.isdir(parent) \
                or not os.path.samefile(os.path.dirname(run), parent):
            return None
        # only from the run's newest state: resuming from an older checkpoint (a best one) branches off, into a new
        # folder, so that the run's later checkpoints are not overwritten
        steps = []
        for other in glob.glob(os.path.join(run, "checkpoints", "*.ckpt")) + glob.glob(os.path.join(run, "*.ckpt")):
            try:
                steps.append(saved_step(other) or 0)
            except Exception:  # an unreadable file is no newer state
                continue
        try:
            if (saved_step(path) or 0) < max(steps, default=0):
                return None
        except Exception:  # unreadable: _parse_ckpt_path says so in one line
            return None
        if not is_worker_process():  # once, not per DDP rank
            print(f"Resuming in the checkpoint's run folder {run}")
        return os.path.basename(run)

    def _check_ckpt_path(self) -> None:
        config_init = self.config_init[self.subcommand]
        if config_init.get("weights_only") is None:
            config_init["weights_only"] = True  # our checkpoints hold tensors and plain values only
        path = self._config().get("ckpt_path")
        if path and path not in ("best", "last", "hpc", "registry") and not os.path.isfile(path):
            raise UserError(f"checkpoint {path} does not exist; runs keep theirs in logs/<experiment>/<version>/"
                            "checkpoints/")

    def _check_evaluated_weights(self) -> None:
        """validate / test / predict without --ckpt_path score the weights the config builds: for a model that trains,
        its random initialisation. Said in one line; a test's results.json is marked `untrained`, which report.py
        leaves out (it had counted a chance-level run of the experiment). CLIP (every parameter frozen) is scored as
        built, as it should be."""
        self._check_ckpt_path()
        model = self.model
        trains = getattr(model, "hand_trained", False) or any(p.requires_grad for p in model.parameters())
        self.untrained = trains and not self._config().get("ckpt_path")
        if not self.untrained or is_worker_process():
            return
        config = self._config()
        saved = glob.glob(os.path.join(config.log_dir, self.experiment_name, "*", "checkpoints", "*.ckpt"))
        newest = f" (the newest of this experiment: {max(saved, key=os.path.getmtime)})" if saved else ""
        print(f"warning: no --ckpt_path: cli.py {self.subcommand} scores the untrained (random) weights of "
              f"{type(model).__name__}; to score a fit, give --ckpt_path <run>/checkpoints/<best or last>.ckpt{newest}",
              file=sys.stderr, flush=True)

    before_validate = before_test = before_predict = _check_evaluated_weights

    def before_fit(self) -> None:
        self._check_ckpt_path()
        if getattr(self.model, "hand_trained", False) and self.trainer.world_size > 1:
            # the model's own setup() refuses too, but only once each rank has been launched: one line per rank
            raise UserError("the scratch CNN trains on one device only (its hand-written SGD has no gradient "
                            "all-reduce); use --trainer.devices 1")
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if STOP.under_slurm() and restarts and STOP.run_dir:  # a requeued job: resume from its newest state
            saved = glob.glob(os.path.join(STOP.run_dir, "hpc_ckpt_*.ckpt"))
            saved += glob.glob(os.path.join(STOP.run_dir, "checkpoints", "last.ckpt"))
            if saved:  # the stop's hpc_ckpt_N, or last.ckpt after a crash or a kill that left no time to save
                newest = max(saved, key=os.path.getmtime)
                self.config_init[self.subcommand]["ckpt_path"] = newest
                print(f"restart {restarts} of this job: resuming from {newest}", file=sys.stderr, flush=True)

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.fast_dev_run or trainer.interrupted:
            return
        STOP.stop_before_testing(trainer)  # a signal while the fit ended
        # snapshot now: testing a checkpoint restores the callback states saved inside it
        self.efficiency_summary = self.efficiency.summary(trainer)
        callback = trainer.checkpoint_callback
        if callback is None:  # trainer.enable_checkpointing false: the weights the fit ended with are tested
            if trainer.is_global_zero:
                print("Testing the final weights (trainer.enable_checkpointing is false: no checkpoints were kept)")
            self.results.tag = "final"
            trainer.test(self.model, datamodule=self.datamodule)
            if trainer.is_global_zero:
                self._write_results()
            return
        best, last = callback.best_model_path, callback.last_model_path
        same = bool(best and last) and saved_step(best) == saved_step(last)
        tested = False
        for tag, path in (("best", best), ("last", last)):
            if path and not (tag == "last" and same):
                self.results.tag = tag
                if trainer.is_global_zero:  # once, not once per DDP rank
                    print(f"Testing the {tag} checkpoint: {path}")
                trainer.test(self.model, datamodule=self.datamodule, ckpt_path=path)
                tested = True
        if same:  # testing restored the callback's state saved in the best checkpoint, which has no last.ckpt yet
            callback.best_model_path, callback.last_model_path = best, last
        if same and "best" in self.results.test:  # the best epoch was the last: one test pass scores both
            if trainer.is_global_zero:
                print(f"The last checkpoint ({last}) holds the same step as the best: its test results are the "
                      "best's")
            self.results.test["last"] = dict(self.results.test["best"])
            if self.figures is not None and trainer.is_global_zero:
                self.figures.write_last_confusion(trainer, self.model, same_as_best=True)
        if not tested and self.figures is not None:  # the test draws the curves; without one, draw them here
            self.figures.write_curves(trainer, self.model)
        if trainer.is_global_zero:
            self._write_results()

    def after_test(self) -> None:
        if not self.trainer.fast_dev_run and self.trainer.is_global_zero and run_dir_of(self.trainer):
            self._write_results()


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker", "remote process exited",
             "ncclRemoteError", "NCCL communicator was aborted")


def peer_failure(error: BaseException) -> Optional[str]:
    """The first line of a collective's error that says another rank's process is gone (gloo, NCCL), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).strip()
        if isinstance(error, RuntimeError) and any(marker in text for marker in PEER_GONE):
            first = text.splitlines()[0]
            return first[:200] + ("..." if len(first) > 200 else "")
        error = error.__cause__ or error.__context__
    return None


def out_of_memory(error: BaseException) -> Optional[UserError]:
    """A GPU (torch.OutOfMemoryError) or the host (the CPU allocator's RuntimeError) out of memory, anywhere in the
    exception's chain: one line saying what to lower and how to go on, instead of a traceback."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).strip()
        if isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError)
                                                         and "can't allocate memory" in text):
            what = "the host" if "CPUAllocator" in text else "the GPU"
            first = text.splitlines()[0] if text else type(error).__name__
            first = first[:200] + ("..." if len(first) > 200 else "")
            folder = os.path.join(STOP.run_dir, "checkpoints") if STOP.run_dir else None
            then = resume_hint(folder) if folder and os.path.isdir(folder) else "run the command again"
            also = "" if what == "the host" else " or use --trainer.precision bf16-mixed"
            return UserError(f"{what} ran out of memory ({first}); lower --data.init_args.batch_size (or resize)"
                             f"{also}, then {then}")
        error = error.__cause__ or error.__context__
    return None


def torchrun_devices(devices, num_nodes: int, kwargs: dict) -> None:
    """Under torchrun, which starts the processes itself, Lightning takes `devices` x `num_nodes` to be torchrun's
    world size without checking (its check is in its own launcher): `devices: auto` on a CPU means 1, and each process
    then trained a model of its own into the same run folder. Here `auto` becomes torchrun's processes per node (and
    `num_nodes` its node count, when left at 1); numbers that disagree with torchrun's are one error line."""
    if not TorchElasticEnvironment.detect() or any(isinstance(plugin, ClusterEnvironment)  # the user's, or SLURM's
                                                   for plugin in kwargs["plugins"]):
        return
    world = int(os.environ["WORLD_SIZE"])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if devices in ("auto", None):
        kwargs["devices"] = per_node
        if num_nodes == 1:
            kwargs["num_nodes"] = max(1, world // per_node)
        return
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif (isinstance(devices, int) and devices >= 0) or (isinstance(devices, str) and devices.strip().isdigit()):
        count = int(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    else:  # -1 (every GPU) and the like: Lightning's own reading
        return
    if count * num_nodes != world:
        raise UserError(f"torchrun started {world} processes, but --trainer.devices {devices} x --trainer.num_nodes "
                        f"{num_nodes} = {count * num_nodes}: each would train a model of its own; leave "
                        f"--trainer.devices at auto, or set it to torchrun's --nproc_per_node ({per_node})")


def one_gpu_in_a_notebook(trainer_config, kwargs: dict) -> None:
    """In a notebook Lightning runs several devices by forking the kernel, which instantiate_trainer refuses (the
    ranks' results would not come back): there `devices: auto` on a machine with several GPUs trains on one of them,
    with a note, instead of stopping every notebook cell on a 2-GPU machine."""
    if (not _IS_INTERACTIVE or trainer_config.devices not in ("auto", None) or "devices" in kwargs
            or trainer_config.accelerator not in ("auto", "gpu", "cuda") or torch.cuda.device_count() < 2):
        return
    kwargs["devices"] = 1
    print(f"note: a notebook trains on one of the {torch.cuda.device_count()} GPUs (devices: auto); for DDP over "
          "them run it in a cell of its own: !python cli.py fit ... --trainer.devices N", file=sys.stderr)


def _as_list(plugins) -> list:
    return [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]


def saved_step(path: str) -> Optional[int]:
    """The global step a checkpoint was saved at (mmap: the weights are not read)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("global_step")


def keep_freed_memory() -> bool:
    """Let glibc keep the memory a training step frees for the next step instead of handing it back to the OS.

    torch's CPU allocator has no cache: every step's activations come from malloc, and glibc's defaults (heap top
    trimmed past 128 KiB, a moving mmap threshold) returned and re-faulted ~10 MB per step of the notebook's MNIST
    ConvNet here (~2,600 page faults per step, 300k per epoch) and made step times swing by 30% from run to run.
    Heap chunks up to 32 MiB are reused and up to 1 GiB of free heap is kept (the resident size stays near the
    run's peak). The process-wide equivalent of MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_: left alone when either
    is set, and on a C library without glibc's mallopt. Returns whether it was applied."""
    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's mallopt takes these parameter numbers
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def skip_absent_nvml() -> bool:
    """Stop every CUDA check on a machine without NVML from trying to load it again: drops
    PYTORCH_NVML_BASED_CUDA_CHECK there.

    lightning.fabric sets the variable at import so that counting GPUs does not initialise CUDA before a fork; until
    CUDA is initialised torch then dlopens libnvidia-ml.so.1 on every torch.cuda.device_count(), and where the
    library is missing the try fails and torch falls back to the CUDA runtime's count, which it would have asked
    anyway. AdamW asks once per step (`torch.accelerator.current_accelerator(check_available=True)`): ~120 us per
    step on the 2-core CPU, 5 us without the variable. With no library to load the variable changes no answer;
    where NVML loads, it is kept. Returns whether it was dropped."""
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        return False
    try:
        ctypes.CDLL("libnvidia-ml.so.1")  # the name torch.cuda loads
        return False
    except OSError:
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        return True


def run_cli(args=None, run: bool = True, from_api: bool = False) -> ExperimentCLI:
    """The whole command, raising instead of exiting: a UserError for a mistake the user can fix,
    CommandInterrupted after a signal (callbacks/safety.py says what a signal does at each moment). What a
    failed command created and cannot resume from is removed."""
    matmul_precision = torch.get_float32_matmul_precision()  # restored at the end: a notebook's later cells
    torch.set_float32_matmul_precision("high")
    keep_freed_memory()
    skip_absent_nvml()
    argv = sys.argv[1:] if args is None else args
    _subcommand[0] = argv[0] if run and argv and not argv[0].startswith("-") else "fit"
    with warnings.catch_warnings():  # the filters below end with the command (a notebook runs several)
        quiet_lightning_chatter()
        if _subcommand[0] != "fit":  # a checkpoint's top-k bookkeeping that a test/validate/predict never uses
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
        if _subcommand[0] == "predict":  # callbacks/predictions.py finds the indices itself
            warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        STOP.install()
        try:
            cli = ExperimentCLI(ClassificationModule, ImageDataModule, subclass_mode_model=True,
                                subclass_mode_data=True, seed_everything_default=0, parser_class=OneLineErrorParser,
                                save_config_kwargs={"overwrite": True}, args=args, run=run,
                                trainer_defaults={"use_distributed_sampler": False})
        except BaseException as error:
            # a signal: SIGTERMException = stopped and saved at a safe point. Or a DDP rank signalled too, whose next
            # collective a rank that stopped at once (while testing, or as the fit ended) broke: the signal's doing
            if isinstance(error, (SIGTERMException, StopNow)) or (
                    isinstance(error, Exception) and STOP.received is not None and not STOP.under_slurm()
                    and torch.distributed.is_initialized()):
                discard_run_dirs(created_run_dirs, failed=True)
                message, exit_code = interrupted_message(getattr(error, "signum", None) or STOP.received, from_api)
                raise CommandInterrupted(message, exit_code) from None
            if isinstance(error, Exception) and torch.distributed.is_initialized() and (peer := peer_failure(error)):
                # another rank failed first and said why; this rank's broken collective is not news: one line, exit 1
                discard_run_dirs(created_run_dirs, failed=False)
                raise CommandInterrupted(f"rank {torch.distributed.get_rank()} stopped: another rank ended first (its "
                                         f"error is above): {peer}", 1) from None
            oom = out_of_memory(error) if isinstance(error, Exception) else None
            if oom is not None:  # the user's to fix: a folder with checkpoints stays, to resume from
                discard_run_dirs(created_run_dirs, failed=True)
                raise oom from None
            user_error = user_error_in(error) if isinstance(error, Exception) else None
            discard_run_dirs(created_run_dirs,
                             failed=user_error is not None and not isinstance(user_error, TrainingDiverged))
            raise
        finally:
            STOP.restore()
            torch.set_float32_matmul_precision(matmul_precision)
            forget_run_version()
            release_run_dirs()
        discard_run_dirs(created_run_dirs, failed=False, smoke_test=run and getattr(cli, "trainer", None) is not None
                         and bool(cli.trainer.fast_dev_run))
    end_process_group()
    failed = failed_launched_rank(getattr(cli, "trainer", None))
    if failed:
        raise CommandInterrupted(failed, 1)
    return cli


def end_process_group() -> None:
    """Each rank, its command done (past its last collective): gloo's worker threads outlive a process group that
    nobody destroyed, and a rank that finished its work could abort at exit ("terminate called without an active
    exception", SIGABRT: pytorch/pytorch#190489), which failed_launched_rank reports as a failed rank. Lightning
    never destroys it; torch asks every trainer process to, at the end of its main."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def failed_launched_rank(trainer) -> Optional[str]:
    """Rank 0 of Lightning's `ddp` launcher starts the other ranks as its child processes and never waits for them:
    a rank that failed after rank 0's last collective (predict: after its predictions were gathered) left the
    command's exit status 0.
    Wait for them (they finish the same work); a failed one is a line, and the command fails."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    for rank, process in enumerate(getattr(launcher, "procs", None) or [], start=1):
        code = process.wait()
        if code:
            return f"rank {rank} failed (exit status {code}; its error is above)"
    return None


def main(args=None, run: bool = True) -> ExperimentCLI:
    """`python cli.py ...`: run_cli behind the error boundary (one `error:` line, exit status 2)."""
    with one_line_errors():
        return run_cli(args, run)


if __name__ == "__main__":
    main()
