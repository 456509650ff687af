"""DDP on CPU (gloo) through `python cli.py`: identical ranks after staged unfreezing, every sample scored once,
and checkpoints that load with fewer CUDA devices than they were saved with."""
import csv
import datetime
import glob
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import yaml
from lightning.pytorch.plugins.environments import LightningEnvironment

import cli
from datamodules import MNISTDataModule
from datamodules.loader import EpochBatchSampler
from errors import UserError
from lightning_modules import CNN
from tests.conftest import ROOT
from tests.fixtures import write_mnist

N_VAL, N_TEST = 13, 21  # odd: neither divides by the world size


def _config(tmp_path, devices: int, probe: str = "") -> str:
    config = {
        "experiment": "ddp", "log_dir": str(tmp_path / "logs"), "seed_everything": 0,
        "data": {"class_path": "datamodules.MNISTDataModule",
                 "init_args": {"data_dir": str(tmp_path / "data"), "download": False, "val_size": N_VAL,
                               "batch_size": 8, "pin_memory": False}},
        "model": {"class_path": "lightning_modules.CNN", "init_args": {"channels": [4, 8], "head_hidden": [],
                                                                        "lr": 0.01}},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": devices,
                    "strategy": "ddp" if devices > 1 else "auto", "enable_progress_bar": False,
                    "callbacks": [
                        {"class_path": "callbacks.staged_unfreezing.StagedUnfreezing",  # features join at epoch 1
                         "init_args": {"milestones": [1], "stages": [["features"]]}},
                        {"class_path": "tests.ddp_probe.RankProbe",
                         "init_args": {"out_dir": str(tmp_path / (probe or f"probe{devices}"))}}]},
        "figures": {"enabled": False},
    }
    path = tmp_path / f"config{devices}{probe}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _cli(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _counts(probe_dir, stage: str) -> list[dict]:
    return [json.load(open(path)) for path in sorted(glob.glob(os.path.join(probe_dir, f"{stage}-rank*.json")))]


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory):
    """One 2-process fit (~40 s on 2 CPUs): staged unfreezing crosses a milestone at epoch 1."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    write_mnist(str(tmp_path / "data"), n_train=67, n_test=N_TEST)
    result = _cli("fit", "--config", _config(tmp_path, 2))
    (tmp_path / "fit.out").write_text(result.stdout + result.stderr)
    runs = glob.glob(str(tmp_path / "logs" / "ddp" / "*"))
    assert len(runs) == 1  # both ranks used one run folder
    return tmp_path, runs[0]


@pytest.mark.slow
def test_ddp_fit_with_staged_unfreezing_ends_with_identical_ranks(ddp_fit):
    ddp_fit, run = ddp_fit
    ranks = [torch.load(ddp_fit / "probe2" / f"fit-rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    different = [name for name in ranks[0] if not torch.equal(ranks[0][name], ranks[1][name])]
    assert not different, f"parameters differ between the ranks: {different}"
    efficiency = json.load(open(os.path.join(run, "results.json")))["efficiency"]
    assert list(efficiency["trainable_params_per_stage"]) == ["0", "1"]  # the milestone was crossed


@pytest.mark.slow
def test_ddp_fit_prints_each_line_once_without_advice_to_sync_synced_metrics(ddp_fit):
    output = (ddp_fit[0] / "fit.out").read_text()
    assert output.count("Testing the best checkpoint") == 1, output
    assert output.count("Run directory:") == 1, output
    # val/, test/ and train/acc come from torchmetrics' compute(), already reduced over the ranks
    assert "sync_dist=True" not in output, output


@pytest.mark.slow
def test_every_rank_ends_its_process_group_before_it_exits(ddp_fit):
    """gloo's threads of a process group nobody destroyed abort a finished rank at exit now and then (SIGABRT,
    "terminate called without an active exception"; 13 of 25 two-rank gloo scripts here), and the command failed."""
    exits = [json.load(open(ddp_fit[0] / "probe2" / f"exit-rank{r}.json")) for r in (0, 1)]
    assert exits == [{"process_group_alive": False}] * 2


@pytest.mark.slow
def test_ddp_resume_past_a_milestone_ends_with_identical_ranks(ddp_fit):
    """On resume StagedUnfreezing restores the unfrozen stage in on_fit_start, after DDP wrapped the model."""
    ddp_fit, ckpt = ddp_fit[0], os.path.join(ddp_fit[1], "checkpoints", "last.ckpt")
    _cli("fit", "--config", _config(ddp_fit, 2, "resumed"), "--ckpt_path", ckpt, "--trainer.max_epochs", "3")
    ranks = [torch.load(ddp_fit / "resumed" / f"fit-rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])


@pytest.mark.slow
def test_ddp_val_and_test_score_every_sample_once(ddp_fit):
    ddp_fit = ddp_fit[0]
    val, test = _counts(ddp_fit / "probe2", "fit"), _counts(ddp_fit / "probe2", "test")
    assert len(val) == len(test) == 2
    assert sum(c["val"] for c in val) == N_VAL and sum(c["test"] for c in test) == N_TEST


@pytest.mark.slow
def test_ddp_train_accuracy_counts_both_ranks(ddp_fit):
    fit = _counts(ddp_fit[0] / "probe2", "fit")
    assert len(fit) == 2 and fit[0]["train_total"] == fit[1]["train_total"] > 0  # equal shards
    local = [c["train_correct"] / c["train_total"] for c in fit]
    assert local[0] != local[1]  # else a rank's own value would pass for the synced one
    correct, total = sum(c["train_correct"] for c in fit), sum(c["train_total"] for c in fit)
    for rank in fit:
        assert rank["train_acc_logged"] == pytest.approx(correct / total, abs=1e-6)


@pytest.mark.slow
def test_ddp_test_of_a_checkpoint_matches_one_process(ddp_fit):
    ddp_fit, ckpt = ddp_fit[0], os.path.join(ddp_fit[1], "checkpoints", "last.ckpt")
    scores = {}
    for devices in (1, 2):
        out = _cli("test", "--config", _config(ddp_fit, devices), "--ckpt_path", ckpt).stdout
        results = [line.split("results: ", 1)[1] for line in out.splitlines() if line.startswith("results: ")]
        scores[devices] = json.load(open(results[-1]))["test"]["final"]
        assert sum(c["test"] for c in _counts(ddp_fit / f"probe{devices}", "test")) == N_TEST
    assert scores[1]["acc"] == scores[2]["acc"]
    assert scores[1]["loss"] == pytest.approx(scores[2]["loss"], rel=1e-5)



def _predictions(result: subprocess.CompletedProcess) -> list[dict]:
    line = [line for line in result.stdout.splitlines() if line.startswith("predictions of ")][-1]
    with open(line.rsplit(": ", 1)[1]) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_ddp_predict_writes_every_test_image_once_in_order_as_the_model_predicts_it(ddp_fit):
    """Each rank predicts its own shard (21 images: 11 and 10); predictions.csv holds them all, in the split's order,
    equal to the checkpoint's model run over the split in plain torch (and to a 1-process predict)."""
    tmp_path, ckpt = ddp_fit[0], os.path.join(ddp_fit[1], "checkpoints", "last.ckpt")
    rows = {devices: _predictions(_cli("predict", "--config", _config(tmp_path, devices, probe=f"predict{devices}"),
                                       "--ckpt_path", ckpt)) for devices in (1, 2)}
    model = CNN.load_from_checkpoint(ckpt, map_location="cpu").eval()
    datamodule = MNISTDataModule(data_dir=str(tmp_path / "data"), download=False, val_size=N_VAL)
    datamodule.setup()
    images, labels = datamodule.splits["test"][torch.arange(N_TEST)]
    with torch.no_grad():
        probs = torch.softmax(model(datamodule.transform(images)), dim=-1)
    for got in rows.values():
        assert [int(row["index"]) for row in got] == list(range(N_TEST))
        assert [int(row["target"]) for row in got] == labels.tolist()
        assert [int(row["pred"]) for row in got] == probs.argmax(-1).tolist()
        assert [float(row["prob"]) for row in got] == pytest.approx(probs.max(-1).values.tolist(), abs=2e-6)
        assert [row["pred_name"] for row in got] == [datamodule.class_names[k] for k in probs.argmax(-1).tolist()]
    # limit_predict_batches: the first batch of each rank's shard (8 of its strided indices each)
    limited = _predictions(_cli("predict", "--config", _config(tmp_path, 2, probe="predict_limited"), "--ckpt_path",
                                ckpt, "--trainer.limit_predict_batches", "1"))
    assert [int(row["index"]) for row in limited] == list(range(16))
    assert [row["pred"] for row in limited] == [row["pred"] for row in rows[1][:16]]


