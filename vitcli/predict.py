"""Predictions for image files with a checkpoint's own preprocessing; safe, bounded image decoding."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from vitcli.data import IMAGE_EXTENSIONS, Preprocess, eval_resize, files_under, imagefolder_eval_view
from vitcli.errors import VitError, names_a_folder

IMAGE_SUFFIXES = IMAGE_EXTENSIONS  # what an image folder reads, predict reads


def open_image(path: str | Path):
    """Opens and decodes an image, refusing decompression bombs (more than PIL's MAX_IMAGE_PIXELS, ~89 Mpx)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        if path.exists():  # a FIFO, a device (/dev/null): there, but nothing to decode
            raise VitError(f"{path} is not a regular file; give an image file")
        raise VitError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise VitError(f"{path} is empty (0 bytes: a copy or download that did not finish?); give an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise VitError(f"{path}: image too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels); "
                       f"downscale it first") from None
    except UnidentifiedImageError:
        raise VitError(f"{path}: not an image PIL can read (PNG, JPEG, BMP, GIF, WebP, TIFF, ...)") from None
    except PermissionError:
        raise VitError(f"cannot read {path}: permission denied; check the file's permissions") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise VitError(f"{path}: cannot decode image ({e})") from None


def convert_image(image, mode: str):
    """The image in mode L or RGB. 16-bit and float images are scaled to 8 bits first (PIL's own conversion
    clips them, which turns most 16-bit images white); a mode that cannot be converted is a VitError."""
    import numpy as np
    from PIL import Image

    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)  # NaN pixels black, not a warning
        if image.mode.startswith("I;16") or 255 < array.max() <= 65535:
            array = array / 257
        elif image.mode == "F" and array.min() >= 0 and array.max() <= 1:
            array = array * 255
        image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), "L")
    try:
        return image.convert(mode)
    except (ValueError, OSError) as e:
        raise VitError(f"{getattr(image, 'filename', '') or 'image'}: cannot convert its {image.mode} pixels to "
                       f"{mode} ({e}); save it as an 8-bit RGB or grayscale image") from None


def is_attention_picture(path: Path) -> bool:
    """A picture `vit predict --attention` wrote (named *.attention.<ext> and carrying vit's mark): not an input
    when a folder is searched, so that a second run into the same folder reads the same images."""
    if ".attention." not in path.name:
        return False
    from vitcli.visualize import ATTENTION_MARK, carries_mark

    return carries_mark(path, ATTENTION_MARK)


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files as given; folders replaced by the images they hold (sorted), hidden folders and files (.git, .venv)
    and vit's own attention pictures left out. An empty path ('' would be the current folder) is refused. Returns
    the paths and a problem for each folder without images, which are the one error where nothing else was given
    (as a missing file, such a folder among others leaves the rest to be predicted)."""
    paths: list[Path] = []
    empty: list[str] = []
    for item in inputs:
        if not item.strip():
            raise VitError(f"an image path is empty ('{item}'); give image files or folders")
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in map(Path, files_under(path)) if p.suffix.lower() in IMAGE_SUFFIXES
                           and p.is_file() and not is_attention_picture(p))
            if not found:
                empty.append(f"no images in folder {path} (looked for {', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        else:
            paths.append(path)
    if empty and not paths:
        raise VitError("; ".join(empty))
    return paths, empty


def view_box(config, width: int, height: int) -> tuple[float, float, float, float]:
    """The part of a width x height image the model sees, (left, top, right, bottom) in the image's pixels: the
    centre crop of image folders (as image_to_tensor cuts it), the whole image otherwise."""
    if config.data.dataset != "imagefolder":
        return 0.0, 0.0, float(width), float(height)
    # where `vitcli.data.imagefolder_eval_view` cuts it, in torchvision's arithmetic: the short side resized to
    # size/0.875 (the long one truncated), then the centre size x size (offsets rounded)
    size, short = config.image_size, eval_resize(config.image_size)
    if width <= height:
        resized_w, resized_h = short, int(short * height / width)
    else:
        resized_w, resized_h = int(short * width / height), short
    left, top = int(round((resized_w - size) / 2)), int(round((resized_h - size) / 2))
    sx, sy = resized_w / width, resized_h / height
    return left / sx, top / sy, (left + size) / sx, (top + size) / sy


def image_to_tensor(image, config) -> torch.Tensor:
    """PIL image -> uint8 (C, H, W) as the checkpoint's evaluation saw its images: grayscale or RGB, resized to the
    model's size (image folders: `vit eval`'s own view, resize to size/0.875 then centre crop)."""
    import numpy as np
    from PIL import Image

    from vitcli.config import DATASET_DEFAULTS

    channels = DATASET_DEFAULTS[config.data.dataset]["channels"]
    image = convert_image(image, "L" if channels == 1 else "RGB")
    size = config.image_size
    if config.data.dataset == "imagefolder":  # exactly as `vit eval` sees its images
        return imagefolder_eval_view(size)(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@torch.inference_mode()
def predict(model, config, classes: list[str], images: torch.Tensor, device: torch.device, precision: str,
            top_k: int, hflip: bool = False) -> list[list[dict[str, Any]]]:
    """Top-k predictions, best first, for a uint8 batch (B, C, H, W); `hflip`: averaged with each mirror's."""
    from vitcli.evaluate import mirror_average
    from vitcli.runtime import autocast

    x, _ = Preprocess(config, device, train=False)(images.to(device), None)
    with autocast(device, precision):
        logits = model(x)
        mirrored = model(x.flip(-1)) if hflip else None
    probs = (logits.float() if mirrored is None else mirror_average(logits, mirrored)).softmax(dim=1)
    top = probs.topk(min(top_k, len(classes)), dim=1)
    return [[{"label": classes[i], "index": i, "probability": p} for p, i in zip(ps, idx)]
            for ps, idx in zip(top.values.tolist(), top.indices.tolist())]


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".tif", ".tiff", ".webp")


