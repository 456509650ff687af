"""All plotting: each function returns a matplotlib Figure (object API, Agg, no pyplot state) for a PNG file.

Axes titles and tick labels carry the human-readable names (layer names, class names), which the tests read back.
"""
import math
from typing import Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

GRID_COLUMNS = 8


def _figure(panels: int, columns: int, panel_inches: float = 1.6, extra_height: float = 0.6):
    """A figure with exactly `panels` axes on a grid of `columns`, axis frames off."""
    columns = max(1, min(columns, panels))
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(columns * panel_inches, rows * panel_inches + extra_height), layout="constrained")
    axes = [fig.add_subplot(rows, columns, i + 1) for i in range(panels)]
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def to_display(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) uint8 or float -> (H, W) gray or (H, W, 3) RGB in [0, 1], min-max scaled if float."""
    x = image.detach().float().cpu()
    if image.dtype == torch.uint8:
        x = x / 255
    else:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return x[0].numpy() if x.shape[0] != 3 else x.permute(1, 2, 0).numpy()


def _show(ax, image: np.ndarray, cmap: str = "gray") -> None:
    ax.imshow(image, cmap=None if image.ndim == 3 else cmap, interpolation="nearest")


def _map(ax, channel: torch.Tensor) -> None:
    """One (H, W) activation channel, as computed (no rescaling)."""
    ax.imshow(channel.detach().float().cpu().numpy(), cmap="viridis", interpolation="nearest")


def _filter_image(weight: torch.Tensor) -> np.ndarray:
    """(C_in, kH, kW) -> RGB for 3 input channels, else the first channel in gray; min-max per filter."""
    return to_display(weight if weight.shape[0] == 3 else weight[:1])


def filters(weight: torch.Tensor, layer: str, max_filters: int = 64) -> Figure:
    """First-layer filters as a grid: weight (O, C_in, kH, kW)."""
    count = min(weight.shape[0], max_filters)
    fig, axes = _figure(count, GRID_COLUMNS, panel_inches=1.1)
    for index, ax in enumerate(axes):
        _show(ax, _filter_image(weight[index]))
        ax.set_title(str(index), fontsize=7)
    mode = "RGB" if weight.shape[1] == 3 else "gray" if weight.shape[1] == 1 else f"channel 0 of {weight.shape[1]}"
    shown = f"first {count} of {weight.shape[0]}" if count < weight.shape[0] else str(count)
    fig.suptitle(f"{layer}: {shown} filters {weight.shape[2]}x{weight.shape[3]} ({mode})")
    return fig


def feature_maps(image: torch.Tensor, label: str, maps: Sequence[tuple[str, torch.Tensor]], title: str) -> Figure:
    """The input, then channel 0 of each layer's output (C, H, W), titled with the layer name and shape."""
    fig, axes = _figure(1 + len(maps), 6, panel_inches=2.0)
    _show(axes[0], to_display(image))
    axes[0].set_title(f"input: {label}", fontsize=8)
    for ax, (name, output) in zip(axes[1:], maps):
        _map(ax, output[0])
        ax.set_title(f"{name}\n{' x '.join(map(str, output.shape))}", fontsize=8)
    fig.suptitle(f"{title}: channel 0 of every conv and pooling layer")
    return fig


def filter_activations(weight: torch.Tensor, activation: torch.Tensor, indices: Sequence[int], layer: str,
                       note: Optional[str] = None) -> Figure:
    """Per chosen filter: its weights on top, its activation map (from activation (C, H, W)) below."""
    fig = Figure(figsize=(max(6.0, 1.8 * len(indices)), 4.4), layout="constrained")
    for column, index in enumerate(indices):
        top = fig.add_subplot(2, len(indices), column + 1)
        bottom = fig.add_subplot(2, len(indices), len(indices) + column + 1)
        _show(top, _filter_image(weight[index]))
        _map(bottom, activation[index])
        top.set_title(f"filter {index}", fontsize=9)
        bottom.set_title(f"activation {index}", fontsize=9)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{layer}: filters and their activations" + (f"\n({note})" if note else ""), fontsize=10)
    return fig


def channels(activation: torch.Tensor, layer: str, count: int = 10) -> Figure:
    """The first `count` channels of one activation (C, H, W)."""
    count = min(count, activation.shape[0])
    fig, axes = _figure(count, 5, panel_inches=1.8)
    for index, ax in enumerate(axes):
        _map(ax, activation[index])
        ax.set_title(f"channel {index}", fontsize=8)
    fig.suptitle(f"{layer}: first {count} channels of {' x '.join(map(str, activation.shape))}")
    return fig