@pytest.mark.slow
def test_torchrun_ranks_share_one_run_folder(tmp_path):
    """torchrun starts every rank itself (no RUN_VERSION inherited from rank 0). Folders named after the next
    minutes' timestamps already exist, so rank 0 claims `<timestamp>-2`; a rank that picked its own timestamp
    would land in `<timestamp>`. Devices and strategy are left at auto: on a CPU that once meant 1 device, and
    each torchrun process trained a model of its own (both as rank 0) into the one folder."""
    write_mnist(str(tmp_path / "data"), n_train=67, n_test=N_TEST)
    config = _config(tmp_path, 2)
    now = datetime.datetime.now()
    for second in range(600):
        os.makedirs(tmp_path / "logs" / "ddp" / (now + datetime.timedelta(seconds=second)).strftime("%Y%m%d-%H%M%S"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(29500 + os.getpid() % 1000 + 1), "cli.py", "fit", "--config", config,
                             "--trainer.max_epochs", "1", "--trainer.devices", "auto", "--trainer.strategy", "auto"],
                            cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = {c["run_dir"] for c in _counts(tmp_path / "probe2", "fit")}
    assert len(run_dirs) == 1 and next(iter(run_dirs)).endswith("-2"), run_dirs
    assert len(_counts(tmp_path / "probe2", "fit")) == 2
    ranks = [torch.load(tmp_path / "probe2" / f"fit-rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])  # one model, trained together


@pytest.mark.parametrize("devices, num_nodes, expected", [
    ("auto", 1, {"devices": 2, "num_nodes": 2}), (None, 1, {"devices": 2, "num_nodes": 2}),
    ("auto", 2, {"devices": 2}), (2, 2, {}), ("2", 2, {}), ([0, 1], 2, {}), ("0,1", 2, {}), (-1, 1, {})])
def test_devices_under_torchrun_follow_its_process_count(monkeypatch, devices, num_nodes, expected):
    # torchrun --nnodes 2 --nproc_per_node 2: WORLD_SIZE 4, LOCAL_WORLD_SIZE 2
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    kwargs = {"plugins": []}
    cli.torchrun_devices(devices, num_nodes, kwargs)
    assert kwargs == {"plugins": [], **expected}


@pytest.mark.parametrize("devices, num_nodes", [(1, 1), ("1", 2), (2, 1), ([0], 2), (4, 2)])
def test_devices_that_disagree_with_torchrun_are_one_error_line(monkeypatch, devices, num_nodes):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"torchrun started 4 processes, .*--nproc_per_node \(2\)"):
        cli.torchrun_devices(devices, num_nodes, {"plugins": []})


def test_devices_outside_torchrun_or_with_a_chosen_cluster_environment_are_left_alone(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    kwargs = {"plugins": []}
    cli.torchrun_devices("auto", 1, kwargs)
    assert kwargs == {"plugins": []}
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "2")
    kwargs = {"plugins": [LightningEnvironment()]}
    cli.torchrun_devices(1, 1, kwargs)  # the user's own environment: Lightning's reading, no check here
    assert list(kwargs) == ["plugins"]


@pytest.mark.parametrize("num_samples", [0, 1, 5, 13, 16])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_shards_cover_every_sample_once(num_samples, world_size):
    shards = [list(EpochBatchSampler(num_samples, 4, shuffle=False, rank=r, world_size=world_size, even_shards=False))
              for r in range(world_size)]
    scored = sorted(i for shard in shards for batch in shard for i in batch.tolist())
    assert scored == list(range(num_samples))
    for rank, shard in enumerate(shards):
        assert len(shard) == len(EpochBatchSampler(num_samples, 4, False, rank=rank, world_size=world_size,
                                                   even_shards=False))
        assert num_samples == 0 or len(shard) >= 1  # every rank runs the epoch's hooks (the metrics' gather)


def test_training_shards_are_equal(world_size=3):
    lengths = {len(list(EpochBatchSampler(13, 2, True, rank=r, world_size=world_size))) for r in range(world_size)}
    assert lengths == {2}  # 4 samples each, the 13th is dropped: every rank steps the same number of times


def test_checkpoint_with_more_cuda_rng_states_than_devices_loads(monkeypatch):
    """Saved where 4 GPUs were visible (fabricated states), loaded where there is 1 GPU, and where there is none."""
    model = CNN(num_classes=10, input_shape=(1, 28, 28), channels=[4])
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    checkpoint = {"model_class": "CNN", "torch_rng_state": torch.get_rng_state(), "cuda_rng_states": states}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((device, state)))
    model.on_load_checkpoint(checkpoint)
    assert [(device, state[0].item()) for device, state in restored] == [(0, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    restored.clear()
    model.on_load_checkpoint(checkpoint)
    assert restored == []


def test_throughput_counts_training_time_only(monkeypatch):
    """Validation runs inside the training epoch (before on_train_epoch_end); a scripted clock, no timing."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from callbacks import efficiency

    class Model(torch.nn.Linear):
        def log(self, name, value):
            self.logged = (name, value)

    clock = iter([0.0, 1.0, 11.0, 12.0])  # epoch start, validation start, validation end, epoch end
    monkeypatch.setattr(efficiency.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(current_epoch=0, world_size=2, state=SimpleNamespace(fn=TrainerFn.FITTING))
    model, monitor = Model(2, 2), efficiency.EfficiencyMonitor()
    monitor.on_train_epoch_start(trainer, model)
    monitor.on_train_batch_end(trainer, model, None, (None, torch.zeros(10)), 0)
    monitor.on_validation_start(trainer, model)
    monitor.on_validation_end(trainer, model)
    monitor.on_train_epoch_end(trainer, model)
    assert monitor.train_seconds == 2.0  # 12 s of epoch minus 10 s of validation
    assert model.logged == ("efficiency/images_per_s", 10 * 2 / 2.0)


def test_fit_seconds_of_a_resumed_fit_add_up_every_segment(monkeypatch):
    """A stopped fit never reaches on_fit_end: its checkpoint holds the seconds so far (a scripted clock)."""
    from types import SimpleNamespace

    from callbacks import efficiency

    clock = iter([0.0, 5.0, 100.0, 103.0])  # first fit starts, its last.ckpt is saved; the resume starts, ends
    monkeypatch.setattr(efficiency.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), world_size=1)
    first = efficiency.EfficiencyMonitor()
    first.on_fit_start(trainer, None)
    saved = first.state_dict()
    assert saved["fit_seconds"] == 5.0
    resumed = efficiency.EfficiencyMonitor()
    resumed.load_state_dict(saved)
    resumed.on_fit_start(trainer, None)
    resumed.on_fit_end(trainer, None)
    assert resumed.fit_seconds == 8.0 and resumed.state_dict()["fit_seconds"] == 8.0  # no clock read after the fit


def test_efficiency_counts_the_images_of_the_processes_that_trained(monkeypatch):
    """One epoch on 1 process, resumed for one on 2, then tested on 1 or 2: the fit's numbers every time (the test
    restores the callback's state; its own world size scaled one rank's count before)."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from callbacks import efficiency

    class Model(torch.nn.Linear):
        def log(self, name, value):
            pass

    monkeypatch.setattr(efficiency.time, "perf_counter", iter(range(0, 100)).__next__)  # 1 s per call
    model, state = Model(2, 2), None
    for world_size in (1, 2):
        trainer = SimpleNamespace(current_epoch=0, world_size=world_size, state=SimpleNamespace(fn=TrainerFn.FITTING),
                                  strategy=SimpleNamespace(root_device=torch.device("cpu")), precision="32-true")
        monitor = efficiency.EfficiencyMonitor()
        if state:
            monitor.load_state_dict(state)
        monitor.on_fit_start(trainer, model)
        monitor.on_train_epoch_start(trainer, model)
        monitor.on_train_batch_end(trainer, model, None, (None, torch.zeros(10)), 0)  # 10 images on each rank
        monitor.on_train_epoch_end(trainer, model)  # 1 s
        state = monitor.state_dict()
    for world_size in (1, 2):  # cli.py test --ckpt_path: a new trainer, its epoch counter not restored
        monitor = efficiency.EfficiencyMonitor()
        monitor.load_state_dict(state)
        trainer.world_size, trainer.current_epoch = world_size, 0
        summary = monitor.summary(trainer)
        assert (summary["devices"], summary["epochs"], summary["train_samples_per_epoch"]) == (2, 2, 20)
        assert summary["throughput_images_per_s"] == (10 + 20) / 2.0


def test_an_epoch_resumed_mid_way_counts_its_images_and_seconds_from_before_the_stop(monkeypatch):
    """Stopped after 10 images a rank on 2 ranks, resumed on 1 for 10 more: the epoch had 30 images in 3 + 2 s of
    training (a scripted clock); a resume skips on_train_epoch_start."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from callbacks import efficiency

    class Model(torch.nn.Linear):
        def log(self, name, value):
            self.logged = (name, value)

    clock = iter([0.0, 1.0, 2.0, 5.0, 100.0, 101.0, 103.0, 104.0])
    monkeypatch.setattr(efficiency.time, "perf_counter", lambda: next(clock))
    model, state = Model(2, 2), None
    for world_size in (2, 1):
        trainer = SimpleNamespace(current_epoch=0, world_size=world_size, state=SimpleNamespace(fn=TrainerFn.FITTING),
                                  strategy=SimpleNamespace(root_device=torch.device("cpu")))
        monitor = efficiency.EfficiencyMonitor()
        if state:
            monitor.load_state_dict(state)
        monitor.on_fit_start(trainer, model)  # 0 | 100
        monitor.on_train_start(trainer, model)  # 1 | 101
        if state is None:
            monitor.on_train_epoch_start(trainer, model)  # 2
        monitor.on_train_batch_end(trainer, model, None, (None, torch.zeros(10)), 0)
        if state is None:
            state = monitor.state_dict()  # 5: the stop's last.ckpt
            assert (state["epoch_images_before"], state["epoch_seconds_before"], state["fit_seconds"]) == (20, 3.0, 5.0)
    monitor.on_train_epoch_end(trainer, model)  # 103
    monitor.on_fit_end(trainer, model)  # 104
    assert (monitor.train_samples_per_epoch, monitor.images_seen, monitor.train_seconds) == (30, 30, 3.0 + 2.0)
    assert model.logged == ("efficiency/images_per_s", 30 / 5.0) and monitor.fit_seconds == 5.0 + 4.0
    assert "epoch_images_before" not in monitor.state_dict()  # a checkpoint after the epoch: the next starts afresh


@pytest.mark.parametrize("interactive, devices, accelerator, gpus, expected", [
    (True, "auto", "auto", 2, 1), (True, "auto", "gpu", 4, 1), (True, 2, "auto", 2, None),
    (True, "auto", "cpu", 2, None), (True, "auto", "auto", 1, None), (False, "auto", "auto", 2, None)])
def test_a_notebook_on_several_gpus_trains_on_one_unless_told_otherwise(monkeypatch, capsys, interactive, devices,
                                                                         accelerator, gpus, expected):
    monkeypatch.setattr(cli, "_IS_INTERACTIVE", interactive)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    kwargs = {}
    cli.one_gpu_in_a_notebook(types.SimpleNamespace(devices=devices, accelerator=accelerator), kwargs)
    assert kwargs.get("devices") == expected
    assert ("note: a notebook trains on one of the" in capsys.readouterr().err) == (expected == 1)



def quickstart_ddp(subcommand: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    """`cli.py <subcommand>` of the quickstart config on 2 CPU ranks (Lightning's launcher), no progress bar."""
    return subprocess.run([sys.executable, "cli.py", subcommand, "--config", "configs/quickstart.yaml", "--log_dir",
                           str(tmp_path), "--trainer.strategy", "ddp", "--trainer.devices", "2",
                           "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)

@pytest.mark.slow
def test_a_mistake_every_rank_meets_after_the_launch_is_said_once(tmp_path):
    # a monitored name is checked after the sanity check, when both ranks run: each printed the same error line
    result = quickstart_ddp("fit", tmp_path, "--figures.enabled", "false", "--early_stopping.monitor", "val/los")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors == ["error: early_stopping.monitor='val/los' is not a metric the model logs; val/ metrics are: "
                      "val/acc, val/f1_macro, val/loss, val/precision_macro, val/recall_macro"]
    assert os.listdir(tmp_path) == []  # no run folder left, nor its empty experiment folder


@pytest.mark.slow
def test_a_rank_that_fails_says_why_and_the_others_say_one_line(tmp_path):
    # rank 1 runs out of GPU memory; rank 0's next collective breaks: a 57-line gloo traceback before
    result = quickstart_ddp("fit", tmp_path, "--figures.enabled", "false", "--trainer.callbacks+",
                            "tests.fault_at.FaultAt", "--trainer.callbacks.error", "gpu_oom",
                            "--trainer.callbacks.stall", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: the GPU ran out of memory (CUDA out of memory.")
    assert result.stderr.splitlines()[-1].startswith("rank 0 stopped: another rank ended first (its error is "
                                                     "above): ")


@pytest.mark.slow
def test_a_rank_that_fails_after_rank_0_ended_fails_the_command(tmp_path):
    # after predict's last collective (the gathering of predictions.csv): rank 0 exited 0 while rank 1 raised
    result = quickstart_ddp("predict", tmp_path, "--trainer.callbacks+", "tests.fault_at.FaultAt",
                            "--trainer.callbacks.predict_end", "true")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "injected fault on rank 1 after predicting" in result.stderr
    assert result.stderr.splitlines()[-1] == "rank 1 failed (exit status 1; its error is above)"
