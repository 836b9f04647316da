"""The exact training step that `vit train` and `vit bench` both run: the optimizer, the weights' EMA, forward
through torch.compile with an eager fallback, loss, backward and update."""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from vitcli.config import Config
from vitcli.errors import out_of_memory, short
from vitcli.model import no_weight_decay, prepare_compile
from vitcli.runtime import CUDA_GRAPH_MODES, autocast


def make_optimizer(model: torch.nn.Module, config: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases, class token and positional embeddings. The fused kernel runs
    on CPU and CUDA and measured ~2% faster than the foreach one here."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=config.train.lr, betas=(0.9, 0.999), fused=fused)


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay (1+n)/(10+n)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs: Optional[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = None

    def _tensors(self, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The floating-point tensors of the EMA copy and of `model`, paired in state_dict order. Built once
        per model: they share storage with the weights and buffers, which the optimizer and BatchNorm update in
        place (a state_dict() per step costs ~200 tensor views, a noticeable share of a small model's GPU step)."""
        if self._pairs is None or self._pairs[0] != id(model):
            ema = self.module.state_dict().values()
            live = model.state_dict().values()
            floats = [(e, p) for e, p in zip(ema, live) if e.dtype.is_floating_point]
            self._pairs = (id(model), [e for e, _ in floats], [p for _, p in floats])
        return self._pairs[1], self._pairs[2]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema, live = self._tensors(model)
        torch._foreach_lerp_(ema, live, 1 - decay)


class TrainStep:
    """Forward, loss, backward, gradient clipping, optimizer step and EMA update for one batch; with
    train.grad_accum_steps N the batch runs as N micro-batches, one after another, whose gradients add up to the
    batch's before the one optimizer step (under DDP the ranks exchange them once, after the last)."""

    def __init__(self, model, optimizer, config: Config, device: torch.device, precision: str,
                 ema: Optional[EMA] = None, scaler=None, forward: Optional["Forward"] = None):
        self.model, self.optimizer, self.config = model, optimizer, config
        self.device, self.precision, self.ema, self.scaler = device, precision, ema, scaler
        self.forward = forward if forward is not None else Forward(model, compile=False)

    def __call__(self, x: torch.Tensor, targets: torch.Tensor, lr: float, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, logits) of the batch, detached."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts = min(self.config.train.grad_accum_steps, len(x))
        if parts == 1:
            loss, logits = self._backward(x, targets, 1.0)
        else:
            losses, outputs = [], []
            ddp = self.forward.module if isinstance(self.forward.module, DistributedDataParallel) else None
            for i, (xs, ts) in enumerate(zip(x.tensor_split(parts), targets.tensor_split(parts))):
                last = i == parts - 1
                with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                    part_loss, part_logits = self._backward(xs, ts, len(xs) / len(x))
                losses.append(part_loss * (len(xs) / len(x)))
                outputs.append(part_logits)  # (never CUDA graphs' outputs: resolve_compile_mode)
            loss, logits = torch.stack(losses).sum(), torch.cat(outputs)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step)
        return loss, logits

    def _backward(self, x: torch.Tensor, targets: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of (part of) the batch, its loss weighted by `share`, the part's share of the
        images; its (loss, logits), detached."""
        with autocast(self.device, self.precision):
            logits = self.forward(x)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.config.train.label_smoothing)
        scaled = loss if share == 1.0 else loss * share
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach(), logits.detach()


class Forward:
    """A module's forward through torch.compile where that works; where compiling fails (no C++ compiler, an
    unsupported op) it says so once and runs the module eagerly from then on."""

    def __init__(self, module: torch.nn.Module, compile: bool, doing: str = "training", mode: str = "default"):
        self.module, self.doing = module, doing
        self.compiled = maybe_compile(module, compile, doing, mode)
        self.graph_mode = mode in CUDA_GRAPH_MODES and next(module.parameters()).device.type == "cuda"

    @property
    def running_compiled(self) -> bool:
        """Whether calls run the compiled module (False when compile is off, or after an eager fallback)."""
        return self.compiled is not self.module

    @property
    def graphs(self) -> bool:
        """Whether calls replay CUDA graphs (torch.compile's reduce-overhead): each training step starts a new replay
        generation, whose outputs may reuse the memory of the previous step's."""
        return self.graph_mode and self.running_compiled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is self.module:
            return self.module(x)
        try:
            if self.graph_mode:  # (running compiled here)
                torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(x)
        except Exception as e:  # torch.compile fails in many ways (no compiler, unsupported op): run eager
            if out_of_memory(e):  # not compile's fault: the caller reports it, and compile stays on
                raise
            print(f"\nvit: torch.compile failed ({type(e).__name__}: {short(str(e), 120)}); "
                  f"{self.doing} eagerly instead", file=sys.stderr)
            self.compiled = self.module
            return self.module(x)


def maybe_compile(model: torch.nn.Module, enabled: bool, doing: str = "training", mode: str = "default"):
    if not enabled:
        return model
    if sys.version_info >= (3, 14) or not hasattr(torch, "compile"):
        print(f"vit: torch.compile is not available here; {doing} eagerly", file=sys.stderr)
        return model
    prepare_compile()
    if not torch.cuda.is_available():
        # inductor's C++ build imports torch.utils.cpp_extension, which warns "No CUDA runtime is found, using
        # CUDA_HOME=..." on every machine without a GPU, across the progress bar: nothing a CPU run can act on
        # (its other warnings, about the C++ compiler, stay)
        cpp_extension = logging.getLogger("torch.utils.cpp_extension")
        if _not_the_cuda_runtime_note not in cpp_extension.filters:
            cpp_extension.addFilter(_not_the_cuda_runtime_note)
    # static graphs, even where dynamo has seen this model code at another batch size first (the evaluation after
    # the training; a resumed run that evaluates before it trains; other models in a benchmark's process): the
    # training step's batches all have one size (micro-batches two, each its graph, where train.grad_accum_steps
    # does not divide the batch), and the evaluation pads its last, shorter batch (fixed_batch)
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def _not_the_cuda_runtime_note(record: logging.LogRecord) -> bool:
    return "No CUDA runtime is found" not in record.getMessage()
