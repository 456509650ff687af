"""The sample image the feature-map figures run through a model: a test image, an image file or a bundled photo."""
import os
from typing import Optional

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from datamodules import batch_transforms as BT
from errors import UserError

GRACE_HOPPER = "grace_hopper"  # matplotlib's bundled photo (512 x 600 RGB): a real image for ImageNet-sized models


def read_image(path: str) -> torch.Tensor:
    """An image file as uint8 (3, H, W); a missing or unreadable file is a UserError."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UserError(f"image file {path} does not exist; give a PNG or JPEG file (figures.image_path)")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))  # (H, W, 3)
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{path} is not an image PIL can read ({type(error).__name__}); give a PNG or JPEG file") \
            from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)


def sample_photo() -> torch.Tensor:
    from matplotlib import cbook

    return read_image(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))


def to_model_input(image: torch.Tensor, input_shape: tuple[int, int, int], datamodule=None) -> torch.Tensor:
    """uint8 (C, H, W) of any size -> (1, *input_shape): center square crop, resize, then the data's transform."""
    channels, height, width = input_shape
    side = min(image.shape[-2:])
    x = TF.center_crop(image, [side, side]) if image.shape[-1] != image.shape[-2] else image  # (C, s, s)
    x = TF.resize(x[None], [height, width], antialias=True)  # (1, C, H, W) uint8
    if datamodule is not None and callable(getattr(datamodule, "transform", None)):
        return datamodule.transform(x, training=False)  # channels and the dataset's normalization
    return BT.convert_channels(x.float() / 255, channels)  # (1, channels, H, W) in [0, 1]


def sample_image(source: str, image_path: Optional[str], datamodule,
                 input_shape: Optional[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(display uint8 (C, H, W), model input (1, *input_shape), description) for "test", "grace_hopper" or a file."""
    if image_path:
        image, label = read_image(image_path), os.path.basename(image_path)
    elif source == GRACE_HOPPER:
        image, label = sample_photo(), "grace_hopper.jpg"
    else:
        test = getattr(datamodule, "splits", {}).get("test") if datamodule is not None else None
        if test is None or len(test) == 0:
            raise UserError("no test image to run through the model: set up the data first, or set "
                            "figures.image: grace_hopper or figures.image_path")
        image = test.images[0]  # (C, H, W) uint8, before the data's resize
        names = getattr(datamodule, "class_names", None)
        label = f"test image 0 ({names[int(test.labels[0])]})" if names else "test image 0"
        x = datamodule.transform(image[None], training=False)  # (1, *input_shape)
        return image, x, label
    if not input_shape:
        raise UserError("the model's input shape is unknown (no datamodule.input_shape or hparams.input_shape)")
    return image, to_model_input(image, tuple(input_shape), datamodule), label
