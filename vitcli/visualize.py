"""Pictures of what the model sees: attention maps, confusion matrices, mistakes, positional embeddings.

Drawn with matplotlib (Agg, no screen needed), imported only here, so `vit --help` never pays for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch


def _plt():
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # class names in scripts the default font lacks (CJK): drawn as boxes, not also two warning lines per glyph
    warnings.filterwarnings("ignore", message="Glyph .* missing from (current )?font", category=UserWarning)
    return plt


def attention_rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): per layer, average the heads, add the residual (identity) and
    renormalise; multiply through the layers. Returns the class token's share of each patch, (B, N)."""
    T = attentions[0].shape[-1]
    eye = torch.eye(T, device=attentions[0].device)
    # The rollout is A_L @ ... @ A_1; only the class token's row is wanted, so the row is carried from the last
    # layer down (a vector-matrix product per layer) instead of multiplying T x T matrices.
    row = None
    for attention in reversed(attentions):
        a = attention.float().mean(dim=1) + eye  # (B, T, T)
        a = a / a.sum(dim=-1, keepdim=True)
        row = a[:, 0] if row is None else torch.bmm(row.unsqueeze(1), a).squeeze(1)
    return row[:, 1:]


def last_layer_attention(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """The class token's attention to each patch in the last layer, averaged over heads: (B, N)."""
    return attentions[-1].float().mean(dim=1)[:, 0, 1:]


def attention_maps(model, x: torch.Tensor, mode: str = "rollout") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, maps (B, grid, grid) scaled to [0, 1]) for a normalized batch, whatever attention the model uses
    for training: the explicit path is taken for this forward."""
    with torch.inference_mode():
        logits, attentions = model(x, return_attention=True)
    heat = attention_rollout(attentions) if mode == "rollout" else last_layer_attention(attentions)
    grid = int(round(heat.shape[1] ** 0.5))
    heat = heat.view(-1, grid, grid)
    low = heat.amin(dim=(1, 2), keepdim=True)
    high = heat.amax(dim=(1, 2), keepdim=True)
    return logits.float(), (heat - low) / (high - low).clamp(min=1e-12)


def overlay_figure(image: np.ndarray, heat: np.ndarray, title: str, min_size: int = 256):
    """The image with the heat map over it, at least the image's own size (and min_size pixels on a side)."""
    plt = _plt()
    h, w = image.shape[:2]
    side = max(min_size, h, w)
    dpi = 100
    fig = plt.figure(figsize=(side / dpi, (side + 28) / dpi), dpi=dpi)
    ax = fig.add_axes([0, 0, 1, side / (side + 28)])
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, extent=(0, w, h, 0), interpolation="bilinear")
    ax.imshow(heat, cmap="inferno", alpha=0.5, extent=(0, w, h, 0), interpolation="bilinear")
    ax.set_axis_off()
    fontsize = min(10.0, side / (0.8 * max(len(title), 1)))  # a character is ~0.8 pt wide per pt of size at 100 dpi
    fig.text(0.5, 1 - 14 / (side + 28), title, ha="center", va="center", fontsize=fontsize)
    return fig


ATTENTION_MARK = "vitcli attention map"  # in the metadata of the pictures `vit predict --attention` writes
MARK_KEYS = {".png": "Software", ".pdf": "Creator", ".svg": "Creator"}  # formats whose metadata is plain text


def save_figure(fig, path: Path, mark: Optional[str] = None,
                fix: str = "free disk space or choose another path") -> None:
    """`mark`: a text put in the picture's metadata (PNG, PDF, SVG), by which `carries_mark` knows it later; a
    failed write is one VitError that ends with `fix`."""
    from vitcli.checkpoint import atomic_write

    plt = _plt()
    key = MARK_KEYS.get(path.suffix.lower())
    fmt = path.suffix[1:].lower() or None  # a file object gives matplotlib no name to take the format from
    try:  # atomically: Ctrl-C half-way left a torn picture
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, metadata={key: mark} if mark and key else None),
                     "picture", fix)
    finally:
        plt.close(fig)


def carries_mark(path: Path, mark: str) -> bool:
    """Whether the file at `path` is a picture save_figure wrote with `mark`."""
    try:
        return path.is_file() and path.stat().st_size < 64 << 20 and mark.encode() in path.read_bytes()
    except OSError:
        return False


