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


@pytest.mark.parametrize("stem", ["conv", "linear"])
def test_the_benchmarks_timm_model_computes_the_recipes_model(stem):
    """benchmarks/timm_epoch.py's timm_vit (timm's VisionTransformer; with stem="conv" timm's HybridEmbed over
    Conv-BatchNorm-ReLU layers) given vitcli's weights gives vitcli's outputs: the same layers in the same order,
    the same convolutions, the same function, not only the same parameter count."""
    timm_vit = timm_epoch_module().timm_vit
    config = load_config(REPO / "configs" / "fashion_mnist.yaml")
    if stem == "linear":
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, stem="linear",
                                                                       stem_channels=None))
    torch.manual_seed(0)
    peer = timm_vit(config, stem).eval()
    with torch.no_grad():  # random weights and BatchNorm statistics, so that every tensor matters
        for tensor in [*peer.parameters(), *peer.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if tensor.ndim == 1 else torch.randn_like(tensor) * 0.2)
    state = peer.state_dict()
    layers = len(peer.patch_embed.backbone) if stem == "conv" else 0
    stem_keys = {}
    for key in list(state):  # the hybrid stem's names in vitcli's: backbone.i -> stem.layers.i, proj -> the last
        found = re.match(r"patch_embed\.(backbone\.(\d+)|proj)\.(.+)$", key) if stem == "conv" else None
        if found:
            index = found.group(2) if found.group(2) is not None else layers
            stem_keys[f"patch_embedding.stem.layers.{index}.{found.group(3)}"] = state.pop(key)
    ours = build_model(config, 10).eval()
    ours.load_state_dict({**from_peer(state, "timm"), **stem_keys}, strict=True)  # every tensor, each shape

    def convolutions(module):
        return [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
                for m in module.modules() if isinstance(m, torch.nn.Conv2d)]

    if stem == "conv":
        assert convolutions(ours.patch_embedding) == convolutions(peer.patch_embed)
        assert len(convolutions(peer.patch_embed)) == len(config.model.stem_channels) + 1
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected, got = peer(images), ours(images)
    assert got.shape == (4, 10)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
