import math

import pytest
import torch

from vitcli.model import Attention, VisionTransformer, no_weight_decay

SHAPES = [
    # image_size, patch, channels, dim, depth, heads, classes
    (32, 4, 3, 64, 2, 4, 10),
    (28, 7, 1, 32, 1, 2, 10),
    (28, 4, 1, 48, 3, 3, 7),
    (224, 16, 3, 64, 1, 8, 1000),
    (30, 5, 5, 40, 2, 5, 3),
]


@pytest.mark.parametrize("image_size,patch,channels,dim,depth,heads,classes", SHAPES)
def test_vit_shapes(image_size, patch, channels, dim, depth, heads, classes):
    model = VisionTransformer(image_size=image_size, patch_size=patch, in_channels=channels, num_classes=classes,
                              dim=dim, depth=depth, heads=heads)
    x = torch.randn(2, channels, image_size, image_size)
    logits, attentions = model(x, return_attention=True)
    tokens = (image_size // patch) ** 2 + 1
    assert logits.shape == (2, classes)
    assert len(attentions) == depth
    for a in attentions:
        assert a.shape == (2, heads, tokens, tokens)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, heads, tokens))
    model.set_fused_attention(True)  # the plain forward on the other attention path gives the same logits
    torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_conv_stem_makes_the_same_patch_grid(patch):
    model = VisionTransformer(image_size=32, patch_size=patch, in_channels=1, num_classes=10, dim=32, depth=1,
                              heads=2, stem="conv")
    tokens = model.patch_embedding(torch.randn(3, 1, 32, 32))
    assert tokens.shape == (3, (32 // patch) ** 2 + 1, 32)
    assert model.patch_embedding.to_patch_embedding is None


def test_conv_stem_widths_and_extra_stride_one_convolutions():
    model = VisionTransformer(image_size=28, patch_size=4, in_channels=1, num_classes=10, dim=32, depth=1,
                              heads=2, stem="conv", stem_channels=[8, 16, 24])
    convs = [m for m in model.patch_embedding.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [(8, 2), (16, 2), (24, 1), (32, 1)]
    assert model.patch_embedding(torch.randn(2, 1, 28, 28)).shape == (2, 7 * 7 + 1, 32)
    with pytest.raises(ValueError, match="at least 2 entries"):
        VisionTransformer(image_size=28, patch_size=4, in_channels=1, num_classes=10, dim=32, depth=1, heads=2,
                          stem="conv", stem_channels=[8])


@pytest.mark.parametrize("channels", [1, 3])
def test_a_channels_last_stem_predicts_as_before(channels):
    """vit eval and vit predict put a conv stem's weights in channels-last layout on CPUs in fp32: the same logits,
    the convolutions' outputs (and so oneDNN's kernels) in that layout; a linear-stem model is left as it is."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=28, patch_size=4, in_channels=channels, num_classes=10, dim=32, depth=2,
                              heads=2, stem="conv", stem_channels=[8, 16, 16]).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)  # statistics other than 0 and 1, as a trained model has
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, channels, 28, 28)
    convs = [m for m in model.patch_embedding.stem.modules() if isinstance(m, torch.nn.Conv2d)]

    def channels_last(w: torch.Tensor) -> bool:  # by the strides: a 1-channel or 1x1 weight is_contiguous() either way
        return w.stride(1) == 1 and w.stride(3) == w.shape[1]

    assert not any(channels_last(c.weight) for c in convs)
    with torch.inference_mode():
        before = model(x)
    assert model.channels_last_stem() is model  # as vit eval calls it: outside inference mode
    assert all(channels_last(c.weight) for c in convs)  # every convolution, the first and the 1x1 included
    with torch.inference_mode():
        assert model.patch_embedding.stem.layers[:-1](x).is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    linear = VisionTransformer(image_size=28, patch_size=4, in_channels=channels, num_classes=10, dim=32, depth=1,
                               heads=2)
    weights = {k: v.clone() for k, v in linear.state_dict().items()}
    linear.channels_last_stem()
    assert all(v.is_contiguous() and torch.equal(v, weights[k]) for k, v in linear.state_dict().items())


def test_attention_matches_plain_softmax_formula():
    torch.manual_seed(0)
    attn = Attention(dim=24, heads=3).eval()
    x = torch.randn(2, 5, 24)
    out, weights = attn(x, return_attention=True)
    # softmax(Q K^T / sqrt(d)) V, written out by hand from the same projection weights
    q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    split = lambda t: t.view(2, 5, 3, 8).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    expected_weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attn.to_out((expected_weights @ v).transpose(1, 2).reshape(2, 5, 24))
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("class_token_only", [False, True])
def test_per_head_slices_and_all_heads_at_once_agree(class_token_only):
    # eager runs the per-head slices, torch.compile the all-heads layout: the same attention and outputs
    torch.manual_seed(0)
    attn = Attention(dim=24, heads=3).eval()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    attn.double()
    out, weights = attn(x, return_attention=True, class_token_only=class_token_only)
    out_all, weights_all = attn._all_heads(x, return_attention=True, class_token_only=class_token_only)
    assert out.shape == (2, 1 if class_token_only else 5, 24) and weights.shape == (2, 3, out.shape[1], 5)
    torch.testing.assert_close(out, out_all)
    torch.testing.assert_close(weights, weights_all)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_fused_and_explicit_attention_agree(dtype, tol):
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, in_channels=3, num_classes=10, dim=32, depth=2, heads=4)
    x = torch.randn(4, 3, 16, 16)
    outputs, grads = [], []
    for fused in (False, True):
        model.set_fused_attention(fused)
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
        out.float().sum().backward()
        outputs.append(out.float())
        grads.append(model.encoder.blocks[0].attention.to_qkv.weight.grad.clone())
    torch.testing.assert_close(outputs[0], outputs[1], atol=tol, rtol=tol)
    torch.testing.assert_close(grads[0], grads[1], atol=tol, rtol=tol * 10)
    # element-wise tolerances can be of the gradients' own size in bf16: bound the relative error as a whole too
    assert grads[0].norm() > 0 and (grads[0] - grads[1]).norm() / grads[0].norm() < tol / 2


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("stem", ["linear", "conv"])
def test_class_token_only_last_block_gives_the_full_models_logits_and_gradients(fused, stem):
    # the plain forward computes only the class token in the last block; the full computation is
    # forward_features (every token) then the head on the class token: same logits, same gradients of every weight
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, in_channels=3, num_classes=10, dim=32, depth=3, heads=4,
                              stem=stem).double()
    model.set_fused_attention(fused)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    assert model.forward_features(x).shape == (4, 17, 32)
    assert model.forward_features(x, class_token_only=True).shape == (4, 1, 32)
    results = []
    for forward in (model, lambda images: model.forward_head(model.forward_features(images))):
        model.zero_grad()
        logits = forward(x)
        (logits.square().sum() + logits[:, 0].sum()).backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (fast, fast_grads), (full, full_grads) = results
    torch.testing.assert_close(fast, full, atol=1e-12, rtol=1e-10)
    assert len(fast_grads) == len(full_grads) and all(g.abs().sum() > 0 for g in full_grads[-6:])
    for a, b in zip(fast_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


def test_explicit_inference_keeps_one_heads_attention_matrix_at_a_time():
    """The eager per-head loop kept every head's softmax until the block's end: with 4 heads 8 (B, T, T) tensors
    were alive at once in inference, now the scores and softmax of one head. Counted as torch makes them."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    tokens = 17

    class LiveMatrices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.most = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[-2:] == (tokens, tokens):
                self.live = [ref for ref in self.live if ref() is not None] + [weakref.ref(out)]
                self.most = max(self.most, len(self.live))
            return out

    model = VisionTransformer(image_size=16, patch_size=4, in_channels=3, num_classes=10, dim=32, depth=2,
                              heads=4).eval()
    x = torch.randn(2, 3, 16, 16)
    counter = LiveMatrices()
    with torch.inference_mode(), counter:
        logits = model(x)
    assert counter.most == 2
    with torch.inference_mode():  # the attention maps are still handed back on request, every head's
        again, attentions = model(x, return_attention=True)
    torch.testing.assert_close(again, logits)
    assert [a.shape for a in attentions] == [(2, 4, tokens, tokens)] * 2


def test_fused_model_still_returns_attention():
    model = VisionTransformer(image_size=16, patch_size=4, in_channels=3, num_classes=10, dim=32, depth=2, heads=4)
    model.set_fused_attention(True)
    x = torch.randn(1, 3, 16, 16)
    logits, attentions = model(x, return_attention=True)
    assert len(attentions) == 2 and attentions[0].shape == (1, 4, 17, 17)
    model.set_fused_attention(False)  # the weights it hands back are the explicit path's, to float tolerance
    explicit_logits, explicit = model(x, return_attention=True)
    torch.testing.assert_close(logits, explicit_logits, atol=1e-5, rtol=1e-5)
    for fused, plain in zip(attentions, explicit):
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)


def test_patch_embedding_is_a_linear_map_of_each_patch():
    model = VisionTransformer(image_size=8, patch_size=4, in_channels=2, num_classes=3, dim=16, depth=1, heads=2)
    x = torch.randn(1, 2, 8, 8)
    patches = model.patch_embedding.patchify(x)
    assert patches.shape == (1, 4, 2 * 16)
    # patch 1 is the top-right 4x4 block of both channels, flattened as (channel, row, column)
    torch.testing.assert_close(patches[0, 1], x[0, :, 0:4, 4:8].reshape(-1))


def test_no_weight_decay_on_norms_biases_tokens():
    model = VisionTransformer(image_size=8, patch_size=4, in_channels=1, num_classes=3, dim=16, depth=1, heads=2)
    skipped = {n for n, p in model.named_parameters() if no_weight_decay(n, p)}
    assert "patch_embedding.class_token" in skipped
    assert "patch_embedding.position_embedding" in skipped
    assert "encoder.norm.weight" in skipped and "head.bias" in skipped
    assert "head.weight" not in skipped and "encoder.blocks.0.attention.to_qkv.weight" not in skipped


def test_test_time_flip_averages_the_probabilities_of_each_image_and_its_mirror():
    from vitcli.config import build_config
    from vitcli.data import Preprocess
    from vitcli.evaluate import evaluate, mirror_average
    from vitcli.predict import predict

    torch.manual_seed(0)
    config = build_config({"data": {"dataset": "synthetic", "image_size": 16},
                           "model": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}})
    model = VisionTransformer(image_size=16, patch_size=4, in_channels=3, num_classes=10, dim=32, depth=2,
                              heads=2).eval()
    logits, mirrored = torch.randn(6, 10), torch.randn(6, 10)
    averaged = (logits.softmax(-1) + mirrored.softmax(-1)) / 2
    torch.testing.assert_close(mirror_average(logits, mirrored).softmax(-1), averaged)
    torch.testing.assert_close(mirror_average(logits, mirrored).exp().sum(-1), torch.ones(6))

    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    classes = [str(i) for i in range(10)]
    cpu = torch.device("cpu")
    preprocess = Preprocess(config, cpu, train=False)
    with torch.no_grad():
        x, _ = preprocess(images, labels)
        probs = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
    # predict: the averaged distribution, as worked out above
    top = predict(model, config, classes, images[:3], cpu, "fp32", top_k=10, hflip=True)
    for row, p in zip(top, probs[:3]):
        torch.testing.assert_close(torch.tensor([e["probability"] for e in row]), p.sort(descending=True).values)
    # evaluate: top-1 and loss of the averaged distribution over all batches
    def batches():
        return [(images[:25], labels[:25]), (images[25:], labels[25:])]
    seen = []
    result = evaluate(model, batches, preprocess, classes, cpu, "fp32", hflip=True,
                      on_batch=lambda images, labels, logits: seen.append(logits))
    torch.testing.assert_close(torch.cat(seen).softmax(-1), probs)
    assert result["top1"] * 40 == pytest.approx(int((probs.argmax(-1) == labels).sum()))
    assert result["loss"] == pytest.approx(torch.nn.functional.nll_loss(probs.log(), labels).item(), rel=1e-5)
    plain = evaluate(model, batches, preprocess, classes, cpu, "fp32")
    assert plain["loss"] != pytest.approx(result["loss"], rel=1e-5)


def test_ema_follows_the_weights_and_the_batchnorm_statistics():
    """EMA of every floating-point weight and buffer (the conv stem's BatchNorm running statistics included),
    decay warmed up as (1+n)/(10+n), worked out here with the formula, over real AdamW steps."""
    from vitcli.step import EMA

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, in_channels=1, num_classes=3, dim=16, depth=1, heads=2,
                              stem="conv")
    ema = EMA(model, decay=0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for step in range(5):
        model.train()
        loss = model(torch.randn(8, 1, 16, 16)).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if k in expected:
                expected[k] = d * expected[k] + (1 - d) * v
    got = ema.module.state_dict()
    assert any("running_mean" in k for k in expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["head.weight"], model.state_dict()["head.weight"])  # an average, not a copy
    other = VisionTransformer(image_size=16, patch_size=4, in_channels=1, num_classes=3, dim=16, depth=1, heads=2,
                              stem="conv")
    ema.update(other, 10**6)  # another model object: its own tensors, not the first model's
    torch.testing.assert_close(ema.module.head.weight, 0.9 * expected["head.weight"] + 0.1 * other.head.weight.detach())


def test_compiled_models_take_the_all_heads_layout(monkeypatch):
    # under torch.compile the per-head slices measured slower: the module must route to _all_heads there
    calls = []
    original = Attention._all_heads

    def spy(self, *args, **kwargs):
        calls.append(torch.compiler.is_compiling())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Attention, "_all_heads", spy)
    model = VisionTransformer(image_size=8, patch_size=4, in_channels=1, num_classes=3, dim=16, depth=2, heads=2)
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    assert calls == []  # eager: per-head slices
    out = torch.compile(model, backend="eager")(x)  # dynamo traces the module; no C++ compiler needed
    assert calls == [True, True]
    torch.testing.assert_close(out, expected)


