"""`vit bench`: images/s of the exact train step `vit train` runs, and of the eval forward, on synthetic batches."""

from __future__ import annotations

import time
from typing import Any

import torch

from vitcli.config import DATASET_DEFAULTS, Config
from vitcli.data import Preprocess
from vitcli.model import ConvStem, build_model
from vitcli.runtime import (autocast, check_model_fits, evaluation_compile_mode, resolve_attention,
                            resolve_compile_mode, resolve_device, resolve_precision)
from vitcli.step import EMA, Forward, TrainStep, make_optimizer


def forward_flops(config: Config, num_classes: int = 10, class_token_only: bool = True) -> float:
    """Multiply-adds x 2 of one image's forward pass: the patch embedding (or conv stem), linears on every token,
    the two attention matmuls and the head. By default as vitcli's forward runs it, whose last block computes the
    class token alone (keys and values of every token); class_token_only=False counts the full last block, as
    timm's and torchvision's ViTs run it."""
    m = config.model
    tokens = (config.image_size // m.patch_size) ** 2 + 1
    channels = DATASET_DEFAULTS[config.data.dataset]["channels"]
    hidden = int(m.dim * m.mlp_ratio)
    per_block = tokens * (4 * m.dim * m.dim + 2 * m.dim * hidden) + 2 * tokens * tokens * m.dim
    last_block = per_block
    if class_token_only:  # keys and values of every token; query, attention row, projection and MLP of one
        last_block = tokens * 2 * m.dim * m.dim + (2 * m.dim * m.dim + 2 * m.dim * hidden) + 2 * tokens * m.dim
    if m.stem == "conv":  # count the stem's own convolutions, so this follows the module (widths, strides)
        side, embed = config.image_size, 0
        for conv in ConvStem(m.patch_size, channels, m.dim, m.stem_channels).modules():
            if isinstance(conv, torch.nn.Conv2d):
                side = -(-side // conv.stride[0])  # padding keeps ceil(side / stride)
                embed += side * side * conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    else:
        embed = (tokens - 1) * channels * m.patch_size**2 * m.dim
    return 2.0 * ((m.depth - 1) * per_block + last_block + embed + m.dim * num_classes)


class Workload:
    """The exact train step and eval forward of `vit train` for a config, on fixed synthetic uint8 batches."""

    def __init__(self, config: Config):
        self.config = config
        self.device = device = resolve_device(config.train.device)
        check_model_fits(config, device)
        self.precision = precision = resolve_precision(config.train.precision, device)
        self.attention = resolve_attention(config.model.attention, device, precision)
        torch.manual_seed(config.train.seed)
        channels = DATASET_DEFAULTS[config.data.dataset]["channels"]
        self.num_classes = 100 if config.data.dataset == "cifar100" else 10
        self.model = model = build_model(config, self.num_classes).to(device)
        model.set_fused_attention(self.attention == "fused")
        optimizer = make_optimizer(model, config, device)
        ema = EMA(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.compile_mode = mode = resolve_compile_mode(config.train.compile_mode, device,
                                                        micro_batches=config.train.grad_accum_steps)
        self.step_fn = TrainStep(model, optimizer, config, device, precision, ema, scaler,
                                 forward=Forward(model, config.train.compile, mode=mode))
        self.eval_forward = Forward(model, config.train.compile, "evaluating",  # as `vit train` evaluates
                                    evaluation_compile_mode(mode))
        self.preprocess = Preprocess(config, device, train=True)
        self.preprocess.num_classes = self.num_classes
        self.eval_preprocess = Preprocess(config, device, train=False)
        size = config.image_size
        self.batch_size, self.eval_batch_size = config.train.batch_size, config.train.eval_batch_size
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (self.batch_size, channels, size, size), generator=g,
                                    dtype=torch.uint8).to(device)
        self.labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=g).to(device)
        self.eval_images = torch.randint(0, 256, (self.eval_batch_size, channels, size, size), generator=g,
                                         dtype=torch.uint8).to(device)
        self.i = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self, sync: bool = True) -> float:
        """One step; with `sync` (as `vit train`, which reads each step's loss) it waits for the device."""
        x, targets = self.preprocess(self.images, self.labels, self.i)
        loss, _ = self.step_fn(x, targets, self.config.train.lr, self.i)
        self.i += 1
        return float(loss) if sync else 0.0

    @torch.inference_mode()
    def infer(self) -> None:
        self.model.eval()
        x, _ = self.eval_preprocess(self.eval_images, None)
        with autocast(self.device, self.precision):
            out = self.eval_forward(x)
        float(out.float().sum())


def timed(fn, repeats: int) -> float:
    """Seconds per call, after the caller's warm-up."""
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def bench(config: Config, steps: int = 20, warmup: int = 5) -> dict[str, Any]:
    w = Workload(config)
    for _ in range(warmup):
        w.train_step()
    w.sync()
    train_seconds = timed(w.train_step, steps)
    for _ in range(2):
        w.infer()
    infer_seconds = timed(w.infer, max(3, steps // 2))
    flops = forward_flops(config, w.num_classes)
    train_ips = w.batch_size / train_seconds
    compiled = w.step_fn.forward.running_compiled  # what ran: False after a fallback
    return {
        "config": config.name,
        "device": str(w.device),
        "precision": w.precision,
        "attention": w.attention,
        "compile": compiled,
        "compile_mode": w.compile_mode if compiled else None,
        "batch_size": w.batch_size,
        "threads": torch.get_num_threads(),
        "train_images_per_second": train_ips,
        "infer_images_per_second": w.eval_batch_size / infer_seconds,
        "train_step_ms": 1000 * train_seconds,
        "train_gflops_per_second": 3 * flops * train_ips / 1e9,
        "forward_gflops_per_image": flops / 1e9,
        "parameters": sum(p.numel() for p in w.model.parameters()),
    }
