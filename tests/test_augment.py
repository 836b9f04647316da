"""The batched TrivialAugment against torchvision's TrivialAugmentWide, image by image, and its random draws."""

import pytest
import torch
from torchvision.transforms import v2

from vitcli.augment import BINS, OPS, trivial_augment
from vitcli.config import build_config
from vitcli.data import Preprocess


BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")  # float blends, where a rounding order may differ


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 24, 40), (3, 2, 5)])
def test_every_op_and_magnitude_matches_torchvision(shape):
    torch.manual_seed(0)
    n = 2 * BINS  # every magnitude bin, once positive and once negative
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8)
    if min(shape[1:]) >= 5:  # some low-contrast images, for autocontrast and equalize
        images[::2] = torch.nn.functional.avg_pool2d(images[::2].float(), 5, 1, 2).to(torch.uint8)
    level, negative = torch.arange(n) % BINS, torch.arange(n) >= BINS
    reference = v2.TrivialAugmentWide()
    for k, name in enumerate(OPS):
        u = torch.stack([torch.full((n,), (k + 0.5) / len(OPS)), (level + 0.5) / BINS,
                         torch.where(negative, 0.25, 0.75)], 1)
        out = trivial_augment(images, u)
        magnitudes, signed = reference._AUGMENTATION_SPACE[name]
        values = magnitudes(BINS, *shape[1:])
        diff = torch.zeros_like(images, dtype=torch.int32)
        for i in range(n):
            m = 0.0 if values is None else float(values[int(level[i])])
            m = -m if signed and negative[i] else m
            expected = reference._apply_image_or_video_transform(images[i], name, m, fill={},
                                                                 interpolation=v2.InterpolationMode.NEAREST)
            diff[i] = (expected.int() - out[i].int()).abs()
        if name in BLENDS:  # the same arithmetic; at most a rare pixel one level off
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.005, (name, diff.max(), (diff > 0).sum())
        else:
            assert diff.max() == 0, (name, diff.max(), (diff > 0).sum())
        if name != "Identity" and not (name == "Color" and shape[0] == 1) and min(shape[1:]) > 2:
            assert not torch.equal(out, images), name  # the op did something


def test_each_image_draws_its_own_op_and_ranks_share_the_global_draws():
    config = build_config({"data": {"dataset": "synthetic", "trivial_augment": True, "hflip": False,
                                    "crop_padding": 0}, "model": {"patch_size": 4, "dim": 8, "heads": 2},
                           "train": {"batch_size": 64}})
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.zeros(64, dtype=torch.long)
    cpu = torch.device("cpu")
    one = Preprocess(config, cpu, train=True)
    x, _ = one(images, labels, step=5)
    again, _ = one(images, labels, step=5)
    assert torch.equal(x, again)  # drawn from (seed, step), not from torch's global RNG
    assert not torch.equal(x, one(images, labels, step=6)[0])
    changed = (x != one.normalize(images)).flatten(1).any(1)
    assert 0.6 < changed.float().mean() < 1.0  # 1 op in 14 is the identity (and some ops change nothing here)
    # two ranks with half the batch each augment their halves exactly as one process does the whole batch
    halves = [Preprocess(config, cpu, train=True, rank=r, world_size=2)(images[32 * r:32 * (r + 1)], labels[:32],
                                                                          step=5)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), x)
