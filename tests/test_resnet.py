import glob
import json
import os
import urllib.error

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from lightning.pytorch.loggers import CSVLogger

import cli
from callbacks.efficiency import EfficiencyMonitor
from callbacks.staged_unfreezing import StagedUnfreezing
from datamodules import EMNISTDataModule
from errors import UserError
from lightning_modules.resnet import ResNet18
from tests.conftest import ROOT
from tests.fixtures import write_emnist
from tests.test_cli import fixture_args

OFFLINE_SMALL = ["--model.init_args.weights", "null", "--data.init_args.resize", "64"]  # no download, fast on CPU
# the trainable top-level modules each overlay in configs/freeze/ must leave
TRAINABLE = {
    "none": ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"],
    "conv1_bn1": ["layer1", "layer2", "layer3", "layer4", "fc"],
    "layer1": ["layer2", "layer3", "layer4", "fc"],
    "layer1-2": ["layer3", "layer4", "fc"],
    "layer1-3": ["layer4", "fc"],
    "layer1-4": ["fc"],
    "layer4_fc_only": ["layer4", "fc"],
}

# EMNIST's 62 classes: fc (512 * 62 + 62), + layer4, everything; keyed by the epoch each stage starts
STAGE_COUNTS = {"0": 31_806, "1": 31_806 + 8_393_728, "2": 11_208_318}


def resnet(num_classes: int = 62, size: int = 32, **kwargs) -> ResNet18:
    return ResNet18(weights=None, num_classes=num_classes, input_shape=(3, size, size), **kwargs)


def emnist(data_dir: str, **kwargs) -> EMNISTDataModule:
    return EMNISTDataModule(data_dir=data_dir, download=False, val_size=0.2, batch_size=16, channels=3, resize=32,
                            **kwargs)


def tiny_trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    return pl.Trainer(callbacks=callbacks, **{**options, **kwargs})


def trainable_children(model: ResNet18) -> list[str]:
    return [name for name, child in model.net.named_children() if any(p.requires_grad for p in child.parameters())]


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Probe(pl.Callback):
    """Records, at each epoch start (after StagedUnfreezing), the trainable set, param groups and some tensors."""

    def __init__(self):
        self.epochs = {}

    def on_train_epoch_start(self, trainer, model):
        optimizer = trainer.optimizers[0]
        self.epochs[trainer.current_epoch] = {
            "trainable": trainable_children(model), "lrs": [g["lr"] for g in optimizer.param_groups],
            "groups": [{id(p) for p in g["params"]} for g in optimizer.param_groups],
            "conv1": model.net.conv1.weight.detach().clone(),
            "layer4": model.net.layer4[0].conv1.weight.detach().clone(),
            "layer4_bn_mean": model.net.layer4[0].bn1.running_mean.clone()}

    def on_train_batch_start(self, trainer, model, batch, batch_idx):
        record = self.epochs.setdefault(trainer.current_epoch, {})  # a mid-epoch resume skips epoch start
        record.setdefault("layer4_bn_training", model.net.layer4[0].bn1.training)
        record.setdefault("layer3_bn_training", model.net.layer3[0].bn1.training)
        record.setdefault("trainable", trainable_children(model))
        record.setdefault("groups", [{id(p) for p in g["params"]} for g in trainer.optimizers[0].param_groups])


# ---- freezing ----
def test_every_freeze_overlay_exists():
    assert sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs", "freeze", "*.yaml"))) \
        == sorted(TRAINABLE)


@pytest.mark.parametrize("option", sorted(TRAINABLE))
def test_freeze_overlay_leaves_exactly_the_expected_parameters_trainable(option):
    overlay = yaml.safe_load(open(os.path.join(ROOT, "configs", "freeze", f"{option}.yaml")))
    assert overlay["variant"] == f"freeze_{option}" and overlay["trainer"]["max_epochs"] == 1
    model = resnet(num_classes=10, freeze=overlay["model"]["init_args"]["freeze"])
    reference = torchvision.models.resnet18(num_classes=10)  # the sizes come from torchvision's own modules
    expected = sum(numel(getattr(reference, name)) for name in TRAINABLE[option])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert trainable_children(model) == TRAINABLE[option]
    assert sum(p.numel() for p in model.parameters()) == numel(reference) == 11_181_642
    if option == "layer1-4":
        assert expected == 512 * 10 + 10  # a linear probe: fc only


def test_unknown_module_name_is_a_user_error():
    with pytest.raises(UserError, match=r"no module named 'layer5'.*valid names: conv1, bn1.*layer4"):
        resnet(freeze=["conv1", "layer5"])


