"""`vit bench`: images/s of the exact train step `vit train` runs, and of the eval forward, on synthetic batches."""

from __future__ import annotations

import time
from typing import Any

import torch

from vitcli.config import DATASET_DEFAULTS, Config
from vitcli.data import Preprocess
from vitcli.model import build_model
from vitcli.runtime import autocast, resolve_attention, resolve_device, resolve_precision
from vitcli.train import TrainStep, make_optimizer, maybe_compile, EMA


def forward_flops(config: Config, num_classes: int = 10) -> float:
    """Multiply-adds x 2 of one image's forward pass: linears on every token plus the two attention matmuls."""
    m = config.model
    tokens = (config.image_size // m.patch_size) ** 2 + 1
    channels = DATASET_DEFAULTS[config.data.dataset]["channels"]
    hidden = int(m.dim * m.mlp_ratio)
    per_block = tokens * (4 * m.dim * m.dim + 2 * m.dim * hidden) + 2 * tokens * tokens * m.dim
    embed = (tokens - 1) * channels * m.patch_size**2 * m.dim
    return 2.0 * (m.depth * per_block + embed + m.dim * num_classes)


def bench(config: Config, steps: int = 20, warmup: int = 5) -> dict[str, Any]:
    device = resolve_device(config.train.device)
    precision = resolve_precision(config.train.precision, device)
    attention = resolve_attention(config.model.attention, device, precision)
    torch.manual_seed(config.train.seed)
    channels = DATASET_DEFAULTS[config.data.dataset]["channels"]
    num_classes = 100 if config.data.dataset == "cifar100" else 10
    model = build_model(config, num_classes).to(device)
    model.set_fused_attention(attention == "fused")
    optimizer = make_optimizer(model, config, device)
    ema = EMA(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    step_fn = TrainStep(model, optimizer, config, device, precision, ema, scaler,
                        forward=maybe_compile(model, config.train.compile))
    preprocess = Preprocess(config, device, train=True)
    preprocess.num_classes = num_classes
    size, b = config.image_size, config.train.batch_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, channels, size, size), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, num_classes, (b,), generator=g).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(i: int):
        x, targets = preprocess(images, labels, i)
        loss, _ = step_fn(x, targets, config.train.lr, i)
        return loss

    for i in range(warmup):
        train_step(i)
    sync()
    t = time.perf_counter()
    for i in range(steps):
        loss = train_step(warmup + i)
    float(loss)
    sync()
    train_seconds = (time.perf_counter() - t) / steps

    eval_pre = Preprocess(config, device, train=False)
    eb = config.train.eval_batch_size
    eval_images = torch.randint(0, 256, (eb, channels, size, size), generator=g, dtype=torch.uint8).to(device)
    model.eval()
    forward = step_fn.forward
    with torch.inference_mode():
        def infer():
            x, _ = eval_pre(eval_images, None)
            with autocast(device, precision):
                return forward(x)

        for _ in range(max(2, warmup // 2)):
            infer()
        sync()
        t = time.perf_counter()
        n_eval = max(3, steps // 2)
        for _ in range(n_eval):
            out = infer()
        float(out.float().sum())
        sync()
        infer_seconds = (time.perf_counter() - t) / n_eval

    flops = forward_flops(config, num_classes)
    train_ips = b / train_seconds
    return {
        "config": config.name,
        "device": str(device),
        "precision": precision,
        "attention": attention,
        "compile": config.train.compile,
        "batch_size": b,
        "threads": torch.get_num_threads(),
        "train_images_per_second": train_ips,
        "infer_images_per_second": eb / infer_seconds,
        "train_step_ms": 1000 * train_seconds,
        "train_gflops_per_second": 3 * flops * train_ips / 1e9,
        "forward_gflops_per_image": flops / 1e9,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