def figure_to_array(fig) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a figure, for TensorBoard."""
    plt = _plt()
    fig.canvas.draw()
    array = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return array


MAX_FIGURE_INCHES = 20.0  # 2000 px at 100 dpi: the side of the confusion matrix and the width of the per-class chart
MAX_NAMED_CLASSES = 60  # beyond, class names on the axes would overlap: class indices instead


def confusion_figure(confusion: np.ndarray, classes: list[str]):
    """Counts and row percentages; rows are true classes, columns predicted."""
    plt = _plt()
    k = len(classes)
    size = min(max(5.0, 0.6 * k + 2), MAX_FIGURE_INCHES)  # 1000 classes asked for a 60000 px square (17 GB)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    rows = confusion.sum(axis=1, keepdims=True).clip(min=1)
    share = confusion / rows
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if k <= MAX_NAMED_CLASSES:
        ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted" if k <= MAX_NAMED_CLASSES else "predicted (class index, sorted names)")
    ax.set_ylabel("true" if k <= MAX_NAMED_CLASSES else "true (class index)")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(j, i, f"{confusion[i, j]}\n{100 * share[i, j]:.0f}%", ha="center", va="center",
                            fontsize=6, color="white" if share[i, j] > 0.5 else "black")
    accuracy = np.trace(confusion) / max(confusion.sum(), 1)
    ax.set_title(f"confusion matrix: top-1 {100 * accuracy:.2f}% of {confusion.sum()} images")
    fig.tight_layout()
    return fig


def per_class_figure(per_class: dict[str, float]):
    plt = _plt()
    names = list(per_class)
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.5 * len(names) + 2), MAX_FIGURE_INCHES), 4), dpi=100)
    values = [100 * per_class[n] for n in names]
    bars = ax.bar(range(len(names)), values, color="tab:blue")
    if len(names) <= MAX_NAMED_CLASSES:
        ax.bar_label(bars, [f"{v:.1f}" for v in values], fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    else:
        ax.set_xlabel("class (index, sorted names; report.json has each by name)")
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("per-class accuracy")
    fig.tight_layout()
    return fig


def mistakes_figure(images: list[np.ndarray], captions: list[str], columns: int = 4):
    plt = _plt()
    n = max(len(images), 1)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(caption, fontsize=7)
    if not images:  # a blank picture looked like a failed one
        fig.text(0.5, 0.5, "no mistakes: every image was classified correctly", ha="center", va="center")
    fig.suptitle("most confident mistakes", fontsize=10)
    fig.tight_layout()
    return fig


def position_similarity_mosaic(position_embedding: torch.Tensor, most: int = 16) -> tuple[np.ndarray, int]:
    """The cosine similarity of each shown patch's positional embedding with all others, as one (H, W) array: a
    (grid, grid) map per patch, laid out on the patch grid with a one-pixel NaN gap between maps. Grids wider than
    `most` show `most` evenly spaced rows and columns of patches (a 64x64 grid would be 4096 maps). Also returns the
    number of maps per side."""
    pos = position_embedding[0, 1:].float()  # (N, D), without the class token
    grid = int(round(pos.shape[0] ** 0.5))
    pos = torch.nn.functional.normalize(pos, dim=1)
    similarity = (pos @ pos.T).view(grid, grid, grid, grid).cpu()  # (row, column, row, column)
    shown = torch.linspace(0, grid - 1, min(grid, most)).round().long()
    n = len(shown)
    maps = torch.nn.functional.pad(similarity[shown][:, shown], (0, 1, 0, 1), value=float("nan"))  # (n, n, g+1, g+1)
    side = n * (grid + 1) - 1  # without the gap after the last map
    return maps.permute(0, 2, 1, 3).reshape(n * (grid + 1), n * (grid + 1))[:side, :side].numpy(), n


def position_similarity_figure(position_embedding: torch.Tensor, title_px: int = 24):
    """The ViT paper's figure: cosine similarity of each patch's positional embedding with all others, one small
    map per patch, laid out on the patch grid; drawn as one image (one axis per patch took 70 s at 64x64 patches),
    at a whole number of screen pixels per map pixel (at least ~480 px across), so that no gap or row is lost."""
    plt = _plt()
    mosaic, n = position_similarity_mosaic(position_embedding)
    grid = int(round((position_embedding.shape[1] - 1) ** 0.5))
    side = mosaic.shape[0] * max(1, -(-480 // mosaic.shape[0]))  # pixels
    fig = plt.figure(figsize=(side / 100, (side + title_px) / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, side / (side + title_px)))
    ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")  # NaN gaps: blank
    ax.set_axis_off()
    every = "" if n == grid else f" ({n}x{n} of the {grid}x{grid} patches, evenly spaced)"
    fig.suptitle(f"positional embedding similarity{every}", fontsize=9, y=1 - 4 / (side + title_px), va="top")
    return fig


def to_display(images: torch.Tensor) -> list[np.ndarray]:
    """uint8 (B, C, H, W) -> list of (H, W) or (H, W, 3) arrays."""
    out = []
    for image in images.cpu():
        array = image.permute(1, 2, 0).numpy()
        out.append(array[..., 0] if array.shape[-1] == 1 else array)
    return out


class Mistakes:
    """The `top` most confident mistakes, gathered batch by batch as `evaluate(..., on_batch=...)` goes: only those
    images are kept, so memory stays bounded whatever the split's size."""

    def __init__(self, top: int = 16):
        self.top = top
        self.worst: list[tuple[float, int, int, int]] = []  # (confidence, index, true, predicted)
        self.kept: dict[int, torch.Tensor] = {}  # index -> its uint8 image
        self.seen = 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        conf, pred = logits.float().softmax(dim=1).max(dim=1)
        for i in (pred != labels).nonzero().flatten().tolist():
            self.worst.append((float(conf[i]), self.seen + i, int(labels[i]), int(pred[i])))
            self.kept[self.seen + i] = images[i].cpu()
        self.worst = sorted(self.worst, reverse=True)[:self.top]
        self.kept = {w[1]: self.kept[w[1]] for w in self.worst}
        self.seen += len(labels)