def test_frozen_batchnorm_keeps_its_running_statistics_during_fit(data_dir, tmp_path):
    model = resnet(freeze=["conv1", "bn1", "layer1"])
    frozen, trained = model.net.layer1[0].bn1, model.net.layer2[0].bn1
    before = {name: bn.running_mean.clone() for name, bn in (("frozen", frozen), ("trained", trained))}
    stem_bn, conv1 = model.net.bn1.running_var.clone(), model.net.conv1.weight.detach().clone()
    tiny_trainer(tmp_path, [], max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(model, emnist(data_dir))
    assert torch.equal(frozen.running_mean, before["frozen"]) and frozen.num_batches_tracked == 0
    assert torch.equal(model.net.bn1.running_var, stem_bn) and torch.equal(model.net.conv1.weight, conv1)
    assert not torch.equal(trained.running_mean, before["trained"]) and trained.num_batches_tracked == 1
    model.train()
    assert model.training and not frozen.training and trained.training  # what train() does to frozen BN


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    plain = resnet(num_classes=10).eval()
    fast = resnet(num_classes=10, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-4)


# ---- weights offline ----
def _offline(monkeypatch, tmp_path):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_internet(url, dst, *args, **kwargs):  # what urllib raises on a compute node without internet
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_internet)
    return home


def test_missing_weights_offline_is_one_line_naming_torch_home(monkeypatch, tmp_path, capsys, data_dir):
    home = _offline(monkeypatch, tmp_path)
    with pytest.raises(UserError, match=rf"TORCH_HOME={home} python -m datamodules.download resnet18"):
        ResNet18(num_classes=62, input_shape=(3, 32, 32))  # weights: IMAGENET1K_V1 by default
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", "configs/cifar10_resnet18.yaml", *fixture_args(data_dir, tmp_path / "logs")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].startswith("error: ResNet-18 IMAGENET1K_V1")
    assert "URLError" in errors[0] and "TORCH_HOME=" in errors[0] and "weights null" in errors[0]
    assert not glob.glob(str(tmp_path / "logs" / "*" / "*"))


