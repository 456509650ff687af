"""Device-side batch transforms: uint8 (B, C, H, W) in, normalized float out, one draw per sample.

torchvision's v2 transforms draw one set of random parameters per call (per batch); these draw
per sample and apply them to the whole batch in one op. Random parameters come from a CPU
generator (small tensors), so the augmentation stream is reproducible and can be checkpointed.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_crop_flip(x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """RandomCrop(size, padding, fill=0) + RandomHorizontalFlip, drawn per sample, as one gather."""
    B, C, H, W = x.shape
    padded = F.pad(x, (padding,) * 4) if padding > 0 else x  # (B, C, H+2p, W+2p)
    Wp = W + 2 * padding
    # drawn on the CPU generator, then sent without a sync: a blocking copy would wait for the GPU's queue
    offsets = torch.randint(0, 2 * padding + 1, (2, B), generator=generator).to(x.device, non_blocking=True)
    cols = torch.arange(W, device=x.device).expand(B, W)  # (B, W)
    if hflip:
        flip = (torch.rand(B, generator=generator) < 0.5).to(x.device, non_blocking=True)  # (B,)
        cols = torch.where(flip[:, None], W - 1 - cols, cols)  # reversed columns = mirrored image
    rows = offsets[0, :, None] + torch.arange(H, device=x.device)  # (B, H) top, left = offsets[0], offsets[1]
    index = rows[:, :, None] * Wp + (offsets[1, :, None] + cols)[:, None, :]  # (B, H, W) into the padded plane
    index = index.view(B, 1, H * W).expand(B, C, H * W)  # (B, C, H*W)
    return padded.flatten(2).gather(2, index).view(B, C, H, W)


def random_affine(x: torch.Tensor, degrees: float, scale: Optional[tuple[float, float]],
                  generator: torch.Generator) -> torch.Tensor:
    """Per-sample rotation in [-degrees, degrees] and a random resized crop of area in `scale`."""
    B = x.shape[0]
    angle = (torch.rand(B, generator=generator) * 2 - 1) * degrees  # (B,) degrees
    side = torch.ones(B)  # (B,) crop side as a fraction of the image side
    shift = torch.zeros(2, B)  # (2, B) crop centre in normalized coordinates
    if scale is not None:
        area = scale[0] + torch.rand(B, generator=generator) * (scale[1] - scale[0])  # (B,)
        side = area.sqrt()
        shift = (torch.rand(2, B, generator=generator) * 2 - 1) * (1 - side)  # the crop stays inside
    return affine(x, angle, side, shift)


def affine(x: torch.Tensor, angle: torch.Tensor, side: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates each image counter-clockwise by angle[b] degrees (as torchvision's rotate) and crops the
    square of relative side side[b] centred at shift[:, b], back to full size: one affine_grid +
    grid_sample (bilinear, zero fill) for the whole float batch."""
    radians = angle * math.pi / 180
    cos, sin = radians.cos() * side, radians.sin() * side  # (B,)
    # theta maps output to input coordinates (x right, y down), as torchvision's rotate builds it
    theta = torch.stack([torch.stack([cos, -sin, shift[0]], 1), torch.stack([sin, cos, shift[1]], 1)], 1)
    theta = theta.to(x.device, x.dtype, non_blocking=True)  # (B, 2, 3); no sync with the GPU's queue
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Gray -> RGB by repetition, RGB -> gray with ITU-R 601 weights (torchvision's)."""
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1)  # (B, 3, H, W), a view
    return TF.rgb_to_grayscale(x, num_output_channels=1)  # (B, 1, H, W)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Square bilinear resize with antialiasing (matters only when shrinking)."""
    return TF.resize(x, [size, size], antialias=True)  # (B, C, size, size)
