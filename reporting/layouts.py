"""Report layouts: a list of Markdown blocks, some of them prose prompts the author replaces."""
from dataclasses import dataclass

from . import tables
from .runs import RunGroup

CIFAR100_CHAR_LIMIT = 7500  # the CIFAR-100 assignment's limit for the whole report


@dataclass
class Block:
    """A paragraph, heading or table of the report; `prompt` marks a placeholder for the author's prose."""

    text: str
    prompt: bool = False


def render(blocks: list[Block], with_prompts: bool = True) -> str:
    return "\n\n".join(block.text for block in blocks if with_prompts or not block.prompt) + "\n"


def prompt(text: str) -> Block:
    return Block(f"_Write: {text}_", prompt=True)


def full(groups: list[RunGroup]) -> list[Block]:
    """Every table, one section each."""
    sections = [
        ("MLP vs CNN", tables.mlp_vs_cnn(groups)),
        ("Ablations", tables.ablation(groups)),
        ("CLIP zero-shot vs from scratch", tables.clip_vs_scratch(groups)),
        ("Transfer learning (ResNet18)", tables.transfer(groups)),
        ("All runs", tables.summary(groups)),
    ]
    blocks = [Block("# Results"),
              Block("Test acc is the best checkpoint's, else the final (test-only runs), else the last; an experiment "
                    "run with several seeds reads mean ± sample std (n=seeds). Δ and gap are in accuracy points.")]
    for title, table in sections:
        blocks += [Block(f"## {title}"), Block(table)]
    return blocks


def cifar100(groups: list[RunGroup]) -> list[Block]:
    """The five sections of the CIFAR-100 assignment (MLP/CNN, ablation, CLIP), CIFAR-100 runs only."""
    groups = [g for g in groups if g.dataset == "cifar100"]
    sections = [  # (heading, table or None, what the author must write)
        ("Executive Summary", None,
         "a one-sentence takeaway on architecture (CNN vs MLP efficiency), then a short paragraph on the "
         f"progression: {tables.headline(groups)}."),
        ("Inductive Bias & Parameter Efficiency", tables.mlp_vs_cnn(groups),
         "why the CNN beats (or matches) the MLP with fewer parameters: inductive bias, parameter sharing, "
         "sparse connectivity and the geometry of images."),
        ("Ablation Study", tables.ablation(groups),
         "the hypothesis (what you removed and why it should matter), the drop in accuracy, and the "
         "mechanism behind it (e.g. internal covariate shift, gradient flow)."),
        ("The Paradigm Shift", tables.clip_vs_scratch(groups),
         "how CLIP scores without training on CIFAR-100 (semantic alignment), and why it needs 224x224 "
         "inputs and its own normalization (ViT patches, positional embeddings)."),
        ("Reflection", tables.training_cost(groups),
         "tracking tensor shapes (B, C, H, W) and whether computing H_out/W_out helped; what the GPU "
         "changed compared with NumPy on the CPU."),
    ]
    blocks = []
    for heading, table, text in sections:
        blocks += [Block(f"## {heading}")] + ([Block(table)] if table else []) + [prompt(text)]
    return blocks


LAYOUTS = {"full": full, "cifar100": cifar100}
