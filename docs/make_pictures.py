"""Remake the README's example pictures from a real Fashion-MNIST run.

    python docs/make_pictures.py RUN_DIR      (a finished `vit train --config configs/fashion_mnist.yaml` run)

Runs the documented commands on RUN_DIR/best.pt (`vit predict --attention`, `vit eval --report`) and copies the
TensorBoard pictures of the run (augmented batch, attention overlays, confusion matrix, positional-embedding
similarity) out of its event file, all into docs/.
"""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DOCS = Path(__file__).resolve().parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TB_TAGS = {"train/augmented_batch": "tb_augmented_batch.png", "val/attention_rollout": "tb_attention_rollout.png",
           "val/confusion_matrix": "tb_confusion_matrix.png",
           "model/position_embedding_similarity": "tb_position_similarity.png"}


def fmnist_test_images(indices: list[int]) -> list[np.ndarray]:
    raw = gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz").read()
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    return [images[i] for i in indices]


def fmnist_test_labels(count: int) -> list[int]:
    return list(gzip.open(FMNIST / "t10k-labels-idx1-ubyte.gz").read()[8:8 + count])


def attention_strip(ckpt: Path) -> np.ndarray:
    """TensorBoard's attention strip (the first 8 test images, as training watches them), from best.pt: the
    same picture as the run's last one, redrawn so that its titles use the current layout."""
    import torch

    from vitcli.checkpoint import load_checkpoint, model_from_checkpoint
    from vitcli.visualize import attention_overlay_arrays

    checkpoint = load_checkpoint(ckpt)
    model = model_from_checkpoint(checkpoint, ckpt)
    images = torch.from_numpy(np.stack(fmnist_test_images(list(range(8)))))[:, None]
    overlays = attention_overlay_arrays(model, checkpoint["config"], checkpoint["classes"], images,
                                        torch.device("cpu"), labels=torch.tensor(fmnist_test_labels(8)))
    return np.concatenate(overlays, axis=1)


def vit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vitcli", *args], check=True)


def main() -> None:
    run_dir = Path(sys.argv[1])
    ckpt = run_dir / "best.pt"
    with tempfile.TemporaryDirectory() as tmp:  # made there, copied into docs/ once all commands succeeded
        tmp = Path(tmp)
        for name, image in zip(["ankle_boot", "pullover"], fmnist_test_images([0, 1])):
            Image.fromarray(image).save(tmp / f"{name}.png")
        vit("predict", str(tmp / "ankle_boot.png"), "--ckpt", str(ckpt),
            "--attention", str(tmp / "attention_rollout.png"))
        vit("predict", str(tmp / "pullover.png"), "--ckpt", str(ckpt), "--attention", str(tmp / "attention_last.png"),
            "--attention-mode", "last")
        vit("eval", "--ckpt", str(ckpt), "--report", str(tmp / "report"))
        for name in ["ankle_boot.png", "attention_rollout.png", "attention_last.png"]:
            shutil.copy(tmp / name, DOCS / name)
        for name in ["confusion_matrix.png", "per_class_accuracy.png", "mistakes.png"]:
            shutil.copy(tmp / "report" / name, DOCS / name)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    for tag, name in TB_TAGS.items():
        last = events.Images(tag)[-1]
        Image.open(io.BytesIO(last.encoded_image_string)).save(DOCS / name, optimize=True)
    Image.fromarray(attention_strip(ckpt)).save(DOCS / TB_TAGS["val/attention_rollout"], optimize=True)
    for path in sorted(DOCS.glob("*.png")):
        print(f"{path.relative_to(DOCS.parent)}  {Image.open(path).size}  {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