REPORT_FILES = ("confusion_matrix.png", "per_class_accuracy.png", "mistakes.png", "report.json")


REPORT_MARK = "vitcli eval report"  # in the metadata of the report's pictures


def check_report_folder(report: Path) -> None:
    """Before `vit eval --report` evaluates: the folder can be written and holds no file the report would replace
    but did not write (one line, nothing written)."""
    from vitcli.checkpoint import check_writable
    from vitcli.errors import VitError
    from vitcli.predict import PICTURE_SUFFIXES

    if report.exists() and not report.is_dir():
        raise VitError(f"--report {report} is a file; give a folder for the report (nothing was written)")
    if not report.exists() and report.suffix.lower() in (*PICTURE_SUFFIXES, ".json"):
        raise VitError(f"--report {report}: a folder for the report's files ({', '.join(REPORT_FILES)}), not one "
                       f"file; give a folder, such as {report.with_suffix('')}/ (nothing was written)")
    clash = report_clash(report) if report.is_dir() else []
    if clash:
        raise VitError(f"--report {report} already holds {', '.join(clash)}, not a report of vit eval; give a new "
                       f"or empty folder (nothing was written)")
    check_writable(report, f"the report to --report {report}", "choose another --report folder")


def report_clash(out_dir: Path) -> list[str]:
    """The report's file names already in `out_dir` that vit eval did not write: a new report replaces an earlier
    one's files (its report.json says written_by vit eval, its pictures carry REPORT_MARK), nothing else."""
    import json

    summary = out_dir / "report.json"
    try:
        earlier = json.loads(summary.read_text()).get("written_by") == "vit eval"
    except (OSError, ValueError, AttributeError):
        earlier = False
    clash = []
    for name in REPORT_FILES:
        path = out_dir / name
        if not os.path.lexists(path):
            continue
        if name == "report.json":
            ours = earlier
        else:  # marked; or unmarked (vitcli before the mark) and written just before the report.json it goes with
            ours = carries_mark(path, REPORT_MARK) or (
                earlier and path.is_file() and 0 <= summary.stat().st_mtime - path.stat().st_mtime <= 60)
        if not ours:
            clash.append(name)
    return clash


def eval_report(classes: list[str], result: dict, mistakes: Mistakes, out_dir: Path) -> list[Path]:
    """Confusion matrix, per-class accuracy and the most confident mistakes as PNGs, and the numbers as JSON."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    confusion = np.array(result["confusion"])
    written = [out_dir / name for name in REPORT_FILES]
    fix = "free disk space or choose another --report folder"
    save_figure(confusion_figure(confusion, classes), written[0], REPORT_MARK, fix)
    save_figure(per_class_figure(result["per_class"]), written[1], REPORT_MARK, fix)
    worst = mistakes.worst
    pictures = to_display(torch.stack([mistakes.kept[w[1]] for w in worst])) if worst else []
    captions = [f"true {classes[t]}\npredicted {classes[p]} ({100 * c:.0f}%)" for c, _, t, p in worst]
    save_figure(mistakes_figure(pictures, captions), written[2], REPORT_MARK, fix)
    report = {"written_by": "vit eval", **result}
    report["classes"] = classes
    report["most_confident_mistakes"] = [{"index": i, "true": classes[t], "predicted": classes[p],
                                          "confidence": c} for c, i, t, p in worst]
    written[3].write_text(json.dumps(report, indent=1))
    return written


def attention_overlay_arrays(model, config, classes: list[str], images: torch.Tensor, device: torch.device,
                             mode: str = "rollout", labels: Optional[torch.Tensor] = None) -> list[np.ndarray]:
    """Overlays (RGB arrays) for a few uint8 images, for TensorBoard."""
    from vitcli.data import Preprocess

    x, _ = Preprocess(config, device, train=False)(images.to(device), None)
    logits, heat = attention_maps(model, x, mode)
    out = []
    for i, (image, h) in enumerate(zip(to_display(images), heat.cpu().numpy())):
        title = classes[int(logits[i].argmax())]
        if labels is not None:
            title = f"{title} (true {classes[int(labels[i])]})"
        out.append(figure_to_array(overlay_figure(image, h, title, min_size=160)))
    return out
