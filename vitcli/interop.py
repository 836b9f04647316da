"""Weights in and out: timm / torchvision state dicts -> vitcli, and vitcli -> ONNX, TorchScript, safetensors."""

from __future__ import annotations

import math
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from vitcli.checkpoint import (atomic_write, check_finite, check_fit, check_torch_zip, load_checkpoint,
                               written_by_torch_save)
from vitcli.config import Config
from vitcli.errors import VitError, not_a_file, short


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pt/.pth (loaded weights_only; a {'state_dict': ...} or
    {'model': ...} wrapper is unwrapped)."""
    return load_weights_file(path)[0]


def load_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """read_state_dict's state dict, and whether the file was a vitcli checkpoint (its format marker)."""
    from vitcli.checkpoint import FORMAT

    path = Path(path)
    if not path.is_file():
        raise VitError(not_a_file(path, "weights file", "*.safetensors", "*.pth", "*.pt", "*.bin"))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), False
        except Exception as e:  # safetensors raises its own error types
            raise VitError(f"{path}: not a readable safetensors file ({e})") from None
    if not written_by_torch_save(path):
        raise VitError(f"{path} is not a weights file (not written by torch.save, nor .safetensors); pass the "
                       f".pt, .pth or .safetensors file of a timm or torchvision model")
    check_torch_zip(path, ", not a state dict; pass the .pt, .pth or .safetensors weights file it was made from",
                    "use another copy of the weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise VitError(f"refused to load {path}: it holds more than tensors and plain data, so it may run code; "
                       f"save the model's state_dict() alone and pass that") from None
    except Exception as e:  # torn zip files and the like
        reason = str(e).split(". This is an internal")[0]  # miniz's advice to file a bug is not for this case
        raise VitError(f"{path} is not a readable weights file (truncated or not a torch file: "
                       f"{short(reason) or type(e).__name__}); use another copy of the weights file") from None
    checkpoint = isinstance(state, dict) and state.get("format") == FORMAT
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}, checkpoint


def exported_config(path: str | Path) -> Optional[dict]:
    """The config (as a dict) that `vit export --format safetensors` put in a file's metadata; None for any other
    file."""
    import json

    if Path(path).suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        config = json.loads(metadata["config"]) if metadata.get("format") == "vitcli" else None
        return config if isinstance(config, dict) else None
    except Exception:  # not readable, no metadata: load_weights_file says what is wrong with it
        return None


def check_heads(saved: Optional[int], heads: int, whose: str) -> None:
    """model.heads is the one architecture choice the tensors' shapes do not show: vitcli weights of a model of
    other heads would load and split their attention into other heads, silently. `whose`: the weights, as in
    "X was trained with"."""
    if isinstance(saved, int) and saved != heads:
        raise VitError(f"{whose} model.heads={saved}, the config has {heads}: its attention weights would be split "
                       f"into other heads; set model.heads={saved}")


def check_exported_heads(path: str | Path, heads: int) -> None:
    """check_heads for a file `vit export --format safetensors` wrote (its metadata holds the config)."""
    saved = (exported_config(path) or {}).get("model", {}).get("heads")
    check_heads(saved, heads, f"{path} was exported from a model with")


