"""The Vision Transformer, in the vocabulary of the ViT paper (Dosovitskiy et al., 2021).

image -> patches -> linear patch embedding -> [class token; patches] + positional embedding
      -> encoder: depth x Block(LayerNorm -> multi-head attention -> residual, LayerNorm -> MLP -> residual)
      -> final LayerNorm -> linear head on the class token.

No I/O and no config parsing here: the model takes explicit keyword arguments.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, except under torch.compile on a CPU, where the bias is added after the matmul: inductor then runs a
    plain matmul and adds the bias inside the next fused kernel, where F.linear's addmm first copies the broadcast
    bias into the whole output (compiled, on a 2-core Zen 5 CPU: cifar10.yaml train +4%, eval +20%; eager the
    separate add measured 2% slower, so eager stays F.linear)."""
    if bias is None or x.device.type != "cpu" or not torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    y = F.linear(x, weight)
    return y + bias.to(y.dtype)


class Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict) through `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """The sum over all processes; its gradient is the sum of every process's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _sum_moments(x: torch.Tensor) -> torch.Tensor:
    """Per channel: the sum and the sum of squares over every process's batch, then the number of values per
    channel; differentiable."""
    x = x.float()
    count = x.new_tensor([x.numel() / x.shape[1]])
    return _AllReduceSum.apply(torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count]))


_global_moments = _sum_moments  # what BatchNorm2d calls; prepare_compile() makes it run eagerly when compiled


def prepare_compile() -> None:
    """Called before torch.compile traces a model: the collective in _global_moments then runs eagerly (a graph
    break). Done here, not by decorating it at import, because torch.compiler.disable imports torch's compiler
    (~0.9 s), which evaluation, prediction and runs without train.compile never need."""
    global _global_moments
    if _global_moments is _sum_moments:  # once: a second wrapper would fail the guards of graphs traced with the first
        _global_moments = torch.compiler.disable(_sum_moments)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (the same parameters and state dict), except in training under torch.distributed with more
    than one process: there the batch statistics are the global batch's, all processes' images together, so N
    processes of B/N images train as one process of B does. torch's SyncBatchNorm does this on GPUs only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        moments = _global_moments(x)
        n = moments[2 * channels]
        mean = moments[:channels] / n
        var = (moments[channels:2 * channels] / n - mean * mean).clamp(min=0)  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), momentum)  # unbiased, as torch's
        shape = (1, channels, 1, 1)
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class ConvStem(nn.Module):
    """Optional convolutional stem (Xiao et al., 2021, "Early convolutions help transformers see better"):
    log2(patch_size) stride-2 3x3 convolutions with BatchNorm and ReLU, then a 1x1 convolution to `dim`.
    It produces the same patch grid as the linear patch embedding it replaces.

    `channels` gives each 3x3 convolution's width (default dim/4, dim/2 for patch 4: narrow, ~10% of the step);
    entries beyond the log2(patch_size) stride-2 ones add stride-1 3x3 convolutions on the patch grid."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, channels: Optional[Sequence[int]] = None):
        super().__init__()
        steps = patch_size.bit_length() - 1
        if patch_size < 2 or 2**steps != patch_size:
            raise ValueError(f"a convolutional stem needs a power-of-two patch_size, got {patch_size}")
        widths = list(channels) if channels else [max(dim // 2 ** (steps - i), 8) for i in range(steps)]
        if len(widths) < steps:
            raise ValueError(f"stem channels {widths}: patch_size {patch_size} needs at least {steps} entries")
        layers, width_in = [], in_channels
        for i, out in enumerate(widths):
            stride = 2 if i < steps else 1
            layers += [nn.Conv2d(width_in, out, 3, stride=stride, padding=1, bias=False), BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            width_in = out
        layers.append(nn.Conv2d(width_in, dim, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images).flatten(2).transpose(1, 2)  # (B, N, D)


class PatchEmbedding(nn.Module):
    """Cuts the image into patch_size x patch_size patches, projects each linearly to `dim`,
    prepends the class token and adds learnable positional embeddings. With stem="conv", a small convolutional
    stem makes the patch tokens instead of the linear projection."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int, dropout: float = 0.0,
                 stem: str = "linear", stem_channels: Optional[Sequence[int]] = None):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.stem = ConvStem(patch_size, in_channels, dim, stem_channels) if stem == "conv" else None
        # A Linear on the flattened (channel, row, column) patch: the same map as timm's and torchvision's
        # stride-p convolution, whose weight is this one reshaped to (dim, C, p, p).
        self.to_patch_embedding = None if self.stem else Linear(in_channels * patch_size * patch_size, dim)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        self.dropout = nn.Dropout(dropout)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        B, C, H, W = images.shape
        p = self.patch_size
        x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, gh, p, gw, p)
        x = x.permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
        return x.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C*p*p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(images)  # (B, N, D)
        else:
            x = self.to_patch_embedding(self.patchify(images))  # (B, N, D)
        class_token = self.class_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([class_token, x], dim=1)  # (B, 1+N, D)
        return self.dropout(x + self.position_embedding.to(x.dtype))


class Attention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(d)) V, then an output projection.

    The query, key and value projections are one Linear producing all three (one matmul instead of three).
    `fused=True` computes the same thing with torch's scaled_dot_product_attention; the explicit path is the
    one that can hand back its attention weights, and the faster one for bf16 training on CPU.
    """

    def __init__(self, dim: int, heads: int, attention_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.fused = False
        self.to_qkv = Linear(dim, 3 * dim)
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.to_out = Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False, class_token_only: bool = False):
        """(B, T, D) -> (B, T, D); with class_token_only the output of the class token alone, (B, 1, D): its
        query attends to every key, but no other token's query, output projection or attention row is computed."""
        if (self.fused and not return_attention) or torch.compiler.is_compiling():
            return self._all_heads(x, return_attention, class_token_only)
        H = self.heads
        # Eager: each head's query, key and value are column slices of the projection, (B, T, head_dim) with a row
        # stride of 3D, which the batched matmuls read in place: no copies into a (B, heads, T, head_dim) layout and
        # back (cifar10.yaml's 12 heads on a CPU: train +1-5%, eval +16-21%; README Performance).
        pieces = [p for t in self._project(x, class_token_only) for p in t.split(self.head_dim, dim=-1)]
        outputs, attentions = [], []
        for q, k, v in zip(pieces[:H], pieces[H:2 * H], pieces[2 * H:]):  # heads queries, heads keys, heads values
            attention = ((q * self.scale) @ k.transpose(1, 2)).softmax(dim=-1)  # (B, T_q, T)
            outputs.append(self.attention_dropout(attention) @ v)  # (B, T_q, head_dim)
            if return_attention:
                attentions.append(attention)
            # else gone before the next head's scores are made: in inference at most one head's scores and its
            # softmax are alive at a time, not every head's softmax (12 heads, batch 256, 197 tokens: 757 -> 454 MB)
            del attention
        x = self.dropout(self.to_out(torch.cat(outputs, dim=-1)))  # heads side by side: (B, T_q, D)
        return (x, torch.stack(attentions, dim=1)) if return_attention else x  # (B, heads, T_q, T)

    def _project(self, x: torch.Tensor, class_token_only: bool) -> tuple[torch.Tensor, ...]:
        """The query/key/value projection, [queries | keys | values] along the last dim: one (B, T, 3D) tensor, or
        with class_token_only the class token's queries (B, 1, D) and every token's keys and values (B, T, 2D)."""
        if not class_token_only:
            return (self.to_qkv(x),)
        D, w, b = x.shape[-1], self.to_qkv.weight, self.to_qkv.bias
        return linear(x[:, :1], w[:D], b[:D]), linear(x, w[D:], b[D:])

    def _all_heads(self, x: torch.Tensor, return_attention: bool = False, class_token_only: bool = False):
        """The same on (B, heads, T, head_dim) views of all heads at once: torch's scaled_dot_product_attention
        (`fused`), or the explicit formula under torch.compile, whose kernels absorb the layout copies (there the
        per-head slices above measured ~2% slower)."""
        B, D = x.shape[0], x.shape[-1]
        q, k, v = [h for t in self._project(x, class_token_only)  # each (B, heads, T or T_q, head_dim)
                   for h in t.reshape(B, t.shape[1], -1, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)]
        T_q = q.shape[2]
        attention = None
        if self.fused and not return_attention:
            p = self.attention_dropout.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            attention = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, T_q, T)
            x = self.attention_dropout(attention) @ v  # (B, heads, T_q, head_dim)
        x = self.dropout(self.to_out(x.transpose(1, 2).reshape(B, T_q, D)))
        return (x, attention) if return_attention else x


class MLP(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample during training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 attention_dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = Attention(dim, heads, attention_dropout=attention_dropout, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, return_attention: bool = False, class_token_only: bool = False):
        """With class_token_only, only the class token's output (B, 1, D), all tokens still attended to."""
        if return_attention:
            y, attention = self.attention(self.norm1(x), return_attention=True, class_token_only=class_token_only)
        else:
            y, attention = self.attention(self.norm1(x), class_token_only=class_token_only), None
        if class_token_only:
            x = x[:, :1]
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, attention) if return_attention else x


class Encoder(nn.Module):
    """`depth` blocks, then a final LayerNorm. Stochastic depth grows linearly to `drop_path` at the last block."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 attention_dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, dropout, attention_dropout, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, return_attention: bool = False, class_token_only: bool = False):
        """(B, T, D) -> (B, T, D), or (B, 1, D) with class_token_only: the last block then computes the class
        token alone, which is all a classifier reads. The same logits, ~1/depth less work (see VisionTransformer)."""
        attentions = []
        for i, block in enumerate(self.blocks):
            last_only = class_token_only and i == len(self.blocks) - 1
            if return_attention:
                x, attention = block(x, return_attention=True, class_token_only=last_only)
                attentions.append(attention)
            else:
                x = block(x, class_token_only=last_only)
        x = self.norm(x)
        return (x, attentions) if return_attention else x


class VisionTransformer(nn.Module):
    def __init__(self, *, image_size: int, patch_size: int, in_channels: int, num_classes: int, dim: int,
                 depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 attention_dropout: float = 0.0, drop_path: float = 0.0, stem: str = "linear",
                 stem_channels: Optional[Sequence[int]] = None):
        super().__init__()
        self.init_kwargs = dict(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                                num_classes=num_classes, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                                dropout=dropout, attention_dropout=attention_dropout, drop_path=drop_path,
                                stem=stem, stem_channels=list(stem_channels) if stem_channels else None)
        self.patch_embedding = PatchEmbedding(image_size, patch_size, in_channels, dim, dropout, stem,
                                              stem_channels)
        self.encoder = Encoder(dim, depth, heads, mlp_ratio, dropout, attention_dropout, drop_path)
        self.head = Linear(dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # timm's ViT initialisation: truncated normal(0.02) for linears and embeddings, zero biases.
        nn.init.trunc_normal_(self.patch_embedding.position_embedding, std=0.02)
        nn.init.trunc_normal_(self.patch_embedding.class_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # The patch embedding is initialised like a convolution (fan-in), as in the reference implementation;
        # a convolutional stem keeps PyTorch's own convolution initialisation.
        if self.patch_embedding.to_patch_embedding is not None:
            w = self.patch_embedding.to_patch_embedding.weight
            nn.init.uniform_(w, -1 / math.sqrt(w.shape[1]), 1 / math.sqrt(w.shape[1]))

    def channels_last_stem(self) -> "VisionTransformer":
        """For inference on a CPU: a conv stem's weights in channels-last memory format, so that oneDNN runs its
        convolutions in that layout (the logits agree to ~3e-7 in fp32). `vit eval` and `vit predict` do it on
        CPUs in fp32: on a 2-core Zen 3 VM `fashion_mnist.yaml`'s model evaluates 1.17x as fast (batch 512, eager)
        and the whole `vit eval` of its checkpoint takes 22.3 s against 24.5 s (benchmarks/NOTES.md item 30). Not in
        bf16, although the stem alone ran 1.79x as fast in inference there: its rounding would differ from the
        run's own (NCHW) evaluation by far more than 3e-7, whose figures `vit eval` is to reproduce (tests/test_cli.py
        checks top-1 exactly), and it was not measured end to end. Not for training (9% slower in bf16), not under
        torch.compile (no gain measured), not for exports (safetensors stores contiguous tensors only)."""
        if self.patch_embedding.stem is not None:
            self.patch_embedding.stem.to(memory_format=torch.channels_last)
        return self

    def set_fused_attention(self, fused: bool) -> None:
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused = fused

    def forward_features(self, images: torch.Tensor, return_attention: bool = False,
                         class_token_only: bool = False):
        """The final LayerNorm's output for every token, (B, 1+N, D); (B, 1, D) with class_token_only."""
        x = self.patch_embedding(images)
        return self.encoder(x, return_attention=return_attention, class_token_only=class_token_only)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0])  # the class token

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        """Logits (B, num_classes); with return_attention also the per-layer attention weights
        [(B, heads, 1+N, 1+N)] * depth.

        The head reads the class token alone, and in the last block nothing else depends on the other tokens'
        outputs: so the last block computes the class token's query, attention row, output projection and MLP
        only (keys and values still of every token). The logits and every gradient are those of the full
        computation (tests/test_model.py checks both); the step does ~1/depth less work. With return_attention
        the last block runs in full, so every layer's whole attention matrix comes back."""
        if return_attention:
            x, attentions = self.forward_features(images, return_attention=True)
            return self.forward_head(x), attentions
        return self.forward_head(self.forward_features(images, class_token_only=True))


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases, the class token and positional embeddings are not decayed (as in timm and the paper)."""
    return param.ndim <= 1 or name.endswith(("class_token", "position_embedding"))


def build_model(config, num_classes: int) -> VisionTransformer:
    """The ViT a `vitcli.config.Config` describes."""
    from vitcli.config import DATASET_DEFAULTS

    m = config.model
    return VisionTransformer(
        image_size=config.image_size, patch_size=m.patch_size,
        in_channels=DATASET_DEFAULTS[config.data.dataset]["channels"], num_classes=num_classes, dim=m.dim,
        depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio, dropout=m.dropout,
        attention_dropout=m.attention_dropout, drop_path=m.drop_path, stem=m.stem,
        stem_channels=m.stem_channels)
