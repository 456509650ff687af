"""Pre-download datasets (and model weights) on a machine with internet, e.g. a cluster login node.

    python -m datamodules.download cifar100 emnist --data_dir /scratch/data
    python -m datamodules.download all --data_dir "$DATA_DIR"
    python -m datamodules.download resnet18 clip       # weights into $TORCH_HOME / $HF_HOME

Compute nodes then run with `--data.data_dir /scratch/data --data.download false`.
"""
import argparse
import sys

from datamodules import DATAMODULES
from errors import UserError, one_line_errors, user_error_in

WEIGHTS = {
    "resnet18": "ResNet-18 ImageNet weights into $TORCH_HOME (default ~/.cache/torch)",
    "clip": "openai/clip-vit-base-patch32 into $HF_HOME (default ~/.cache/huggingface)",
}


def fetch_weights(name: str) -> None:
    if name == "resnet18":
        from torchvision.models import ResNet18_Weights

        ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    elif name == "clip":
        from transformers import CLIPModel, CLIPProcessor

        CLIPModel.from_pretrained("openai/clip-vit-base-patch32")
        CLIPProcessor.from_pretrained("openai/clip-vit-base-patch32")


@one_line_errors()
def main(argv=None) -> int:
    choices = sorted(DATAMODULES) + sorted(WEIGHTS) + ["all"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=choices, metavar="NAME", help=f"any of: {', '.join(choices)}")
    parser.add_argument("--data_dir", default=None, help="default: $DATA_DIR, else data/")
    parser.add_argument("--emnist_split", default="byclass")
    args = parser.parse_args(argv)
    names = [n for n in DATAMODULES if n != "digits"] if "all" in args.names else args.names
    for name in dict.fromkeys(names):
        try:
            if name in WEIGHTS:
                print(f"fetching {WEIGHTS[name]}", flush=True)
                fetch_weights(name)
                continue
            kwargs = {"split": args.emnist_split} if name == "emnist" else {}
            datamodule = DATAMODULES[name](data_dir=args.data_dir, download=True, **kwargs)
            print(f"fetching {name} into {datamodule.data_dir}", flush=True)
            datamodule.prepare_data()
        except Exception as error:  # network errors from torchvision / the hub
            if user_error_in(error) is not None:
                raise  # ours, or a full disk: the boundary says which
            raise UserError(f"could not download {name} ({type(error).__name__}: {error}); check the internet "
                            "connection of this machine") from None
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
