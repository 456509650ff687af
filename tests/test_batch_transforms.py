"""Device-side augmentation against torchvision's per-image reference ops."""
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from datamodules import batch_transforms as BT


def test_crop_flip_equals_torchvision_crop_and_flip_per_sample():
    x = torch.rand(64, 3, 32, 32)
    ours = BT.random_crop_flip(x, 4, True, torch.Generator().manual_seed(1))
    draws = torch.Generator().manual_seed(1)  # the same draws, in the same order
    offsets = torch.randint(0, 9, (2, 64), generator=draws)
    flips = torch.rand(64, generator=draws) < 0.5
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(64):
        expected = TF.crop(padded[i], int(offsets[0, i]), int(offsets[1, i]), 32, 32)
        expected = TF.horizontal_flip(expected) if flips[i] else expected
        assert torch.equal(ours[i], expected)
    assert flips.any() and not flips.all() and len(set(offsets[0].tolist())) > 1


def test_affine_rotation_matches_torchvision_rotate_per_sample():
    x = torch.zeros(3, 1, 28, 28)
    x[:, :, 6:22, 12:15] = 1.0  # a vertical bar, off the centre line so direction matters
    x[:, :, 6:9, 12:22] = 1.0
    angles = torch.tensor([0.0, 90.0, -90.0])
    ours = BT.affine(x, angles, torch.ones(3), torch.zeros(2, 3))
    for i, angle in enumerate(angles.tolist()):
        assert torch.allclose(ours[i], TF.rotate(x[i], angle), atol=1e-5), angle


def test_resized_crop_of_the_centre_quarter_matches_torchvision():
    x = torch.rand(1, 3, 32, 32)
    ours = BT.affine(x, torch.zeros(1), torch.tensor([0.5]), torch.zeros(2, 1))  # central 16x16, back to 32
    reference = TF.resize(TF.center_crop(x, [16, 16]), [32, 32], antialias=False)
    # both bilinear on the same sampling grid; only the outermost ring differs (we read the real
    # neighbours outside the crop, resize of the cut-out clamps at its border)
    assert torch.allclose(ours[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1], atol=1e-5)


def test_random_affine_draws_differ_per_sample():
    x = torch.rand(1, 1, 28, 28).expand(16, 1, 28, 28)
    out = BT.random_affine(x, 15.0, (0.8, 1.0), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and len({tuple(o.flatten().tolist()) for o in out}) == 16