def _renamed(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    return {_renamed(key, rules): value for key, value in state.items()}


TIMM_RULES = [
    (r"^cls_token$", "patch_embedding.class_token"),
    (r"^pos_embed$", "patch_embedding.position_embedding"),
    (r"^patch_embed\.proj\.", "patch_embedding.to_patch_embedding."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.blocks.\1.attention.to_qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.blocks.\1.attention.to_out."),
    (r"^blocks\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.", r"encoder.blocks.\1.\2."),
    (r"^norm\.", "encoder.norm."),
]

TORCHVISION_RULES = [
    (r"^class_token$", "patch_embedding.class_token"),
    (r"^encoder\.pos_embedding$", "patch_embedding.position_embedding"),
    (r"^conv_proj\.", "patch_embedding.to_patch_embedding."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"encoder.blocks.\1.norm1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"encoder.blocks.\1.norm2."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$",
     r"encoder.blocks.\1.attention.to_qkv.\2"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"encoder.blocks.\1.attention.to_out."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(0|linear_1)\.", r"encoder.blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(3|linear_2)\.", r"encoder.blocks.\1.mlp.fc2."),
    (r"^encoder\.ln\.", "encoder.norm."),
    (r"^heads\.head\.", "head."),
]


def weights_flavor(state: dict[str, torch.Tensor]) -> tuple[Optional[str], str]:
    """(vitcli, timm or torchvision, a key that says so) by the state dict's names; (None, "") where none fits."""
    marks = [("vitcli", lambda k: k.startswith("patch_embedding.")),
             ("timm", lambda k: k in ("cls_token", "pos_embed") or k.startswith(("patch_embed.", "blocks."))),
             ("torchvision", lambda k: k in ("class_token",) or k.startswith(("conv_proj.", "encoder.layers.")))]
    for flavor, fits in marks:
        key = next((k for k in state if fits(k)), None)
        if key is not None:
            return flavor, key
    return None, ""


def from_peer(state: dict[str, torch.Tensor], peer: str, source: str = "the weights") -> dict[str, torch.Tensor]:
    """A timm or torchvision ViT state dict in vitcli's names and layouts. The stride-p convolution of the patch
    embedding becomes the equivalent Linear on (channel, row, column)-flattened patches. A ViT variant that
    vitcli's model is not (check_variant) is one line naming `source`."""
    if peer == "vitcli":
        return dict(state)
    rules = {"timm": TIMM_RULES, "torchvision": TORCHVISION_RULES}.get(peer)
    if rules is None:
        raise VitError(f"unknown weights format '{peer}': use timm, torchvision or vitcli")
    check_variant(state, peer, source)
    out = _rename(state, rules)
    weight = out.get("patch_embedding.to_patch_embedding.weight")
    if weight is not None and weight.ndim == 4:
        out["patch_embedding.to_patch_embedding.weight"] = weight.reshape(weight.shape[0], -1)
    return out


def check_variant(state: dict[str, torch.Tensor], peer: str, source: str) -> None:
    """timm's and torchvision's ViTs take options that vitcli's classic ViT does not have; weights of such a variant
    are one line naming what it has (the shape or missing-tensor errors they gave pointed at config keys that could
    not help)."""
    keys = set(state)

    def any_key(pattern: str) -> bool:
        return any(re.search(pattern, key) for key in keys)

    tokens = state["pos_embed"].shape[-2] if peer == "timm" and "pos_embed" in keys else None
    found = {
        "timm": [
            (any_key(r"^fc_norm\."), "a LayerNorm before the head (fc_norm: global_pool='avg', or fc_norm=True)"),
            (any_key(r"^blocks\.\d+\.ls[12]\."), "layer scale (init_values)"),
            (any_key(r"^blocks\.\d+\.attn\.qkv\.weight$") and not any_key(r"^blocks\.\d+\.attn\.qkv\.bias$"),
             "no query/key/value bias (qkv_bias=False)"),
            (any_key(r"^blocks\.\d+\.attn\.[qk]_norm\."), "query/key normalisation (qk_norm=True)"),
            ("pos_embed" in keys and "cls_token" not in keys, "no class token (class_token=False)"),
            ("reg_token" in keys, "register tokens (reg_tokens)"),
            ("dist_token" in keys, "a distillation token (DeiT's distilled models)"),
            ("cls_token" in keys and tokens is not None and "dist_token" not in keys and "reg_token" not in keys
             and math.isqrt(tokens) ** 2 == tokens,
             "no positional embedding for the class token (no_embed_class=True; or a non-square patch grid)"),
            (any_key(r"^norm_pre\."), "a LayerNorm before the blocks (pre_norm=True)"),
        ],
        "torchvision": [
            (any_key(r"^heads\.pre_logits\."), "a pre-logits layer (representation_size)"),
            (any_key(r"^conv_proj\.conv_"), "a convolutional stem (conv_stem_configs)"),
        ],
    }.get(peer, [])
    what = [name for present, name in found if present]
    if what:
        raise VitError(f"{source}: a {peer} ViT with {' and '.join(what)}, which vitcli's ViT does not have (a class "
                       f"token with a positional embedding, query/key/value with biases, no layer scale: timm's and "
                       f"torchvision's plain vit_* models); use weights of such a model")


def file_names(state: dict[str, torch.Tensor], peer: str) -> dict[str, str]:
    """{vitcli name: the name in the file} for the keys from_peer(state, peer) renames, so that an error about a
    tensor can name it as the user's file does."""
    rules = {"timm": TIMM_RULES, "torchvision": TORCHVISION_RULES}.get(peer, [])
    renamed = {key: _renamed(key, rules) for key in state}
    return {new: key for key, new in renamed.items() if new != key}


def resize_position_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1+g*g, D) -> (1, 1+grid*grid, D): the patch part interpolated bicubically, as timm does."""
    class_pos, patch_pos = pos[:, :1], pos[:, 1:]
    old = int(round(patch_pos.shape[1] ** 0.5))
    if old * old != patch_pos.shape[1]:
        raise VitError(f"positional embedding {tuple(pos.shape)} is not a class token plus a square patch grid "
                       f"(a model without a class-token position?); vitcli cannot resize it")
    patch_pos = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patch_pos = torch.nn.functional.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False,
                                                antialias=True)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)
    return torch.cat([class_pos, patch_pos], dim=1)


def load_pretrained(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                    log: Callable[[str], None], names: Optional[dict[str, str]] = None) -> None:
    """Fine-tuning start: loads what fits; resizes positional embeddings to the model's patch grid; leaves the
    head freshly initialised when the number of classes differs. Says what it did. `names`: file_names, for errors."""
    own = model.state_dict()
    state = dict(state)
    pos_key = "patch_embedding.position_embedding"
    width_fits = pos_key not in state or state[pos_key].shape[-1] == own[pos_key].shape[-1]  # else: error below
    if pos_key in state and width_fits and state[pos_key].shape != own[pos_key].shape:
        before = tuple(state[pos_key].shape)
        grid = int(round((own[pos_key].shape[1] - 1) ** 0.5))
        state[pos_key] = resize_position_embedding(state[pos_key], grid)
        log(f"resized {pos_key} {before} -> {tuple(state[pos_key].shape)} (bicubic)")
    head = ("head.weight", "head.bias")
    reinit = []
    if not any(k in state for k in head):  # a backbone saved without its head (timm's num_classes=0)
        reinit = list(head)
        log(f"the weights have no classification head: started a new one of {len(own['head.bias'])} classes")
    elif width_fits and "head.weight" in state and state["head.weight"].shape[0] != own["head.weight"].shape[0]:
        reinit = [k for k in head if k in state]
        log(f"re-initialised the head: {len(own['head.bias'])} classes instead of the checkpoint's "
            f"{state['head.weight'].shape[0]}")
    for key in reinit:
        state.pop(key, None)
    check_fit(own, state, source, names if names is not None else {}, new=reinit)  # the config describes them
    model.load_state_dict(state, strict=False)
    log(f"loaded {len(state)} tensors from {source}")


# ------------------------------------------------------------------------------------------------- export


ONNX_ONE_FILE_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB, less room for the graph itself


def export(model: torch.nn.Module, config, classes: list[str], fmt: str, out: Path) -> float:
    """Writes the model; returns the max abs difference of its logits against PyTorch on a random batch.
    The file is made in memory and checked there (reloaded, run on the batch), then written atomically: a failed
    check or write leaves nothing at `out`."""
    import io
    import json

    from vitcli.config import DATASET_DEFAULTS

    model = model.float().eval()
    model.set_fused_attention(False)
    channels = DATASET_DEFAULTS[config.data.dataset]["channels"]
    size = config.image_size
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x)
    # what a user of the file needs beside it: the class names and the input's preprocessing, resolved (the config's
    # data.mean / std / image_size may be null: the dataset's defaults)
    if config.data.dataset == "imagefolder":  # as vit eval and vit predict see an image (data.imagefolder_eval_view)
        from vitcli.data import eval_resize

        view = {"resize_short_side": eval_resize(size), "center_crop": size}
        how = (f"the image's short side resized to resize_short_side ({eval_resize(size)}, bilinear with "
               f"antialiasing), then its centre image_size x image_size")
    else:
        view, how = {"resize": size}, "the image resized to image_size x image_size (bilinear)"
    info = {"format": "vitcli", "config": config.to_dict(), "classes": classes, "preprocessing": {
        "input": f"float32 N x C x H x W: {how}, pixel values / 255, minus mean, divided by std, per channel",
        "image_size": size, "channels": channels, **view, "mean": config.mean, "std": config.std}}
    # safetensors and ONNX hold text values: each a JSON text (the format's name as it is)
    metadata = {key: value if isinstance(value, str) else json.dumps(value) for key, value in info.items()}
    if fmt == "safetensors":
        from safetensors.torch import load, save

        data = save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata=metadata)
        reloaded = type(model)(**model.init_kwargs)
        reloaded.load_state_dict(load(data))
        with torch.inference_mode():
            got = reloaded.eval()(x)
    elif fmt == "torchscript":
        import warnings

        buffer = io.BytesIO()
        with warnings.catch_warnings(record=True) as caught:  # newer torch warns at each torch.jit call
            warnings.simplefilter("always", FutureWarning)
            torch.jit.save(torch.jit.trace(model, x[:1], check_trace=False), buffer,
                           _extra_files={"vitcli.json": json.dumps(info)})
            data = buffer.getvalue()
            with torch.inference_mode():
                got = torch.jit.load(io.BytesIO(data))(x)
        if any("deprecated" in str(w.message) for w in caught if issubclass(w.category, FutureWarning)):
            print(f"vit: note: torch {torch.__version__} deprecates TorchScript; the file works with it, but "
                  f"--format onnx (or safetensors) is the lasting choice", file=sys.stderr)
    elif fmt == "onnx":
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if weights > ONNX_ONE_FILE_LIMIT:  # protobuf cannot serialize it (found only after minutes of export)
            raise VitError(f"this model's weights take {weights / 2**30:.1f} GiB, over the 2 GB that ONNX holds in one "
                           f"file (protobuf's limit); use --format safetensors or torchscript (nothing was written)")
        data, got = _export_onnx(model, x, metadata)
    else:
        raise VitError(f"unknown export format '{fmt}': use onnx, torchscript or safetensors")
    diff = float((got - expected).abs().max())
    if not diff < 1e-3:
        raise VitError(f"the exported {fmt} model's logits differ from PyTorch's by {diff:.2e}; nothing written")
    atomic_write(out, lambda f: f.write(data), f"the {fmt} model", "free disk space or choose another --out")
    return diff


def _export_onnx(model, x: torch.Tensor, metadata: dict[str, str]) -> tuple[bytes, torch.Tensor]:
    """The ONNX model as bytes, one self-contained file (weights inside, no .data beside it), with `metadata` in its
    metadata_props, and its logits for x from onnxruntime."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 5):  # torch.onnx.export(dynamo=True, dynamic_shapes=...) arrived in 2.5
        raise VitError(f"ONNX export needs torch 2.5 or newer (this is {torch.__version__}): pip install -U torch; "
                       f"--format torchscript or safetensors work with this torch")
    try:  # torch.onnx imports the first two itself, inside the export
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        missing = f"{e.name} is missing" if e.name else f"cannot import: {short(str(e))}"
        raise VitError(f"ONNX export needs onnx, onnxscript and onnxruntime ({missing}): pip install onnx "
                       f"onnxscript onnxruntime (or --format torchscript / safetensors)") from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (x,), input_names=["images"], output_names=["logits"],
                                dynamic_shapes={"images": {0: batch}}, dynamo=True, verbose=False)
    proto = program.model_proto  # (a new proto at each access)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        data = proto.SerializeToString()
    except Exception as e:  # protobuf's EncodeError: near the 2 GB limit, the graph's own bytes on top
        raise VitError(f"the ONNX model could not be serialized ({type(e).__name__}: {e}); use --format "
                       f"safetensors or torchscript (nothing was written)") from None
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return data, torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def convert(weights: Path, from_: str, cfg, classes: Optional[str]) -> tuple[dict, int, str]:
    """`vit convert`: a timm / torchvision ViT state dict (or vitcli's exported safetensors) as a vitcli checkpoint
    of `cfg`'s model, with `classes` (comma-separated) or the dataset's. Returns the checkpoint, its parameter count
    and whose weights they were."""
    from vitcli.checkpoint import load_weights, make_checkpoint
    from vitcli.model import build_model
    from vitcli.runtime import check_model_fits

    raw, checkpoint = load_weights_file(weights)
    flavor, key = weights_flavor(raw)
    if flavor == "vitcli" and checkpoint:
        raise VitError(f"{weights} is a vitcli checkpoint already: nothing to convert; use it as --ckpt, or "
                       f"start a run from it with --set model.init_from={weights}")
    if flavor == "vitcli":  # vitcli's names (vit export --format safetensors): taken as they are
        check_exported_heads(weights, cfg.model.heads)
        print(f"vit: note: {weights} holds vitcli's own weight names ('{key}'): read as they are (--from {from_} "
              f"not applied)", file=sys.stderr)
    elif flavor is not None and flavor != from_:
        raise VitError(f"{weights} holds {flavor} weights ('{key}'), not {from_}'s; use --from {flavor}")
    peer = "vitcli" if flavor == "vitcli" else from_
    state, file_keys = from_peer(raw, peer, str(weights)), file_names(raw, peer)
    if "head.weight" not in state:
        raise VitError(f"{weights}: no classification head (head.weight) in the state dict, so no classes to "
                       f"predict (a backbone: timm's num_classes=0); fine-tune from it instead: vit train --config "
                       f"CONFIG --set model.init_from={weights} --set model.init_format={peer}")
    num_classes = state["head.weight"].shape[0]
    names = [name.strip() for name in classes.split(",")] if classes else default_classes(cfg, num_classes)
    if classes and (not all(names) or len(set(names)) < len(names)):
        raise VitError(f"--classes {classes!r}: each class needs a name of its own (empty or repeated names); "
                       f"give one comma-separated name per class, e.g. --classes cat,dog")
    if len(names) != num_classes:
        raise VitError(f"--classes has {len(names)} names, the head has {num_classes} outputs")
    check_model_fits(cfg, torch.device("cpu"), training=False)
    model = build_model(cfg, num_classes)
    load_weights(model, {k: v.float() for k, v in state.items()}, weights, file_keys)
    if peer != "vitcli":
        heads_note(cfg.model.dim, cfg.model.heads, str(weights))
    checkpoint = make_checkpoint(config=cfg, classes=names, model=model, ema=None, optimizer=None, scaler=None,
                                 epoch=0, step=0, global_step=0, best_top1=-1.0, epoch_stats={},
                                 metrics={"converted_from": f"{from_}:{weights}"})
    return checkpoint, sum(v.numel() for v in state.values()), "vitcli" if flavor == "vitcli" else from_


def heads_note(dim: int, heads: int, source: str) -> None:
    """A state dict does not record its head count, and weights split into other heads give other predictions
    without an error: a note where the config's model.heads is not timm's and torchvision's 64 dimensions per head."""
    if dim % 64 == 0 and heads != dim // 64:
        print(f"vit: note: {source} cannot say how many heads it was trained with; model.heads is {heads}, where "
              f"timm's and torchvision's ViTs of dim {dim} have {dim // 64} (64 per head): a wrong count gives wrong "
              f"predictions without an error", file=sys.stderr)


def default_classes(cfg, num_classes: int) -> list[str]:
    """The config's dataset's class names where they are known and as many as the head's outputs."""
    from vitcli.data import FASHION_MNIST_CLASSES, MNIST_CLASSES

    known = {"fashion_mnist": FASHION_MNIST_CLASSES, "mnist": MNIST_CLASSES}.get(cfg.data.dataset)
    if cfg.data.dataset == "cifar10":
        known = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    if cfg.data.dataset == "synthetic":
        known = [f"synthetic-{i}" for i in range(10)]
    # others (cifar100, image folders): placeholders, which vit eval replaces by the dataset's own names
    return list(known) if known and len(known) == num_classes else placeholder_classes(num_classes)


def placeholder_classes(n: int) -> list[str]:
    """The class names of converted weights whose dataset's names are not known: class_0, class_1, ..."""
    return [f"class_{i}" for i in range(n)]


# ---------------------------------------------------------------------------------------------- model.init_from


def check_init_from(config: Config) -> str:
    """model.init_from names a file (checked once before `--nproc` starts its processes, and by each of them);
    returns its path, '~' expanded."""
    source = config.model.init_from and os.path.expanduser(config.model.init_from)
    if source and not Path(source).is_file():
        what = "checkpoint" if config.model.init_format == "vitcli" else "weights file"
        raise VitError(f"model.init_from: {not_a_file(source, what, '*.pt', '*.pth', '*.safetensors', '*.bin')}")
    return source


def init_weights(model: torch.nn.Module, config: Config, verbose: bool) -> None:
    """model.init_from: start from a vitcli checkpoint or a timm / torchvision state dict."""
    source, fmt = check_init_from(config), config.model.init_format
    names = None  # the file's own tensor names, for its errors
    peer = fmt  # whose names the tensors have
    if source.endswith(".safetensors"):  # timm's, torchvision's or vitcli's own (vit export --format safetensors)
        check_exported_heads(source, config.model.heads)
        state = read_state_dict(source)
        flavor, key = weights_flavor(state)
        if fmt == "vitcli" and flavor in ("timm", "torchvision"):
            raise VitError(f"model.init_from {source} holds {flavor} weights ('{key}'); set "
                           f"model.init_format={flavor}")
        peer = "vitcli" if "vitcli" in (fmt, flavor) else fmt
        state, names = from_peer(state, peer, f"model.init_from {source}"), file_names(state, peer)
    elif fmt == "vitcli":
        ckpt = load_checkpoint(source, not_vitcli_advice="; for timm or torchvision weights set "
                                                         "model.init_format=timm (or torchvision)")
        state = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
        check_heads(ckpt["config"].model.heads, config.model.heads, f"model.init_from {source} was trained with")
    else:
        raw = read_state_dict(source)
        state, names = from_peer(raw, fmt, f"model.init_from {source}"), file_names(raw, fmt)
    check_finite(state, f"model.init_from {source}")
    if peer != "vitcli" and verbose:  # a peer's state dict, which holds no head count
        heads_note(config.model.dim, config.model.heads, f"model.init_from {source}")
    load_pretrained(model, {k: v.float() for k, v in state.items()}, source,
                    log=lambda m: print(f"vit: init_from: {m}", file=sys.stderr) if verbose else None, names=names)
