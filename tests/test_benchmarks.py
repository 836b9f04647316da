"""The benchmark compares vitcli with timm models of the same shape: check that they are the same model."""

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from vitcli.config import load_config
from vitcli.interop import from_peer
from vitcli.model import build_model

REPO = Path(__file__).resolve().parents[1]


def timm_epoch_module():
    spec = importlib.util.spec_from_file_location("timm_epoch", REPO / "benchmarks" / "timm_epoch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", ["conv", "conv, default widths", "linear"])
def test_the_benchmarks_timm_model_computes_the_recipes_model(shape):
    """benchmarks/timm_epoch.py's timm_vit (timm's VisionTransformer; with stem="conv" timm's HybridEmbed over
    Conv-BatchNorm-ReLU layers) and vitcli's model holding its weights give the same outputs, in evaluation and in
    training (batch statistics) with the same gradients: the same layers in the same order, the same convolutions,
    the same function, not only the same parameter count."""
    timm_vit = timm_epoch_module().timm_vit
    config = load_config(REPO / "configs" / "fashion_mnist.yaml")
    stem = shape.split(",")[0]
    if shape != "conv":  # the recipe's stem widths, no widths (ConvStem's defaults), timm's linear patch embedding
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, stem=stem, stem_channels=None))
    torch.manual_seed(0)
    peer = timm_vit(config, stem).eval()
    with torch.no_grad():  # random weights and BatchNorm statistics, so that every tensor matters
        for tensor in [*peer.parameters(), *peer.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if tensor.ndim == 1 else torch.randn_like(tensor) * 0.2)

    def in_vitclis_names(state: dict) -> dict:  # the hybrid stem's backbone.i -> stem.layers.i, proj -> the last
        state, stem_keys = dict(state), {}
        for key in list(state):
            found = re.match(r"patch_embed\.(backbone\.(\d+)|proj)\.(.+)$", key) if stem == "conv" else None
            if found:
                index = found.group(2) if found.group(2) is not None else len(peer.patch_embed.backbone)
                stem_keys[f"patch_embedding.stem.layers.{index}.{found.group(3)}"] = state.pop(key)
        return {**from_peer(state, "timm"), **stem_keys}

    ours = build_model(config, 10).eval()
    ours.load_state_dict(in_vitclis_names(peer.state_dict()), strict=True)  # every tensor, each shape

    def convolutions(module):
        return [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
                for m in module.modules() if isinstance(m, torch.nn.Conv2d)]

    if stem == "conv":
        assert convolutions(ours.patch_embedding) == convolutions(peer.patch_embed)
        assert len(convolutions(peer.patch_embed)) == len(config.model.stem_channels or [32, 64]) + 1  # (defaults)
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected, got = peer(images), ours(images)
    assert got.shape == (4, 10)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    peer.train(), ours.train()  # as the benchmark times them: BatchNorm on the batch's statistics
    expected, got = peer(images), ours(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    after = in_vitclis_names(peer.state_dict())  # BatchNorm's running statistics moved alike (momentum, counts)
    for key, value in ours.state_dict().items():
        if "running" in key or "num_batches" in key:
            torch.testing.assert_close(value, after[key], rtol=1e-4, atol=1e-5)
    (expected * torch.arange(10)).sum().backward()
    (got * torch.arange(10)).sum().backward()
    # the class token's gradient comes back through every block; the first layer's through the whole model
    first = ours.patch_embedding.stem.layers[0] if stem == "conv" else ours.patch_embedding.to_patch_embedding
    pairs = [(ours.patch_embedding.class_token.grad, peer.cls_token.grad),
             (first.weight.grad.flatten(), next(peer.patch_embed.parameters()).grad.flatten())]
    for got, expected in pairs:  # fp32 sums in other orders: within 0.1% of the gradient's largest entry
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