def test_pre_downloaded_weights_load_offline_with_a_new_head(monkeypatch, tmp_path):
    home = _offline(monkeypatch, tmp_path)
    saved = torchvision.models.resnet18()  # stands in for the ImageNet file `download resnet18` leaves there
    os.makedirs(home / "hub" / "checkpoints")
    torch.save(saved.state_dict(), home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = ResNet18(num_classes=62, input_shape=(3, 32, 32))  # weights: IMAGENET1K_V1 by default
    assert torch.equal(model.net.layer4[1].conv2.weight, saved.layer4[1].conv2.weight)
    assert model.net.fc.out_features == 62
    with pytest.raises(UserError, match=r"unknown ResNet-18 weights 'IMAGENET2'.*null"):
        ResNet18(weights="IMAGENET2", num_classes=62, input_shape=(3, 32, 32))


# ---- staged unfreezing ----
def test_staged_unfreezing_changes_trainable_set_and_param_groups_at_milestones(data_dir, tmp_path, capsys):
    model, probe = resnet(), Probe()
    callback = StagedUnfreezing(milestones=[1, 2], stages=[["layer4"], ["conv1", "bn1", "layer1", "layer2", "layer3"]],
                                lr_ratio=0.1)
    logger = CSVLogger(str(tmp_path))
    tiny_trainer(tmp_path, [callback, probe], logger=logger).fit(model, emnist(data_dir))
    e = probe.epochs
    assert [e[i]["trainable"] for i in range(3)] == [["fc"], ["layer4", "fc"], TRAINABLE["none"]]
    net = model.net
    assert e[0]["groups"] == [{id(p) for p in net.fc.parameters()}]
    assert e[1]["groups"][1] == {id(p) for p in net.layer4.parameters()}
    assert e[2]["groups"][2] == {id(p) for m in (net.conv1, net.bn1, net.layer1, net.layer2, net.layer3)
                                 for p in m.parameters()}
    for i in (1, 2):  # new groups start at lr * lr_ratio and then follow the head's cosine schedule
        assert e[i]["lrs"][1:] == pytest.approx([e[i]["lrs"][0] * 0.1] * i) and e[i]["lrs"][0] > 0
    assert torch.equal(e[0]["layer4"], e[1]["layer4"]) and not torch.equal(e[1]["layer4"], e[2]["layer4"])
    assert torch.equal(e[0]["conv1"], e[2]["conv1"]) and not torch.equal(e[2]["conv1"], net.conv1.weight)
    # layer4's BatchNorm: eval mode with fixed statistics while frozen, trains once unfrozen
    assert not e[0]["layer4_bn_training"] and e[1]["layer4_bn_training"]
    assert torch.equal(e[0]["layer4_bn_mean"], e[1]["layer4_bn_mean"])
    assert not torch.equal(e[1]["layer4_bn_mean"], e[2]["layer4_bn_mean"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("StagedUnfreezing")]
    assert len(printed) == 3 and "epoch 1, stage 1/2: training layer4, fc; 8,425,534 of 11,208,318" in printed[1]
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        logged = f.read().splitlines()
    column = logged[0].split(",").index("stage/trainable_params")
    values = [float(row.split(",")[column]) for row in logged[1:] if row.split(",")[column]]
    assert values == list(STAGE_COUNTS.values())


def test_a_module_frozen_by_the_model_and_named_in_a_stage_trains_from_that_stage(data_dir, tmp_path):
    model, probe = resnet(freeze=["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]), Probe()
    callback = StagedUnfreezing(milestones=[2], stages=[["layer4"]])
    tiny_trainer(tmp_path, [callback, probe]).fit(model, emnist(data_dir))
    assert [probe.epochs[i]["trainable"] for i in range(3)] == [["fc"], ["fc"], ["layer4", "fc"]]
    assert not probe.epochs[1]["layer4_bn_training"] and probe.epochs[2]["layer4_bn_training"]
    assert len(probe.epochs[2]["groups"]) == 2 and probe.epochs[2]["groups"][1] == {
        id(p) for p in model.net.layer4.parameters()}
    assert not probe.epochs[2]["layer3_bn_training"]  # what only the model froze stays frozen


@pytest.mark.parametrize("optimizer,key", [("adamw", "betas"), ("sgd", "momentum")])
def test_a_stage_joining_a_one_cycle_schedule_takes_the_heads_momentum_from_its_first_step(
        optimizer, key, data_dir, tmp_path):
    class Momenta(pl.Callback):  # what the first step of epoch 1 (the new stage's first) uses
        def on_train_batch_start(self, trainer, model, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0:
                self.groups = [group[key] for group in trainer.optimizers[0].param_groups]

    model, momenta = resnet(scheduler="onecycle", optimizer=optimizer), Momenta()
    tiny_trainer(tmp_path, [StagedUnfreezing(milestones=[1], stages=[["layer4"]]), momenta], max_epochs=2).fit(
        model, emnist(data_dir))
    head, stage = momenta.groups
    assert stage == head and head != torch.optim.AdamW([torch.zeros(1)]).defaults.get(key, 0.9)


class SaveAtStep(pl.Callback):
    def __init__(self, step: int, path: str):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_resume_mid_stage_restores_trainable_set_param_groups_and_ends_identical(data_dir, tmp_path, capsys):
    def run(callbacks=(), ckpt_path=None):
        pl.seed_everything(0)
        model, probe, efficiency = resnet(lr=0.01), Probe(), EfficiencyMonitor()
        trainer = tiny_trainer(tmp_path, [StagedUnfreezing(milestones=[1, 2]), probe, efficiency, *callbacks])
        trainer.fit(model, emnist(data_dir, seed=0), ckpt_path=ckpt_path)
        assert efficiency.summary(trainer)["trainable_params_per_stage"] == STAGE_COUNTS
        return model, probe, trainer

    # step 3 = the first of epoch 1's two batches: mid-epoch, in stage 1 (layer4 + fc)
    checkpoint = str(tmp_path / "step3.ckpt")
    straight, _, _ = run([SaveAtStep(3, checkpoint)])
    capsys.readouterr()
    resumed, probe, trainer = run(ckpt_path=checkpoint)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("StagedUnfreezing")]
    assert [line.split(":")[1] for line in printed] == [" epoch 1, stage 1/2", " epoch 2, stage 2/2"]  # as it goes on
    assert min(probe.epochs) == 1 and probe.epochs[1]["trainable"] == ["layer4", "fc"]
    assert probe.epochs[1]["layer4_bn_training"] and not probe.epochs[1]["layer3_bn_training"]
    assert probe.epochs[1]["groups"][1] == {id(p) for p in resumed.net.layer4.parameters()}
    assert len(probe.epochs[1]["groups"]) == 2 and len(probe.epochs[2]["groups"]) == 3
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert len(scheduler.lr_lambdas) == len(scheduler.base_lrs) == 3
    for key, value in straight.state_dict().items():  # stopped and resumed == never stopped
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_staged_unfreezing_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="one milestone per stage"):
        StagedUnfreezing(milestones=[1], stages=[["layer4"], ["layer3"]])
    with pytest.raises(UserError, match="increasing epochs >= 1"):
        StagedUnfreezing(milestones=[2, 2], stages=[["layer4"], ["layer3"]])


# ---- configs through the CLI ----
def _write_l_shaped_emnist(root: str) -> torch.Tensor:
    upright = torch.zeros(28, 28, dtype=torch.uint8)
    upright[4:24, 6] = 255  # the vertical stroke of an "L", on the left
    upright[23, 6:20] = 255  # its foot, at the bottom, pointing right
    stored = upright.T.contiguous()  # EMNIST files hold every image transposed
    write_emnist(root, images={"train": stored.expand(124, 28, 28).numpy(), "test": stored.expand(62, 28, 28).numpy()})
    return upright


def test_emnist_config_gives_normalized_upright_3x224x224_batches(tmp_path):
    upright = _write_l_shaped_emnist(str(tmp_path / "data"))
    run = cli.main(["--config", "configs/emnist_resnet18.yaml", "--model.init_args.weights", "null",
                    *fixture_args(str(tmp_path / "data"), tmp_path / "logs")], run=False)
    dm = run.datamodule
    assert dm.input_shape == tuple(run.model.hparams.input_shape) == (3, 224, 224)
    assert run.model.hparams.num_classes == 62
    assert dm.hflip is False and dm.rotation == 10.0 and tuple(dm.resized_crop_scale) == (0.8, 1.0)
    images, labels = next(iter(dm.test_dataloader()))
    x = dm.on_after_batch_transfer((images[:2], labels[:2]))[0]  # no trainer: the evaluation transform
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = x[0] * std + mean  # back to [0, 1]: three equal channels
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[0], pixels[2], atol=1e-5)
    assert torch.equal(F.avg_pool2d(pixels[:1], 8)[0] > 0.5, upright > 0)  # 224 / 8 = 28: the upright "L"
    assert dm.transform(images[:2], training=True).shape == (2, 3, 224, 224)


RESNET_CONFIGS = ["emnist_resnet18.yaml", "emnist_resnet18_linear_probe.yaml", "cifar10_resnet18.yaml"]


@pytest.mark.parametrize("config", RESNET_CONFIGS)
def test_resnet_config_runs_fast_dev_run_on_fixtures(config, data_dir, tmp_path):
    run = cli.main(["fit", "--config", f"configs/{config}", "--trainer.fast_dev_run", "true", *OFFLINE_SMALL,
                    *fixture_args(data_dir, tmp_path)])
    assert run.model.hparams.channels_last and isinstance(run.model, ResNet18)
    assert not glob.glob(str(tmp_path / "*" / "*"))


def test_freeze_overlay_runs_on_the_cifar10_config(data_dir, tmp_path):
    run = cli.main(["fit", "--config", "configs/cifar10_resnet18.yaml", "--config", "configs/freeze/layer1-2.yaml",
                    "--trainer.fast_dev_run", "true", *OFFLINE_SMALL, *fixture_args(data_dir, tmp_path)])
    assert run.experiment_name == "cifar10_resnet18-freeze_layer1-2" and run.trainer.max_epochs == 1
    assert trainable_children(run.model) == TRAINABLE["layer1-2"]


@pytest.mark.slow
def test_short_staged_fit_writes_results_with_efficiency_per_stage(data_dir, tmp_path):
    overlay = tmp_path / "three_stages.yaml"  # the config's stages, with milestones that fit 3 short epochs
    overlay.write_text("trainer:\n  max_epochs: 3\n  callbacks:\n"
                       "    - class_path: callbacks.staged_unfreezing.StagedUnfreezing\n"
                       "      init_args: {milestones: [1, 2]}\n")
    run = cli.main(["fit", "--config", "configs/emnist_resnet18.yaml", "--config", str(overlay),
                    "--model.init_args.weights", "null", "--data.init_args.resize", "32",
                    "--data.init_args.batch_size", "16", "--trainer.limit_train_batches", "2",
                    "--trainer.enable_progress_bar", "false", *fixture_args(data_dir, tmp_path)])
    with open(os.path.join(run.trainer.log_dir, "results.json")) as f:
        results = json.load(f)
    efficiency = results["efficiency"]
    assert efficiency["device"] == "cpu" and efficiency["precision"] == "32-true"  # bf16-mixed falls back on CPU
    assert efficiency["epochs"] == 3 and efficiency["train_samples_per_epoch"] == 32  # 2 batches of 16
    assert efficiency["trainable_params_per_stage"] == STAGE_COUNTS
    assert efficiency["fit_seconds"] > 0 and efficiency["throughput_images_per_s"] > 0
    assert results["model"] == "ResNet18" and results["dataset"] == "emnist"
    assert results["params"] == {"total": 11_208_318, "trainable": 11_208_318}  # what the fit ended with
    assert set(results["test"]) == {"best", "last"}
