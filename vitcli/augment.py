"""TrivialAugment Wide (Muller & Hutter, 2021) on a whole uint8 batch at once, each image with its own op.

torchvision's TrivialAugmentWide draws one op and magnitude per call and applies it to everything it is given. Here
every op runs once on the whole batch with per-image magnitudes (the geometric ones as a single grid_sample) and each
image keeps the result of its own op: a fixed number of tensor operations per batch, whatever its size, which is what
a GPU needs (one call per image, or per group, is launch after launch). The ops, their magnitudes and their
arithmetic are torchvision's (tests compare the two image by image); the random draws are the caller's.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
BINS = 31  # torchvision's num_magnitude_bins
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> torch.Tensor:
    """torchvision's magnitude bins, a row per kind: shear, translate, rotate, colour, solarize, posterize."""
    return torch.stack([torch.linspace(0.0, 0.99, BINS), torch.linspace(0.0, 32.0, BINS),
                        torch.linspace(0.0, 135.0, BINS), torch.linspace(0.0, 0.99, BINS),
                        torch.linspace(1.0, 0.0, BINS), (8 - (torch.arange(BINS) / ((BINS - 1) / 6))).round()]
                       ).to(device)


@functools.lru_cache(maxsize=None)
def _grid_base(device: torch.device, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's affine grid before the matrix: pixel centres about the image centre (H, W, 3), and the half
    sizes that normalise it. Made once per device and size, so no batch waits on a copy from the host."""
    base = torch.ones(H, W, 3, device=device)
    base[..., 0] = torch.linspace((1.0 - W) * 0.5, (W - 1.0) * 0.5, W, device=device)
    base[..., 1] = torch.linspace((1.0 - H) * 0.5, (H - 1.0) * 0.5, H, device=device).unsqueeze(-1)
    return base, torch.tensor([0.5 * W, 0.5 * H], device=device)


def trivial_augment(images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """images: uint8 (B, C, H, W), C 1 or 3; u: (B, 3) uniform [0, 1) draws per image (op, magnitude bin, sign).
    Returns the augmented uint8 batch."""
    with torch.autocast(images.device.type, enabled=False):  # the grid's bmm in float32 whatever the caller's
        return _trivial_augment(images, u)


def _trivial_augment(images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    B, C, H, W = images.shape
    dev = images.device
    op = (u[:, 0] * len(OPS)).long().clamp_(max=len(OPS) - 1)
    level = (u[:, 1] * BINS).long().clamp_(max=BINS - 1)
    sign = torch.where(u[:, 2] <= 0.5, -1.0, 1.0).double()

    shear, shift, angle, colour, threshold, bits = _tables(dev)[:, level].double()  # each image's magnitudes
    shear, shift, angle, ratio = shear * sign, shift * sign, angle * sign, 1.0 + colour * sign

    def is_op(name: str) -> torch.Tensor:
        return op == OPS.index(name)

    x = images.float()
    candidates = {"Identity": images}

    # geometric: torchvision's inverse affine matrix per image (identity for the others), one grid_sample
    zero = torch.zeros(B, dtype=torch.float64, device=dev)
    shear = torch.rad2deg(torch.atan(shear))
    shear_x, shear_y = torch.where(is_op("ShearX"), shear, zero), torch.where(is_op("ShearY"), shear, zero)
    shift = shift.trunc()  # int(magnitude) pixels
    tx, ty = torch.where(is_op("TranslateX"), shift, zero), torch.where(is_op("TranslateY"), shift, zero)
    angle = torch.where(is_op("Rotate"), -torch.remainder(angle, 360.0), zero)  # rotate turns by -angle
    corner = is_op("ShearX") | is_op("ShearY")  # the shears turn about the top-left corner, the rest about the centre
    cx, cy = torch.where(corner, -0.5 * W, 0.0).double(), torch.where(corner, -0.5 * H, 0.0).double()
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    theta = torch.stack([d, -b, d * (-cx - tx) + -b * (-cy - ty) + cx,
                         -c, a, -c * (-cx - tx) + a * (-cy - ty) + cy], 1).float().view(B, 2, 3)
    base, half = _grid_base(dev, H, W)
    scaled = theta.transpose(1, 2) / half
    grid = base.view(1, H * W, 3).expand(B, -1, -1).bmm(scaled).view(B, H, W, 2)
    warped = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False).to(torch.uint8)
    for name in GEOMETRIC:
        candidates[name] = warped

    # colour: torchvision's blends, with the factor per image
    factor, rest = ratio.float().view(B, 1, 1, 1), (1.0 - ratio).float().view(B, 1, 1, 1)

    def blend(other: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x * factor, other, rest).clamp_(0, 255).to(torch.uint8)

    candidates["Brightness"] = (x * factor).clamp_(0, 255).to(torch.uint8)
    if C == 3:
        gray = x[:, 0:1].mul(0.2989).add_(x[:, 1:2], alpha=0.587).add_(x[:, 2:3], alpha=0.114).floor_()
        candidates["Color"] = blend(gray)
        candidates["Contrast"] = blend(gray.mean(dim=(-3, -2, -1), keepdim=True))
    else:  # saturation leaves one-channel images as they are
        candidates["Color"] = images
        candidates["Contrast"] = blend(x.mean(dim=(-3, -2, -1), keepdim=True))
    if H > 2 and W > 2:
        # torchvision's smoothing filter (1/13 around, 5/13 in the centre), rounded: a sum of integers over 13 is
        # never a half-integer, so this rounds to what its convolution does, at a fraction of a depthwise conv2d's
        # time on the CPU
        blurred = x[..., 1:-1, 1:-1] * 4.0
        for dy in range(3):
            for dx in range(3):
                blurred += x[..., dy:dy + H - 2, dx:dx + W - 2]
        blurred = blurred.div_(13.0).round_()
        sharp = x.clone()
        inner = sharp[..., 1:-1, 1:-1]
        inner += (blurred - inner) * rest
        candidates["Sharpness"] = sharp.clamp_(0, 255).to(torch.uint8)
    else:
        candidates["Sharpness"] = images
    bits = bits.int()
    mask = (((1 << bits) - 1) << (8 - bits)).to(torch.uint8).view(B, 1, 1, 1)
    candidates["Posterize"] = images & mask
    threshold = (255.0 * threshold).float().view(B, 1, 1, 1)
    candidates["Solarize"] = torch.where(x >= threshold, 255 - images, images)
    candidates["AutoContrast"] = TF.autocontrast(images)
    candidates["Equalize"] = TF.equalize(images)

    stacked = torch.stack([candidates[name] for name in OPS])  # (ops, B, C, H, W)
    return stacked[op, torch.arange(B, device=dev)]
