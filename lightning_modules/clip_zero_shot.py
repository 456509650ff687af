"""CLIP zero-shot classification: cosine similarity between image embeddings and class-prompt embeddings.

    python -m datamodules.download clip cifar100     # once, on a machine with internet
    python cli.py test --config configs/cifar100_clip.yaml
"""
import os
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.classification import MulticlassAccuracy

from errors import PositiveInt, UserError
from lightning_modules.base import ClassificationModule, count_parameters

# The 18 CIFAR-10/100 prompts of the CLIP paper (openai/CLIP, data/prompts.md)
CIFAR_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
    "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
]
TEMPLATE_SETS = {"default": ["a photo of a {}."], "cifar": CIFAR_TEMPLATES}


def resolve_templates(templates: Union[str, list[str]]) -> list[str]:
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise UserError(f"unknown templates {templates!r}; use one of {', '.join(TEMPLATE_SETS)} "
                            "or a list of strings with one {{}} each")
        return TEMPLATE_SETS[templates]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise UserError(f"every prompt template needs exactly one {{}} for the class name, got {bad or templates}")
    return list(templates)


def ensemble_prompts(embeddings: torch.Tensor) -> torch.Tensor:
    """(K classes, T templates, D) -> (K, D): mean of the L2-normalized prompt embeddings, normalized again."""
    return F.normalize(F.normalize(embeddings, dim=-1).mean(1), dim=-1)


def load_clip(name_or_path: str):
    """CLIPModel, the torchvision-backed image processor and the tokenizer; a short UserError when missing."""
    from huggingface_hub import constants
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    def load(local_files_only: bool):
        kwargs = {"local_files_only": local_files_only}
        return (CLIPModel.from_pretrained(name_or_path, dtype=torch.float32, **kwargs),
                CLIPImageProcessor.from_pretrained(name_or_path, **kwargs),  # torchvision backend in transformers 5
                AutoTokenizer.from_pretrained(name_or_path, **kwargs))

    folder = os.path.isdir(name_or_path)
    if not folder and (os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))):
        raise UserError(f"CLIP model folder {name_or_path} does not exist; give an existing folder or a hub name "
                        "such as openai/clip-vit-base-patch32 in --model.init_args.model_name_or_path")
    if folder and not any(os.path.isfile(os.path.join(name_or_path, f)) for f in ("tokenizer.json", "vocab.json")):
        # without them AutoTokenizer quietly builds a 2-token CLIPTokenizer and every prompt becomes the same
        raise UserError(f"{name_or_path} has no tokenizer (tokenizer.json or vocab.json + merges.txt); save one "
                        "there with tokenizer.save_pretrained")
    try:
        return load(local_files_only=True)  # the cache first: no network round trips on compute nodes
    except (OSError, ValueError) as error:
        if folder:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{name_or_path} does not hold a complete CLIP model (config, weights, "
                            f"preprocessor_config.json, tokenizer): {reason}") from None
    missing = (f"CLIP weights {name_or_path!r} are not in the Hugging Face cache (HF_HOME={constants.HF_HOME}) "
               "and cannot be downloaded here; on a machine with internet and the same HF_HOME run: "
               "python -m datamodules.download clip")
    if constants.HF_HUB_OFFLINE:
        raise UserError(missing)
    try:
        return load(local_files_only=False)
    except (OSError, ValueError):
        raise UserError(missing) from None