def attention_outputs(where: str, paths: list[Path]) -> dict[Path, Path]:
    """One image: OUT is the picture (a name without an extension gets .png, the file that will be written).
    Several images, or OUT ending in / or naming a folder: OUT is a folder holding <name>.attention.png for each
    (for several images, a new OUT with a picture's extension is refused: a folder named maps.png was a surprise).
    Refused before any work: a picture that would replace an input image, or a file that is not an attention
    picture vit wrote (their metadata says so: PNG, PDF, SVG), which is replaced as on a second run."""
    names = _attention_names(where, paths)
    inputs = {p.resolve() for p in paths}
    clash = [out for out in names.values() if out.resolve() in inputs]
    if clash:
        raise VitError(f"--attention would write over the input image {clash[0]}; choose another file or folder "
                       f"(nothing was written)")
    from vitcli.visualize import ATTENTION_MARK, carries_mark

    taken = [out for out in names.values() if os.path.lexists(out) and not carries_mark(out, ATTENTION_MARK)]
    if taken:
        raise VitError(f"--attention would write over {taken[0]}, which does not carry vit's mark of an attention "
                       f"picture (PNG, PDF and SVG ones get it); remove it or choose another file or folder (nothing "
                       f"was written)")
    return names


def _attention_names(where: str, paths: list[Path]) -> dict[Path, Path]:
    out = Path(where)
    if len(paths) == 1 and not names_a_folder(where):
        if not out.suffix:
            return {paths[0]: out.with_name(out.name + ".png")}
        if out.suffix.lower() not in PICTURE_SUFFIXES:
            raise VitError(f"--attention {where}: cannot write a {out.suffix} picture; give a file ending in "
                           f"{', '.join(PICTURE_SUFFIXES)}, or a folder (nothing was written)")
        return {paths[0]: out}
    if not names_a_folder(where) and out.suffix.lower() in PICTURE_SUFFIXES:  # it made a folder named maps.png
        raise VitError(f"--attention {where} names one picture, for {len(paths)} images; give a folder for their "
                       f"pictures, such as {out.with_suffix('')}/ (nothing was written)")
    names: dict[Path, Path] = {}
    taken: set[str] = set()
    for i, path in enumerate(paths):
        name = f"{path.stem}.attention.png"
        n = i
        while name in taken:  # the same name in two folders (or one image's fallback name another's own)
            name, n = f"{path.stem}-{n}.attention.png", n + 1
        taken.add(name)
        names[path] = out / name
    return names


ATTENTION_MAX_SIDE = 2048  # pixels: the longer side of the image in a `predict --attention` picture


def write_attention(model, config, tensor, device, mode: str, out: Path, original, best: dict) -> Path:
    """The image at its own size (at least 256 px) with the attention heat map and `best`, the prediction printed
    for it (so the picture agrees with the printed answer, --tta and precision included)."""
    import numpy as np
    import torch.nn.functional as F

    from vitcli.visualize import ATTENTION_MARK, attention_maps, overlay_figure, save_figure

    x, _ = Preprocess(config, device, train=False)(tensor[None].to(device), None)
    _, heat = attention_maps(model, x, mode)
    original = convert_image(original, "L" if tensor.shape[0] == 1 else "RGB")
    # the heat map covers what the model saw: image folders' centre crop, at the original's resolution
    left, top, right, bottom = view_box(config, *original.size)
    if (left, top, right, bottom) != (0, 0, *original.size):  # a pixel at least (a 1 px wide image's is 0.875)
        left, top = min(round(left), original.width - 1), min(round(top), original.height - 1)
        original = original.crop((left, top, max(round(right), left + 1), max(round(bottom), top + 1)))
    # drawn at the image's own size up to ATTENTION_MAX_SIDE: an 8000 px photo took 9 GB and 40 s, a 1 x 70000 strip
    # (the picture is a square of its longest side) ran out of memory in matplotlib
    original.thumbnail((ATTENTION_MAX_SIDE, ATTENTION_MAX_SIDE))
    image = np.asarray(original)
    heat = F.interpolate(heat[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    title = f"{best['label']} ({100 * best['probability']:.1f}%) - attention {mode}"
    try:
        save_figure(overlay_figure(image, heat.cpu().numpy(), title), out, ATTENTION_MARK,
                    "free disk space or choose another --attention path")
    except ValueError as e:  # a picture format matplotlib does not write (a failed write is save_figure's VitError)
        raise VitError(f"cannot write {out}: {e}; choose another --attention path") from None
    return out
