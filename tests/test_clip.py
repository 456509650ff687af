"""CLIP zero-shot against transformers' own CLIPProcessor + CLIPModel, on a tiny random CLIP saved to disk."""
import glob
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cli
from datamodules.datasets import CIFAR10_CLASSES
from errors import UserError
from lightning_modules.base import count_parameters
from lightning_modules.clip_zero_shot import CLIPZeroShot, ensemble_prompts, resolve_templates
from tests.fixtures import tiny_clip_tokenizer, write_tiny_clip
from tests.test_cli import fixture_args

CLASS_NAMES = [name.replace("_", " ") for name in CIFAR10_CLASSES]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    return write_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")))


def random_images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)  # (n, C, size, size), noise: the worst case for bicubic overshoot


def to_pil(images: torch.Tensor) -> list:
    return [Image.fromarray(im[0].numpy()) if im.shape[0] == 1 else Image.fromarray(im.permute(1, 2, 0).numpy())
            for im in images]


def zero_shot(tiny_clip, **kwargs) -> CLIPZeroShot:
    return CLIPZeroShot(model_name_or_path=tiny_clip, class_names=CLASS_NAMES, input_shape=(3, 32, 32), **kwargs)


def test_predictions_equal_transformers_reference(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    images = random_images(24)
    model = zero_shot(tiny_clip)
    with torch.no_grad():
        ours = model(images.float() / 255)  # (24, 10), what the datamodule hands over
        processor = CLIPProcessor.from_pretrained(tiny_clip)
        inputs = processor(text=[f"a photo of a {name}." for name in CLASS_NAMES], images=to_pil(images),
                           padding=True, return_tensors="pt")
        reference = CLIPModel.from_pretrained(tiny_clip)(**inputs).logits_per_image  # (24, 10)
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
    assert len(set(ours.argmax(-1).tolist())) >= 3  # images get different classes
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels", [3, 1])
def test_batched_device_preprocessing_matches_clip_processor(tiny_clip, channels):
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = random_images(16, channels, size=32 if channels == 3 else 28, seed=channels)
    model = zero_shot(tiny_clip)
    ours = model.pixel_values(images.float() / 255)  # (16, 3, 224, 224)
    processor = CLIPProcessor.from_pretrained(tiny_clip).image_processor
    reference = processor(images=to_pil(images), return_tensors="pt").pixel_values
    # the same torchvision uint8 bicubic kernel, one batch vs one image at a time: identical up to float noise
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    # PIL itself (what CLIP was trained with): its fixed-point bicubic rounds some pixels the other way, by at
    # most 2 uint8 levels (= 2/255/std, ~0.03 in normalized units). Measured on noise: ~0.4% of values 1 level
    # off, ~5e-6 two levels off, the rest equal
    pil = CLIPImageProcessorPil()(images=to_pil(images), return_tensors="pt").pixel_values
    levels = ((ours - pil).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255).round()
    assert levels.max() <= 2 and (levels > 0).float().mean() < 0.01 and (levels > 1).float().mean() < 1e-4

    model.hparams.preprocess = "naive"  # upsampling only: no crop, no CLIP normalization
    naive = model.pixel_values(images.float() / 255)
    expected = F.interpolate((images.float() / 255).expand(-1, 3, -1, -1), size=(224, 224), mode="bilinear")
    torch.testing.assert_close(naive, expected)
    assert naive.min() >= 0 and naive.max() <= 1


def test_prompt_ensembling_averages_normalized_embeddings(tiny_clip):
    from transformers import CLIPModel

    templates = ["a photo of a {}.", "a blurry photo of the {}.", "art of the {}"]
    model = zero_shot(tiny_clip, templates=templates)
    ours = model.encode_prompts(torch.device("cpu"))  # (10, D)
    reference_model, tokenizer = CLIPModel.from_pretrained(tiny_clip), tiny_clip_tokenizer()
    with torch.no_grad():
        per_template = torch.stack([  # (T, 10, D), each prompt on its own: no padding involved
            torch.cat([F.normalize(reference_model.get_text_features(
                **tokenizer([t.format(name)], return_tensors="pt")).pooler_output, dim=-1) for name in CLASS_NAMES])
            for t in templates])
    expected = per_template.mean(0)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ensemble_prompts(per_template.transpose(0, 1) * 7.0), expected)  # scale-free
    assert len(resolve_templates("cifar")) == 18 and resolve_templates("default") == ["a photo of a {}."]
    with pytest.raises(UserError, match="exactly one"):
        resolve_templates(["a photo of a cat."])