def test_attention_dropout_on_the_per_head_path():
    torch.manual_seed(0)
    attn = Attention(dim=16, heads=2, attention_dropout=0.5).train()
    x = torch.randn(3, 6, 16)
    out, weights = attn(x, return_attention=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 6))  # weights are returned before dropout
    assert not torch.allclose(out, attn(x))  # a new dropout mask each call
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))


@pytest.mark.parametrize("stem", ["linear", "conv"])
def test_compiled_linears_add_the_bias_after_the_matmul(stem):
    # under torch.compile on a CPU every linear layer must reach the graph as a matmul without bias plus an add
    # (inductor then fuses the add instead of addmm copying the bias), with the same results as eager F.linear
    linears = []

    def recording_backend(gm, example_inputs):
        linears.extend(n for n in gm.graph.nodes if n.target is torch._C._nn.linear)
        return gm.forward

    model = VisionTransformer(image_size=8, patch_size=4, in_channels=1, num_classes=3, dim=16, depth=2, heads=2,
                              stem=stem)
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    out = torch.compile(model, backend=recording_backend)(x)
    # qkv (split in two in the last block), output projection, fc1, fc2 per block, the head, and the linear stem
    assert len(linears) == 4 + 5 + 1 + (stem == "linear"), [n.args for n in linears]
    assert all(len(n.args) == 2 and n.kwargs.get("bias") is None for n in linears), [n.args for n in linears]
    torch.testing.assert_close(out, expected)
