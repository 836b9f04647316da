"""evaluate(): the one evaluation, shared by training and `vit eval`."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from vitcli.errors import VitError, out_of_memory
from vitcli.runtime import Distributed, all_reduce_sum, autocast


def mirror_average(logits: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the log of the mean of the class probabilities of each image (`logits`) and of its
    horizontal mirror (`mirrored`). Log-probabilities are valid logits: softmax of them gives the averaged ones."""
    both = torch.stack([logits.float().log_softmax(dim=-1), mirrored.float().log_softmax(dim=-1)])
    return torch.logsumexp(both, dim=0) - math.log(2)


def listed_classes(names: list[str]) -> str:
    """'3: cat, dog, fox', the first five of many."""
    return f"{len(names)}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"


def unicode_note(a: list[str], b: list[str]) -> str:
    """Where two lists of folder names differ only in their Unicode form (macOS writes é as e + accent): said so,
    since both print alike."""
    import unicodedata

    def nfc(names: list[str]) -> list[str]:
        return sorted(unicodedata.normalize("NFC", name) for name in names)

    return (" (the same names in other Unicode forms, such as macOS's decomposed é: rename the folders so that "
            "they match byte for byte)") if a != b and nfc(a) == nfc(b) else ""


def check_same_classes(classes: list[str], trained: list[str], config, split: str) -> None:
    """`vit eval` on another dataset than the checkpoint's (another --data-root): one line listing both."""
    if classes == trained:
        return
    from vitcli.data import split_name

    where = "" if config.data.dataset == "synthetic" else f" in {config.data_root}"
    scored = split_name(split, config.data.dataset, config.data_root)
    read_test = config.data.dataset == "imagefolder" and scored == "test"
    val = " or --split val (its test/ folder was read)" if read_test else ""
    raise VitError(f"the {scored} split's classes{where} ({listed_classes(classes)}) are not the checkpoint's "
                   f"({listed_classes(trained)}){unicode_note(classes, trained)}; evaluate it on the data it was "
                   f"trained for (--data-root DIR: the folder of that dataset){val}")


@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches: Callable[[], Iterable], preprocess, classes: list[str],
             device: torch.device, precision: str, dist_info: Distributed = Distributed(),
             forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             on_batch: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]] = None,
             hflip: bool = False, fixed_batch: bool = False) -> dict[str, Any]:
    """Loss, top-1, top-5, per-class accuracy and the confusion matrix over all batches (and all ranks).
    `forward`: how to run the model (its compiled forward during training); the model itself by default.
    `on_batch(images, labels, logits)`: called with each uint8 batch and its float logits (`vit eval --report`
    collects its mistakes there, so the split is run through the model once).
    `hflip`: score each image by its and its mirror's averaged class probabilities (`mirror_average`); the
    result then also holds `top1_single_view`, the top-1 of the image alone, from the same pass.
    `fixed_batch`: a shorter batch (the split's last) is padded with blank images to the first batch's size and their
    outputs dropped, so that a compiled forward runs one static graph (each image's output is its own: the model
    mixes nothing across the batch in evaluation)."""
    model.eval()
    forward = forward or model
    k = len(classes)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    top5_hits = torch.zeros((), device=device, dtype=torch.float64)
    single_hits = torch.zeros((), device=device, dtype=torch.float64)  # with hflip: the unmirrored view alone
    confusion = torch.zeros(k * k, device=device, dtype=torch.float64)  # row: true class, column: predicted
    size = None  # the first batch's
    for images, labels in batches():
        x, labels = preprocess(images, labels)
        n = x.shape[0]
        size = size or n
        if fixed_batch and n < size:
            x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])
        with autocast(device, precision):
            logits = forward(x)[:n]
            mirrored = forward(x.flip(-1))[:n] if hflip else None
        if mirrored is not None:
            single_hits += (logits.float().topk(min(5, k), dim=1).indices[:, 0] == labels).sum()  # as without
            logits = mirror_average(logits, mirrored)
        logits = logits.float()
        if on_batch is not None:
            on_batch(images, labels, logits)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        top = logits.topk(min(5, k), dim=1).indices
        top5_hits += (top == labels[:, None]).any(dim=1).sum()
        confusion += torch.bincount(labels * k + top[:, 0], minlength=k * k)
    totals = all_reduce_sum(torch.cat([loss_sum[None], top5_hits[None], single_hits[None], confusion]),
                            dist_info).cpu()
    confusion = totals[3:].view(k, k).long()
    n = int(confusion.sum())
    per_class_total = confusion.sum(dim=1)
    per_class = (confusion.diagonal() / per_class_total.clamp(min=1)).tolist()
    return {
        "loss": float(totals[0]) / max(n, 1),
        "top1": float(confusion.diagonal().sum()) / max(n, 1),
        "top5": float(totals[1]) / max(n, 1),
        "num_samples": n,
        "per_class": {name: acc for name, acc, count in zip(classes, per_class, per_class_total.tolist())
                      if count > 0},
        "confusion": confusion.tolist(),
        **({"top1_single_view": float(totals[2]) / max(n, 1)} if hflip else {}),
    }


def largest_batch_that_fits(run: Callable[[int], dict[str, Any]], batch_size: int,
                            on_smaller: Callable[[int, int, str], None]) -> tuple[dict[str, Any], int]:
    """(run(size), size) for the largest of batch_size, batch_size / 2, ... down to 1 at which `run` does not run
    out of memory, as timm's validate.py retries; on_smaller(size, smaller, what) before each retry. Out of memory
    at batch 1, and any other error, is raised."""
    while True:
        try:
            return run(batch_size), batch_size
        except (RuntimeError, MemoryError) as e:
            what = out_of_memory(e)
            if what is None or batch_size == 1:
                raise
        # out of the except block: the failed pass's frames, and the tensors they hold, are gone
        smaller = batch_size // 2
        on_smaller(batch_size, smaller, what)
        batch_size = smaller