class CLIPZeroShot(ClassificationModule):
    """CLIP zero-shot: logits = logit_scale * cos(image embedding, class text embedding); nothing is trained."""

    def __init__(
        self,
        model_name_or_path: str = "openai/clip-vit-base-patch32",  # hub name (cached in $HF_HOME) or a folder
        templates: Union[Literal["default", "cifar"], list[str]] = "default",  # "cifar": the paper's 18 prompts
        preprocess: Literal["clip", "naive"] = "clip",  # naive: bilinear upsampling only, to measure what CLIP's costs
        text_batch_size: PositiveInt = 256,  # prompts per text-tower call
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.templates = resolve_templates(templates)
        self.clip, self.processor, self.tokenizer = load_clip(model_name_or_path)
        self.clip.requires_grad_(False).eval()
        self.text_features: Optional[torch.Tensor] = None  # (K, D) on the device, computed once per run
        k = self.hparams.num_classes
        self.val_top5 = MulticlassAccuracy(k, top_k=5, average="micro") if k >= 5 else None
        self.test_top5 = MulticlassAccuracy(k, top_k=5, average="micro") if k >= 5 else None

    # ---- the zero-shot classifier ----
    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] on any device -> (B, 3, 224, 224) what the vision tower expects."""
        if self.hparams.preprocess == "naive":
            crop = self.processor.crop_size
            x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # (B, 3, H, W)
            return F.interpolate(x, size=(crop["height"], crop["width"]), mode="bilinear", align_corners=False)
        # CLIP was trained on PIL's uint8 resize, which rounds and clamps between its horizontal and vertical
        # passes; torchvision's uint8 kernel does the same, a float resize does not (up to 24 levels apart on
        # noisy 32x32 images). Our batches are uint8 / 255, so the round trip below is exact.
        pixels = images.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)  # (B, C, H, W)
        out = self.processor(images=pixels, return_tensors="pt", device=images.device, disable_grouping=False)
        return out.pixel_values  # (B, 3, 224, 224): shortest side 224 bicubic, center crop, CLIP mean/std

    @torch.no_grad()
    def encode_prompts(self, device: torch.device) -> torch.Tensor:
        """(K, D) one unit vector per class: its prompts' embeddings averaged (prompt ensembling)."""
        prompts = [template.format(name) for name in self.class_names for template in self.templates]  # class-major
        max_length = self.clip.config.text_config.max_position_embeddings  # 77 for OpenAI's CLIP
        chunks = []
        for start in range(0, len(prompts), self.hparams.text_batch_size):
            tokens = self.tokenizer(prompts[start:start + self.hparams.text_batch_size], padding=True,
                                    truncation=True, max_length=max_length, return_tensors="pt").to(device)
            chunks.append(self.clip.get_text_features(**tokens).pooler_output.float())  # (n, D)
        embeddings = torch.cat(chunks).view(len(self.class_names), len(self.templates), -1)  # (K, T, D)
        return ensemble_prompts(embeddings)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, K) logits."""
        if self.text_features is None or self.text_features.device != images.device:
            self.text_features = self.encode_prompts(images.device)  # (K, D)
        pixels = self.pixel_values(images).to(self.clip.dtype)  # (B, 3, 224, 224); bf16 under "bf16-true"
        image = self.clip.get_image_features(pixel_values=pixels).pooler_output.float()  # (B, D)
        image = F.normalize(image, dim=-1)
        return self.clip.logit_scale.exp().float() * image @ self.text_features.T  # (B, K)

    # ---- Lightning hooks: zero-shot means validate / test / predict only ----
    def setup(self, stage: str) -> None:
        if stage == "fit":
            raise UserError("CLIPZeroShot is zero-shot and has nothing to train; run "
                            "python cli.py test --config ... (or validate / predict) instead of fit")
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if getattr(datamodule, "normalize", "none") != "none":
            raise UserError("CLIPZeroShot needs images in [0, 1]: set --data.init_args.normalize none "
                            "(CLIP applies its own resize, crop and mean/std on the device)")
        super().setup(stage)
        self.text_features = None  # recomputed once in this run's precision and on its device

    def _describe(self) -> None:
        name = self.hparams.model_name_or_path
        total = count_parameters(self)["total"]
        self.print(f"CLIPZeroShot: {name}, {total:,} parameters (all frozen), {len(self.class_names)} classes x "
                   f"{len(self.templates)} prompt templates, preprocess {self.hparams.preprocess}")
        for logger in self.loggers:
            logger.log_metrics({"params/total": float(total), "params/trainable": 0.0}, step=0)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("model", f"{name}: {total:,} parameters, templates: "
                                           + " | ".join(self.templates), 0)

    def on_validation_start(self) -> None:
        self._describe()

    def on_test_start(self) -> None:
        self._describe()

    def on_predict_start(self) -> None:
        self._describe()

    def model_step(self, batch):
        loss, logits, labels = super().model_step(batch)
        top5 = self.val_top5 if self.trainer.validating else self.test_top5 if self.trainer.testing else None
        if top5 is not None:
            top5.update(logits, labels)
        return loss, logits, labels

    def on_validation_epoch_end(self) -> None:
        if self.val_top5 is not None:
            self.log("val/top5_acc", self.val_top5.compute())
            self.val_top5.reset()
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        if self.test_top5 is not None:
            self.log("test/top5_acc", self.test_top5.compute())
            self.test_top5.reset()
        super().on_test_epoch_end()
        confusion = self.test_confusion.compute()  # (K, K), rows: true class
        per_class = confusion.diag() / confusion.sum(1).clamp_min(1)  # (K,)
        rows = [f"| {name} | {acc:.2%} | {int(n)} |" for name, acc, n in
                zip(self.class_names, per_class.tolist(), confusion.sum(1).tolist())]
        table = "\n".join(["| class | accuracy | images |", "|---|---|---|", *rows])
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("test/per_class_acc", table, self.global_step)
