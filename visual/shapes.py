"""Each layer's output shape and parameter count for a config, with the H_out arithmetic checked.

    python -m visual.shapes --config configs/cifar10_table2_cnn.yaml
    python -m visual.shapes --config configs/cifar100_cnn.yaml --config configs/ablations/narrow.yaml
    python -m visual.shapes --config configs/cifar10_resnet18.yaml --model.init_args.weights null

For every Conv2d / MaxPool2d / AvgPool2d, H_out = floor((H_in + 2P - K)/S + 1) from its kernel_size K, stride S
and padding P (K becomes D*(K-1)+1 with dilation D; ceil with ceil_mode) is compared with the shape of the real
forward pass ("formula" vs "actual"); any mismatch exits with status 1. The model is built exactly as cli.py
builds it (no data is read, no run directory is created).
"""
import argparse
import sys
from typing import Optional

import torch
from torch import nn

from errors import one_line_errors
from visual.build import build_experiment
from visual.introspect import input_device_dtype, layer_kind, parameter_count, trace


def _pair(value) -> tuple:
    return (value, value) if isinstance(value, int) or value is None else tuple(value)


def formula_hw(layer, in_hw: tuple[int, int]) -> Optional[tuple[tuple[int, int], str]]:
    """((H_out, W_out), the arithmetic for H as text) from a conv/pool layer's geometry; None for other layers."""
    if layer_kind(layer) is None:
        return None
    if "Adaptive" in type(layer).__name__:
        size = _pair(layer.output_size)
        out = tuple(in_hw[i] if size[i] is None else size[i] for i in range(2))
        return out, f"adaptive: {out[0]}"
    kernel = _pair(layer.kernel_size)
    stride = _pair(getattr(layer, "stride", None) or kernel)  # pooling: stride defaults to the kernel size
    padding = getattr(layer, "padding", 0)
    if padding == "same":
        return tuple(in_hw), f"same padding: {in_hw[0]}"
    padding = (0, 0) if padding == "valid" else _pair(padding)
    dilation = _pair(getattr(layer, "dilation", 1))
    ceil_mode = getattr(layer, "ceil_mode", False)
    out = []
    for i in range(2):
        span = in_hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1  # H_in + 2P - K
        size = (-(-span // stride[i]) if ceil_mode else span // stride[i]) + 1
        if ceil_mode and (size - 1) * stride[i] >= in_hw[i] + padding[i]:
            size -= 1  # torch: the last window must start inside the input or its left padding
        out.append(size)
    k = str(kernel[0]) if dilation[0] == 1 else f"{dilation[0]}*({kernel[0]}-1)+1"
    rounding = "ceil" if ceil_mode else "floor"
    return tuple(out), f"{rounding}(({in_hw[0]} + 2*{padding[0]} - {k})/{stride[0]} + 1) = {out[0]}"


def shape_table(model, input_shape: tuple[int, ...]) -> tuple[list[dict], int, int]:
    """One row per layer call in forward order, plus the model's (total, trainable) parameter counts."""
    device, dtype = input_device_dtype(model)
    records = trace(model, torch.zeros(1, *input_shape, device=device, dtype=dtype), leaves_only=True)
    rows = [{"layer": "input", "type": "", "output": " x ".join(map(str, input_shape)), "params": "",
             "H_out arithmetic": "", "formula": "", "actual": "", "check": ""}]
    for record in records:
        actual = tuple(record.output.shape[1:])
        row = {"layer": record.name, "type": type(record.layer).__name__ if record.layer is not None else "",
               "output": " x ".join(map(str, actual)), "params": f"{parameter_count(record.layer):,}",
               "H_out arithmetic": "", "formula": "", "actual": "", "check": ""}
        geometry = None
        if record.layer is not None and record.input_shape and len(record.input_shape) == 4 and len(actual) == 3:
            geometry = formula_hw(record.layer, record.input_shape[-2:])
        if geometry is not None:
            (height, width), arithmetic = geometry
            row.update({"H_out arithmetic": arithmetic, "formula": f"{height} x {width}",
                        "actual": f"{actual[1]} x {actual[2]}", "ok": (height, width) == actual[1:]})
            row["check"] = "ok" if row["ok"] else "MISMATCH"
        rows.append(row)
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    extra = {id(r.layer): parameter_count(r.layer) for r in records if not isinstance(r.layer, nn.Module)}
    total = sum(p.numel() for p in params) + sum(extra.values())  # + hand-written (scratch) layers' tensors
    trainable = sum(p.numel() for p in params if p.requires_grad) + sum(extra.values())
    return rows, total, trainable


def render(rows: list[dict]) -> str:
    columns = ["layer", "type", "output", "params", "H_out arithmetic", "formula", "actual", "check"]
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    right = {"params"}
    line = lambda values: "  ".join(v.rjust(widths[c]) if c in right else v.ljust(widths[c])
                                    for c, v in zip(columns, values)).rstrip()
    return "\n".join([line(columns), line(["-" * widths[c] for c in columns]),
                      *(line([row[c] for c in columns]) for row in rows)])


@one_line_errors()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visual.shapes", description=__doc__.split("\n")[0],
                                     epilog="Other arguments are cli.py overrides, e.g. --data.init_args.resize 64")
    parser.add_argument("--config", action="append", required=True, help="a config (repeat to compose overlays)")
    args, overrides = parser.parse_known_args(argv)
    built = build_experiment(args.config, overrides)
    model, input_shape = built.model, tuple(built.datamodule.input_shape)
    rows, total, trainable = shape_table(model, input_shape)
    print(f"{built.experiment_name}: {type(model).__name__}, input {' x '.join(map(str, input_shape))}")
    print(render(rows))
    print(f"total parameters: {total:,} (trainable {trainable:,})")
    bad = [row for row in rows if row.get("ok") is False]
    if bad:
        where = "; ".join(f"{r['layer']}: formula {r['formula']}, forward pass {r['actual']}" for r in bad)
        print(f"error: the H_out arithmetic disagrees with the forward pass at {where}", file=sys.stderr)
        sys.exit(1)
    return 0


if __name__ == "__main__":
    main()
