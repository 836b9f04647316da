"""Shared helpers: run the real `vit` command, and write small datasets in their real on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
VIT = shutil.which("vit", path=str(Path(sys.executable).parent)) or shutil.which("vit")


def run_vit(*args: str, cwd: Path | None = None, timeout: float = 600, check: bool = False,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs the installed `vit` console script, as a user would."""
    assert VIT, "the vit console script is not installed (pip install -e .)"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([VIT, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"vit {' '.join(map(str, args))} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}")
    return result


def class_images(n: int, channels: int, size: int, seed: int, classes: int = 10, labels=None):
    """Images whose class is visible (a bright band at a class-dependent row), as uint8 (N, H, W, C)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n) if labels is None else np.asarray(labels)
    images = rng.integers(0, 60, (n, size, size, channels), dtype=np.uint8)
    band = max(size // classes, 1)
    for i, label in enumerate(labels):
        images[i, label * band:(label + 1) * band] = 230
    return images, labels


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">HBBIII", 0, 0x08, 3, *images.shape[:3]) + images[..., 0].tobytes())
    with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">HBBI", 0, 0x08, 1, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist_idx(tmp_path: Path) -> Path:
    """A small Fashion-MNIST in the real idx.gz format (train 512, t10k 128)."""
    root = tmp_path / "fmnist"
    for prefix, n, seed in (("train", 512, 1), ("t10k", 128, 2)):
        images, labels = class_images(n, 1, 28, seed)
        write_idx(root, prefix, images, labels)
    return root


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    """A small CIFAR-10 in its real python-pickle format: cifar-10-batches-py/data_batch_1..5, test_batch."""
    root = tmp_path / "cifar"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images, labels = class_images(100, 3, 32, seed=10 + i)
        batch = {"batch_label": name, "labels": labels.tolist(),
                 "data": images.transpose(0, 3, 1, 2).reshape(100, -1), "filenames": [f"{j}.png" for j in range(100)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": 100, "num_vis": 3072}, f)
    return root


@pytest.fixture
def imagefolder_dir(tmp_path: Path) -> Path:
    """root/train/<class>/*.png and root/val/<class>/*.jpg of assorted sizes and modes."""
    from PIL import Image

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8)):
        for c, name in enumerate(("circle", "square", "stripe")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                size = int(rng.integers(40, 80))
                images, _ = class_images(1, 3, size, seed=int(rng.integers(1 << 30)), classes=3, labels=[c])
                image = Image.fromarray(images[0])
                image = image.convert("L") if i % 3 == 0 else image
                image.save(folder / f"{i}.{'png' if split == 'train' else 'jpg'}")
    return root


def write_png(path: Path, size: int = 28, mode: str = "L", seed: int = 0) -> Path:
    from PIL import Image

    images, _ = class_images(1, 3, size, seed)
    Image.fromarray(images[0]).convert(mode).save(path)
    return path


@pytest.fixture
def smoke_config(tmp_path: Path) -> Path:
    return REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One real `vit train` on configs/smoke.yaml, shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    run_vit("train", "--config", REPO / "configs" / "smoke.yaml", "--run-dir", run_dir, check=True)
    return run_dir
