"""What a timm user writes to train a ViT on Fashion-MNIST: torchvision per-image transforms (and timm's random erasing,
as the recipe has it) through a 2-worker DataLoader, timm's VisionTransformer in fp32 (timm's default), AdamW with a
one-cycle schedule, then the test accuracy. The shape and hyper-parameters are configs/fashion_mnist.yaml's, with
timm's linear patch embedding, or with `--stem conv` the recipe's convolutional stem, built the way timm builds its
hybrid ViTs. benchmarks/vs_timm.py runs this script as a command of its own and times it from outside, as it times
`vit train`, so both sides pay for starting Python and importing their libraries.

    python benchmarks/timm_epoch.py --root DIR [--epochs 1] [--seed 0] [--stem linear|conv]

DIR holds FashionMNIST/raw/ as torchvision wants it: the four idx files unzipped (torchvision's download=True
leaves them so; Debian's dataset-fashion-mnist has only the .gz files, which benchmarks/vs_timm.py unzips into such
a folder before it runs this script). Prints one JSON object: the seconds from building the datasets to the end of
the test pass (this process's own clock) and the test top-1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from timm.data.random_erasing import RandomErasing
try:
    from timm.layers import HybridEmbed
except ImportError:  # timm releases before it moved to timm.layers
    from timm.models.vision_transformer_hybrid import HybridEmbed
from timm.models.vision_transformer import VisionTransformer
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitcli.config import DATASET_DEFAULTS, load_config  # noqa: E402
from vitcli.model import ConvStem  # noqa: E402
from vitcli.runtime import tune_malloc  # noqa: E402


def timm_vit(config, stem: str = "linear"):
    """timm's VisionTransformer with the config's dim, depth, heads and MLP. stem="linear": timm's own patch
    embedding. stem="conv": the config's convolutional stem, the way timm builds its hybrid ViTs: timm's HybridEmbed
    over a backbone, here the same 3x3 Conv-BatchNorm-ReLU layers as vitcli's (torch.nn's), whose 1x1 projection to
    the embedding is HybridEmbed's own (with a bias, as vitcli's)."""
    m = config.model
    channels = DATASET_DEFAULTS[config.data.dataset]["channels"]
    shape = dict(img_size=config.image_size, in_chans=channels, num_classes=10, embed_dim=m.dim, depth=m.depth,
                 num_heads=m.heads, mlp_ratio=m.mlp_ratio, class_token=True, global_pool="token")
    if stem == "linear":
        return VisionTransformer(patch_size=m.patch_size, **shape)
    # vitcli's ConvStem's 3x3 convolutions (widths, strides) rebuilt from torch.nn; its last, 1x1 one is HybridEmbed's
    convs = [c for c in ConvStem(m.patch_size, channels, m.dim, m.stem_channels).modules()
             if isinstance(c, torch.nn.Conv2d)][:-1]
    layers = []
    for c in convs:
        layers += [torch.nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, stride=c.stride, padding=c.padding,
                                   bias=False), torch.nn.BatchNorm2d(c.out_channels), torch.nn.ReLU(inplace=True)]
    backbone = torch.nn.Sequential(*layers)
    return VisionTransformer(patch_size=1, embed_layer=partial(HybridEmbed, backbone=backbone), **shape)


def timm_epoch(root: str, epochs: int = 1, seed: int = 0, device: str = "cpu",
               stem: str = "linear") -> dict[str, float]:
    config = load_config(REPO / "configs" / "fashion_mnist.yaml")
    normalize = transforms.Normalize(config.mean, config.std)
    crop = [transforms.RandomCrop(28, padding=config.crop_padding)] if config.crop_padding else []
    flip = [transforms.RandomHorizontalFlip()] if config.hflip else []
    # the recipe's random erasing as timm's own (per-pixel normal noise on the normalized image, as vitcli's)
    erasing = config.data.random_erasing
    erase = [RandomErasing(erasing, mode="pixel", device="cpu")] if erasing else []
    train_tf = transforms.Compose([*crop, *flip, transforms.ToTensor(), normalize, *erase])
    test_tf = transforms.Compose([transforms.ToTensor(), normalize])
    start = time.perf_counter()
    train_set = torchvision.datasets.FashionMNIST(root, train=True, transform=train_tf)
    test_set = torchvision.datasets.FashionMNIST(root, train=False, transform=test_tf)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=config.train.batch_size, shuffle=True,
                                               num_workers=2, drop_last=True, persistent_workers=True,
                                               pin_memory=device != "cpu")
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=512, num_workers=2, pin_memory=device != "cpu")
    torch.manual_seed(seed)
    model = timm_vit(config, stem).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    total = epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.train.lr, total_steps=total,
                                                    pct_start=0.2)
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    correct = 0
    with torch.inference_mode():
        for x, y in test_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            correct += (model(x).argmax(1) == y).sum().item()
    return {"seconds": time.perf_counter() - start, "test_top1": correct / len(test_set)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True,
                        help="the folder holding FashionMNIST/raw/ with the four idx files unzipped")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (fp32, timm's default, either way)")
    parser.add_argument("--stem", choices=["linear", "conv"], default="linear",
                        help="timm's linear patch embedding, or the recipe's convolutional stem (timm's HybridEmbed)")
    args = parser.parse_args()
    raw = Path(args.root) / "FashionMNIST" / "raw"
    if not (raw / "t10k-labels-idx1-ubyte").is_file():
        sys.exit(f"timm_epoch.py: no unzipped Fashion-MNIST idx files in {raw} (torchvision reads those); gunzip "
                 f"copies of the four *-ubyte.gz files there")
    tune_malloc()  # as `vit` tunes its own, so that both sides run with the same allocator settings
    print(json.dumps(timm_epoch(args.root, args.epochs, args.seed, args.device, args.stem)), flush=True)


if __name__ == "__main__":
    main()