def predictions(correct: Sequence[tuple[torch.Tensor, int, int]], incorrect: Sequence[tuple[torch.Tensor, int, int]],
                class_names: Sequence[str], title: str) -> Figure:
    """Rows of correctly and incorrectly classified images (uint8 (C, H, W), predicted, true)."""
    columns = max(len(correct), len(incorrect), 1)
    rows = [(row, name) for row, name in ((correct, "correct"), (incorrect, "incorrect")) if row]
    fig = Figure(figsize=(1.7 * columns, 2.1 * len(rows) + 0.6), layout="constrained")
    for r, (row, row_name) in enumerate(rows):
        for c, (image, pred, true) in enumerate(row):
            ax = fig.add_subplot(len(rows), columns, r * columns + c + 1)
            _show(ax, to_display(image))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"pred: {class_names[pred]}\ntrue: {class_names[true]}", fontsize=8,
                         color="tab:green" if pred == true else "tab:red")
            if c == 0:
                ax.set_ylabel(row_name)
    fig.suptitle(title, fontsize=10)
    return fig


def most_confused(errors: torch.Tensor, top_k: int) -> list[int]:
    """The top_k classes by off-diagonal mass (errors: the confusion matrix without its diagonal), in class order."""
    mass = errors.sum(0) + errors.sum(1)  # (K,) mistakes as the true and as the predicted class
    return sorted(mass.argsort(descending=True)[:top_k].tolist())


def confusion_matrix(matrix: torch.Tensor, class_names: Sequence[str], title: str, full_max: int = 20,
                     top_pairs: int = 15) -> Figure:
    """Rows true, columns predicted; colour = share of the true class. Beyond full_max classes: the full_max
    most-confused classes plus a bar chart of the most frequent (true -> predicted) mistakes."""
    matrix = matrix.detach().cpu().long()
    k = matrix.shape[0]
    errors = matrix - torch.diag(matrix.diag())  # (K, K) mistakes only
    reduced = k > full_max
    keep = most_confused(errors, full_max) if reduced else list(range(k))
    sub = matrix[keep][:, keep]  # (k', k')
    side = max(4.0, 0.45 * len(keep) + 2)
    fig = Figure(figsize=(side + 6 if reduced else side, side), layout="constrained")
    ax = fig.add_subplot(1, 2 if reduced else 1, 1)
    share = sub.double() / matrix[keep].sum(1, keepdim=True).double().clamp_min(1)  # (k', k') of all true images
    ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    names = [class_names[i] for i in keep]
    ax.set_xticks(range(len(keep)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(keep)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(keep) <= full_max:
        for (i, j), count in np.ndenumerate(sub.numpy()):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    accuracy = matrix.diag().sum().item() / max(1, matrix.sum().item())
    ax.set_title(f"{len(keep)} most-confused of {k} classes" if reduced else f"{k} classes")
    if reduced:
        counts, flat = errors.flatten().topk(min(top_pairs, errors.numel()))
        pairs = [(f"{class_names[i // k]} → {class_names[i % k]}", n) for i, n in zip(flat.tolist(), counts.tolist())
                 if n > 0]
        bars = fig.add_subplot(1, 2, 2)
        bars.barh(range(len(pairs)), [n for _, n in pairs], color="tab:red")
        bars.set_yticks(range(len(pairs)), [label for label, _ in pairs], fontsize=8)
        bars.invert_yaxis()
        bars.set_xlabel("test images")
        bars.set_title(f"top {len(pairs)} confused pairs (true → predicted)")
    fig.suptitle(f"{title}: accuracy {accuracy:.2%} on {matrix.sum().item():,} test images", fontsize=10)
    return fig


def curves(scalars: dict[str, tuple[list[int], list[float]]], title: str) -> Figure:
    """Loss (train/val) and accuracy (val, train if logged) against the global step."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    panels = (("loss", ("train/loss", "val/loss")), ("accuracy", ("val/acc", "train/acc")))
    for index, (ylabel, tags) in enumerate(panels):
        ax = fig.add_subplot(1, 2, index + 1)
        for tag in tags:
            if tag in scalars:
                steps, values = scalars[tag]
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=tag,
                        color="tab:blue" if tag.startswith("train") else "tab:orange")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    return fig
