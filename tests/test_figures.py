import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cli
from callbacks.figures import FIGURE_NAMES, Figures
from datamodules import CIFAR10DataModule, DigitsDataModule
from datamodules.datasets import CIFAR10_CLASSES, CIFAR100_CLASSES
from errors import UserError
from lightning_modules import CNN, MLP
from visual import plots, shapes
from visual.figures import main as figures_command
from visual.inputs import read_image, sample_photo, to_model_input
from visual.introspect import FigureSkipped

DIGITS = [str(i) for i in range(10)]
PNGS = {f"{name}.png" for name in FIGURE_NAMES}


@pytest.fixture(scope="module")
def digits():
    datamodule = DigitsDataModule()
    datamodule.setup()
    torch.manual_seed(0)
    return CNN(channels=[32, 64], input_shape=(1, 8, 8), class_names=DIGITS).eval(), datamodule


@pytest.fixture
def cifar(data_dir):  # function scope: conftest's CIFAR checksum patch is function-scoped
    datamodule = CIFAR10DataModule(data_dir=data_dir, download=False, val_size=0.2)
    datamodule.setup()
    torch.manual_seed(0)
    return CNN(channels=[8, 16], input_shape=(3, 32, 32), class_names=datamodule.class_names).eval(), datamodule


def hooked_outputs(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference: every Conv2d / pooling output of `net`, caught with our own forward hooks."""
    outputs, handles = {}, []
    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: outputs.setdefault(name, o)))
    with torch.no_grad():
        net(x)
    for handle in handles:
        handle.remove()
    return outputs


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_filters_are_gray_for_one_channel_and_rgb_for_three(digits, cifar):
    fig = Figures().figure("filters", *digits)
    assert len(fig.axes) == 32 and "features.0.conv.0" in fig._suptitle.get_text()
    assert "gray" in fig._suptitle.get_text() and fig.axes[0].images[0].get_array().shape == (3, 3)
    weight = digits[0].net.features[0].conv[0].weight[5, 0].detach()  # (3, 3)
    shown = fig.axes[5].images[0].get_array()
    assert np.allclose(shown, ((weight - weight.min()) / (weight.max() - weight.min())).numpy(), atol=1e-6)
    fig = Figures().figure("filters", *cifar)
    assert len(fig.axes) == 8 and "RGB" in fig._suptitle.get_text()
    assert fig.axes[0].images[0].get_array().shape == (3, 3, 3)


def test_feature_maps_are_the_layer_outputs_named_after_the_layers(digits):
    model, datamodule = digits
    fig = Figures().figure("feature_maps", model, datamodule, title="quickstart (CNN)")
    expected = hooked_outputs(model.net, datamodule.transform(datamodule.splits["test"].images[:1]))
    assert len(fig.axes) == 1 + len(expected) == 5  # the input, then 2 convs and 2 pools
    assert titles(fig)[0] == f"input: test image 0 ({DIGITS[int(datamodule.splits['test'].labels[0])]})"
    for ax, (name, output) in zip(fig.axes[1:], expected.items()):
        assert ax.get_title() == f"{name}\n{' x '.join(map(str, output.shape[1:]))}"
        assert np.allclose(ax.images[0].get_array(), output[0, 0].numpy(), atol=1e-6)  # channel 0, same shape
    assert [ax.get_title().split("\n")[1] for ax in fig.axes[1:]] == ["32 x 8 x 8", "32 x 4 x 4", "64 x 4 x 4",
                                                                     "64 x 2 x 2"]


def test_filter_activations_skip_indices_beyond_the_layer(digits):
    model, datamodule = digits
    figures = Figures()  # default indices [14, 26, 32, 49, 52]; the first conv has 32 filters
    fig = figures.figure("filter_activations", model, datamodule)
    assert titles(fig) == ["filter 14", "activation 14", "filter 26", "activation 26"]
    assert any("[32, 49, 52] skipped" in note and "32 filters" in note for note in figures.notes)
    conv = hooked_outputs(model.net, datamodule.transform(datamodule.splits["test"].images[:1]))["features.0.conv.0"]
    assert np.allclose(fig.axes[3].images[0].get_array(), conv[0, 26].numpy(), atol=1e-6)
    fig = Figures(filter_indices=[99]).figure("filter_activations", model, datamodule)
    assert len(fig.axes) == 10  # none exists: the first five instead, with a note


def test_resnet18_figures_at_224_with_the_bundled_photo(data_dir):
    resnet = pytest.importorskip("lightning_modules.resnet")
    datamodule = CIFAR10DataModule(data_dir=data_dir, download=False, resize=224, normalize="imagenet")
    datamodule.setup()
    model = resnet.ResNet18(weights=None, input_shape=(3, 224, 224), class_names=datamodule.class_names).eval()
    figures = Figures(image="grace_hopper")
    fig = figures.figure("filters", model, datamodule)
    assert len(fig.axes) == 64 and fig._suptitle.get_text().startswith("conv1: 64 filters 7x7 (RGB)")
    fig = figures.figure("last_conv_activations", model, datamodule)
    assert len(fig.axes) == 10 and "layer4.1.conv2" in fig._suptitle.get_text()
    assert "512 x 7 x 7" in fig._suptitle.get_text() and fig.axes[0].images[0].get_array().shape == (7, 7)
    fig = figures.figure("feature_maps", model, datamodule)
    names = [t.split("\n")[0] for t in titles(fig)]
    assert names[0] == "input: grace_hopper.jpg" and len(names) == 1 + 20 + 2  # 20 convs, max pool, avg pool
    assert names[1:3] == ["conv1", "maxpool"] and names[-1] == "avgpool" and "layer3.0.downsample.0" in names
    fig = figures.figure("filter_activations", model, datamodule)
    assert [t for t in titles(fig) if t.startswith("filter")] == [f"filter {i}" for i in (14, 26, 32, 49, 52)]


def test_predictions_show_human_readable_labels(cifar):
    model, datamodule = cifar
    fig = Figures(predictions=4).figure("predictions", model, datamodule, title="cifar10_cnn (CNN)")
    assert fig._suptitle.get_text().startswith("cifar10_cnn (CNN)")
    assert 1 <= len(fig.axes) <= 8
    for ax in fig.axes:
        pred, true = (line.split(": ", 1)[1] for line in ax.get_title().split("\n"))
        assert pred in CIFAR10_CLASSES and true in CIFAR10_CLASSES  # names, not indices
        assert (ax.title.get_color() == "tab:green") == (pred == true)


def test_confusion_matrix_full_with_names_and_reduced_beyond_twenty_classes():
    matrix = torch.diag(torch.full((10,), 9)) + torch.eye(10, dtype=torch.long).roll(1, 1)
    fig = plots.confusion_matrix(matrix, CIFAR10_CLASSES, "run")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == CIFAR10_CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CIFAR10_CLASSES
    assert "accuracy 90.00% on 100 test images" in fig._suptitle.get_text()
    matrix = torch.diag(torch.full((100,), 5))
    maple, oak = CIFAR100_CLASSES.index("maple_tree"), CIFAR100_CLASSES.index("oak_tree")
    matrix[maple, oak] = 7
    fig = plots.confusion_matrix(matrix, CIFAR100_CLASSES, "run")
    grid, bars = fig.axes
    shown = [t.get_text() for t in grid.get_yticklabels()]
    assert len(shown) == 20 and {"maple_tree", "oak_tree"} <= set(shown)
    assert [t.get_text() for t in bars.get_yticklabels()] == ["maple_tree → oak_tree"]


def test_curves_come_from_the_event_files(tmp_path, digits):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step in range(0, 50, 5):
        writer.add_scalar("train/loss", 2.0 - step / 50, step)
    for step in (24, 49):
        writer.add_scalar("val/loss", 1.0 - step / 100, step)
        writer.add_scalar("val/acc", step / 50, step)
    writer.close()
    fig = Figures().figure("curves", *digits, title="quickstart (CNN)", events_dir=str(tmp_path))
    loss, accuracy = fig.axes
    assert [line.get_label() for line in loss.lines] == ["train/loss", "val/loss"]
    assert list(loss.lines[1].get_xdata()) == [24, 49] and [line.get_label() for line in accuracy.lines] == ["val/acc"]
    fig = Figures().figure("curves", *digits, events_dir=[str(tmp_path / "test_only_run"), str(tmp_path)])
    assert len(fig.axes[0].lines) == 2  # a test-only run's own folder has none: the tested run's curves
    with pytest.raises(FigureSkipped, match="no train/val losses"):
        Figures().figure("curves", *digits, events_dir=str(tmp_path / "empty"))


def test_image_files_missing_or_not_images_are_user_errors(tmp_path, digits, data_dir, capsys):
    with pytest.raises(UserError, match="does not exist"):
        read_image(str(tmp_path / "missing.png"))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="not an image"):
        Figures(image_path=str(tmp_path / "notes.txt"))  # checked at construction, before any training
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", "configs/quickstart.yaml", "--figures.image_path", str(tmp_path / "missing.png"),
                  "--log_dir", str(tmp_path)], run=False)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: image file") and "missing.png does not exist" in error


def test_an_image_file_becomes_the_models_input(tmp_path, digits):
    model, datamodule = digits
    photo = sample_photo()
    assert photo.dtype == torch.uint8 and photo.shape == (3, 600, 512)
    x = to_model_input(photo, (1, 8, 8), datamodule)  # gray, 8x8, the digits' normalization
    assert x.shape == (1, 1, 8, 8) and x.dtype == torch.float32
    assert to_model_input(photo, (3, 224, 224)).shape == (1, 3, 224, 224)
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "flat.png")
    fig = Figures(image_path=str(tmp_path / "flat.png")).figure("feature_maps", model, datamodule)
    assert fig.axes[0].get_title() == "input: flat.png" and len(fig.axes) == 5


def test_models_without_convolutions_skip_those_figures_with_a_note(tmp_path, digits):
    _, datamodule = digits
    mlp = MLP(hidden=[16], input_shape=(1, 8, 8), class_names=DIGITS).eval()
    figures = Figures()
    confusion = torch.eye(10, dtype=torch.long) * 3
    written = figures.write(mlp, datamodule, str(tmp_path), "digits_mlp (MLP)", confusion=confusion)
    assert set(written) == {"predictions.png", "confusion_matrix.png"}
    assert sorted(os.listdir(tmp_path)) == ["confusion_matrix.png", "predictions.png"]
    skipped = [note.split(":")[0] for note in figures.notes]
    assert skipped == ["skipped filters.png", "skipped feature_maps.png", "skipped filter_activations.png",
                       "skipped last_conv_activations.png", "skipped curves.png"]
    assert "MLP has no convolution" in figures.notes[0]


def test_a_figure_whose_write_fails_keeps_the_earlier_png_whole(tmp_path, digits, monkeypatch):
    """A full disk mid-write truncated the PNG in place (an earlier run's, a re-test's): written beside, renamed."""
    model, datamodule = digits
    confusion = torch.eye(10, dtype=torch.long) * 3
    Figures().write(model, datamodule, str(tmp_path), "digits_cnn", confusion=confusion, names=("confusion_matrix",))
    before = (tmp_path / "confusion_matrix.png").read_bytes()

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[:100])
            raise OSError(28, "No space left on device")

    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: FullDisk(real_open(path, mode, *a, **k))
                        if str(path).startswith(str(tmp_path)) and "w" in mode else real_open(path, mode, *a, **k))
    figures = Figures()
    written = figures.write(model, datamodule, str(tmp_path), "digits_cnn", confusion=confusion * 2,
                            names=("confusion_matrix",))
    monkeypatch.undo()
    assert written == {} and "No space left on device" in figures.notes[0]
    assert os.listdir(tmp_path) == ["confusion_matrix.png"]  # no temporary file left either
    assert (tmp_path / "confusion_matrix.png").read_bytes() == before
    Image.open(tmp_path / "confusion_matrix.png").verify()


def test_scratch_networks_are_walked_layer_by_layer(digits):
    scratch_models = pytest.importorskip("scratch.models")

    class ScratchClassifier:  # what a LightningModule around a scratch network looks like to the figures
        def __init__(self):
            self.net = scratch_models.mnist_cnn()
            self.class_names = DIGITS

        def __call__(self, x):
            return self.net(x)

    torch.manual_seed(0)
    model = ScratchClassifier()
    reference = scratch_models.mnist_cnn(lib=nn)
    reference.load_state_dict(model.net.state_dict())
    x = torch.randn(1, 1, 28, 28)
    image = (torch.rand(1, 28, 28) * 255).to(torch.uint8)
    datamodule = type("Data", (), {"transform": lambda self, images, training=False: x})()
    fig = Figures(image_path=None).figure("filters", model, datamodule)
    assert len(fig.axes) == 8 and fig._suptitle.get_text().startswith("0: 8 filters 3x3 (gray)")
    datamodule.splits = {"test": type("Split", (), {"images": image[None], "labels": torch.tensor([3]),
                                                    "__len__": lambda self: 1})()}
    fig = Figures().figure("feature_maps", model, datamodule)
    expected = hooked_outputs(reference, x)
    assert [t.split("\n")[0] for t in titles(fig)[1:]] == list(expected) == ["0", "2", "3", "5"]
    for ax, output in zip(fig.axes[1:], expected.values()):
        assert np.allclose(ax.images[0].get_array(), output[0, 0].numpy(), atol=1e-5)
    rows, total, _ = shapes.shape_table(model, (1, 28, 28))
    assert [row["check"] for row in rows if row["check"]] == ["ok"] * 4 and total == 80 + 1168 + 4010


def test_shape_table_of_the_table2_cnn(capsys, monkeypatch):
    assert shapes.main(["--config", "configs/cifar10_table2_cnn.yaml"]) == 0
    out = capsys.readouterr().out
    pool3 = next(line for line in out.splitlines() if line.startswith("features.2.pool"))
    assert "128 x 4 x 4" in pool3 and "floor((8 + 2*0 - 2)/2 + 1) = 4" in pool3 and pool3.endswith("ok")
    assert "floor((32 + 2*2 - 5)/1 + 1) = 32" in out
    flatten = next(line for line in out.splitlines() if line.startswith("head.0"))
    assert flatten.split()[1:3] == ["Flatten", "2048"]
    assert "total parameters: 390,410" in out and "MISMATCH" not in out
    real = shapes.formula_hw
    monkeypatch.setattr(shapes, "formula_hw", lambda layer, hw: ((hw[0] + 1, hw[1]), "wrong") if real(layer, hw)
                        else None)
    with pytest.raises(SystemExit) as exit_info:
        shapes.main(["--config", "configs/cifar10_table2_cnn.yaml"])
    assert exit_info.value.code == 1
    assert "disagrees with the forward pass at features.0.conv.0: formula 33 x 32" in capsys.readouterr().err


def test_a_fit_writes_the_figures_and_the_command_rebuilds_them_from_a_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = cli.main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1",
                    "--log_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    run_dir = run.trainer.log_dir
    assert PNGS | {"confusion_matrix_last.png"} <= set(os.listdir(run_dir))
    events = EventAccumulator(run_dir)
    events.Reload()
    assert {f"figures/{name}" for name in FIGURE_NAMES} <= set(events.Tags()["images"])
    best = glob.glob(os.path.join(run_dir, "checkpoints", "best-*.ckpt"))[0]
    written = figures_command(["--ckpt", best, "--out", str(tmp_path / "after")])
    assert set(written) == PNGS and set(os.listdir(tmp_path / "after")) == PNGS
    with Image.open(tmp_path / "after" / "confusion_matrix.png") as image:
        assert image.size[0] > 300
    with pytest.raises(SystemExit) as exit_info:
        figures_command(["--ckpt", str(tmp_path / "missing.ckpt")])
    assert exit_info.value.code == 2


def test_one_switch_turns_the_figures_off(tmp_path):
    run = cli.main(["fit", "--config", "configs/quickstart.yaml", "--figures.enabled", "false",
                    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches",
                    "1", "--trainer.limit_test_batches", "1", "--log_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false"])
    assert os.path.isfile(os.path.join(run.trainer.log_dir, "results.json"))
    assert not glob.glob(os.path.join(run.trainer.log_dir, "*.png"))


def test_curves_are_drawn_once_per_cli_fit_and_at_the_end_of_a_bare_fit(tmp_path, monkeypatch):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    drawn = []
    real = Figures._curves
    monkeypatch.setattr(Figures, "_curves", lambda self, run: drawn.append(run.checkpoint) or real(self, run))
    run = cli.main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1",
                    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                    "--log_dir", str(tmp_path / "cli"), "--trainer.enable_progress_bar", "false"])
    assert drawn == ["best"]  # by the best checkpoint's test; the end of the fit does not draw them a second time
    assert os.path.isfile(os.path.join(run.trainer.log_dir, "curves.png"))

    drawn.clear()  # the callback in a plain Trainer (no test after the fit): curves.png when the fit ends
    model, datamodule = CNN(channels=[8], input_shape=(1, 8, 8), class_names=DIGITS), DigitsDataModule()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu",
                         logger=TensorBoardLogger(str(tmp_path), name="bare"), callbacks=[Figures()],
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=datamodule)
    assert drawn == ["final"] and os.listdir(trainer.log_dir).count("curves.png") == 1
