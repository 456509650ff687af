"""The analysis figures from a saved checkpoint, after the fact: the PNGs a run's Figures callback writes.

    python -m visual.figures --ckpt logs/quickstart/<version>/checkpoints/best-epoch12.ckpt
    python -m visual.figures --ckpt logs/cifar10_resnet18/<version>/checkpoints/last.ckpt --image grace_hopper
    python -m visual.figures --ckpt ... --out figs/ --data.init_args.data_dir /scratch/data  # + any cli.py override

The model is rebuilt exactly as cli.py builds it, from the run's config.yaml (the one next to checkpoints/, or
--config), the checkpoint's weights are loaded (weights_only), the test split is tested once (for the confusion
matrix), and the seven PNGs go to --out (default: <run directory>/figures-<checkpoint name>/). curves.png reads
the run directory's TensorBoard event files.
"""
import argparse
import os

import lightning.pytorch as pl
import torch

from callbacks.figures import Figures
from callbacks.results import run_directory
from errors import UserError, one_line_errors
from visual.build import build_experiment


def make_figures(ckpt: str, configs=None, out=None, image=None, image_path=None, overrides=()) -> dict[str, str]:
    if not os.path.isfile(ckpt):
        raise UserError(f"checkpoint {ckpt} does not exist; runs keep theirs in "
                        "logs/<experiment>/<version>/checkpoints/")
    run_dir = run_directory(ckpt)
    configs = configs or [os.path.join(run_dir, "config.yaml")]
    built = build_experiment(configs, overrides)
    options = built.config.figures.as_dict() if "figures" in built.config else {}
    options["enabled"] = True  # asked for explicitly, even where the run had them off
    options.update({key: value for key, value in (("image", image), ("image_path", image_path)) if value})
    figures = Figures(**options)
    model, datamodule = built.model, built.datamodule
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)  # tensors and plain values only
    except Exception as error:  # truncated file, not a checkpoint, pickled objects
        reason = (str(error).strip().splitlines() or [""])[0]
        raise UserError(f"checkpoint {ckpt} cannot be read ({type(error).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{ckpt} is not a Lightning checkpoint (no state_dict); give one from a run's checkpoints/")
    model.on_load_checkpoint(checkpoint)  # e.g. the check that the config builds the model that saved it
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:  # missing/unexpected keys or shapes: another config's model
        reason = str(error).strip().splitlines()[0]
        raise UserError(f"the weights in {ckpt} do not fit the model the config builds ({reason}); "
                        "use the config.yaml of the run that saved the checkpoint") from None
    trainer.test(model, datamodule=datamodule, verbose=False)  # fills model.test_confusion
    name = os.path.splitext(os.path.basename(ckpt))[0]
    out = out or os.path.join(run_dir, f"figures-{name}")
    return figures.write(model, datamodule, out, f"{built.experiment_name} ({type(model).__name__})",
                         confusion=model.test_confusion.compute().cpu(), events_dir=run_dir, checkpoint=name)


@one_line_errors()
def main(argv=None) -> dict[str, str]:
    parser = argparse.ArgumentParser(prog="python -m visual.figures", description=__doc__.split("\n")[0],
                                     epilog="Other arguments are cli.py overrides, e.g. --data.init_args.data_dir D")
    parser.add_argument("--ckpt", required=True, help="a checkpoint of a run, e.g. .../checkpoints/last.ckpt")
    parser.add_argument("--config", action="append", help="default: config.yaml in the checkpoint's run directory")
    parser.add_argument("--out", help="output folder; default: <run directory>/figures-<checkpoint name>")
    parser.add_argument("--image", choices=["test", "grace_hopper"], help="sample image for the feature maps")
    parser.add_argument("--image_path", help="any image file as the sample image")
    args, overrides = parser.parse_known_args(argv)
    written = make_figures(args.ckpt, args.config, args.out, args.image, args.image_path, overrides)
    for path in written.values():
        print(path)
    return written


if __name__ == "__main__":
    main()