def test_folder_without_tokenizer_is_an_error_not_a_2_token_tokenizer(tiny_clip, tmp_path):
    shutil.copytree(tiny_clip, tmp_path / "clip")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "clip" / name).unlink()
    with pytest.raises(UserError, match="has no tokenizer"):
        zero_shot(str(tmp_path / "clip"))


def test_every_parameter_is_frozen(tiny_clip):
    model = zero_shot(tiny_clip)
    assert count_parameters(model)["trainable"] == 0 and count_parameters(model)["total"] > 0
    assert not any(p.requires_grad for p in model.parameters())


def clip_args(tiny_clip, data_dir, tmp_path):
    return ["--model.init_args.model_name_or_path", tiny_clip, "--trainer.enable_progress_bar", "false",
            *fixture_args(data_dir, tmp_path)]


def test_fit_is_refused_with_one_line(tiny_clip, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", "configs/cifar10_clip.yaml", *clip_args(tiny_clip, data_dir, tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: CLIPZeroShot is zero-shot") and "cli.py test" in err[-1]
    assert not glob.glob(str(tmp_path / "*" / "*"))  # no run directory left behind


@pytest.mark.parametrize("config,classes", [("cifar10_clip.yaml", 10), ("cifar100_clip.yaml", 100)])
def test_cli_test_writes_results_without_a_checkpoint(tiny_clip, data_dir, tmp_path, config, classes):
    run = cli.main(["test", "--config", f"configs/{config}", *clip_args(tiny_clip, data_dir, tmp_path)])
    results = json.load(open(os.path.join(run.trainer.log_dir, "results.json")))
    assert results["model"] == "CLIPZeroShot" and results["params"]["trainable"] == 0
    final = results["test"]["final"]
    assert {"acc", "top5_acc", "f1_macro", "loss"} <= set(final)
    assert 0 <= final["acc"] <= final["top5_acc"] <= 1
    assert len(run.model.templates) == 18 and run.model.text_features.shape[0] == classes
    events = b"".join(open(path, "rb").read() for path in glob.glob(os.path.join(run.trainer.log_dir, "events.*")))
    assert b"test/per_class_acc" in events
    assert (b"aquarium fish" if classes == 100 else b"automobile") in events  # the datamodule's class names


def test_validate_and_predict_run(tiny_clip, data_dir, tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    run = cli.main(["validate", "--config", "configs/cifar10_clip.yaml", *clip_args(tiny_clip, data_dir, tmp_path)])
    assert {"val/acc", "val/top5_acc", "val/loss"} <= set(run.trainer.callback_metrics)
    # predict on a plain DataLoader: `cli.py predict` fails before reaching any model (BatchLoader cannot be
    # re-instantiated by Lightning's predict loop)
    images = random_images(12).float() / 255
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    model = zero_shot(tiny_clip)
    batches = trainer.predict(model, DataLoader(TensorDataset(images, torch.arange(12) % 10), batch_size=5))
    with torch.no_grad():
        assert torch.equal(torch.cat([b["pred"] for b in batches]), model(images).argmax(-1))
    # the empty batch a DDP rank with an empty predict shard gets (datamodules/loader.py): CLIP cannot preprocess it
    empty = model.predict_step((torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.int64)), 0)
    assert {key: (tuple(value.shape), value.dtype) for key, value in empty.items()} == {
        "pred": ((0,), torch.int64), "prob": ((0,), torch.float32), "target": ((0,), torch.int64)}


@pytest.mark.parametrize("override,message", [
    (["--model.init_args.model_name_or_path", "./no/such/clip"], "CLIP model folder ./no/such/clip does not exist"),
    (["--model.init_args.model_name_or_path", "nobody/clip-never-cached"], "python -m datamodules.download clip"),
    (["--data.init_args.normalize", "dataset"], "normalize none"),
])
def test_user_mistakes_are_one_line_errors(tiny_clip, data_dir, tmp_path, capsys, monkeypatch, override, message):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no 30 s of retries against an unreachable hub
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["test", "--config", "configs/cifar10_clip.yaml", *clip_args(tiny_clip, data_dir, tmp_path),
                  *override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    if "download" in message:
        assert f"HF_HOME={constants.HF_HOME}" in err[-1]
