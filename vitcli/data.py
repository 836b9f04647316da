"""Datasets, loaders and per-batch augmentation.

Small-image datasets (CIFAR, the MNIST family, synthetic) are held whole as a uint8 tensor on the training device
and augmented per batch there: no DataLoader, no per-image PIL work, and the loop never waits for data.
Image folders go through DataLoader workers (decode, random resized crop, flip) with pinned memory.

The order of each epoch is a permutation drawn from (seed, epoch), and every random choice of the per-batch
augmentation from (seed, global step): a run resumed at any step sees exactly the batches it would have seen.
"""

from __future__ import annotations

import gzip
import os
import pickle
import random
import signal
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F

from vitcli.augment import trivial_augment
from vitcli.config import DATASET_DEFAULTS, Config
from vitcli.errors import DatasetNotFound, VitError, is_rank_zero, short

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
SYNTHETIC_SIZES = {"train": 2048, "test": 512}


@dataclass
class ArrayDataset:
    """A whole split in memory: images (N, C, H, W) uint8, labels (N,) int64; `whole`: the split's size before
    data.max_*_samples took its first N (None: not limited)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    whole: Optional[int] = None

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "ArrayDataset":
        return ArrayDataset(self.images.to(device), self.labels.to(device), self.classes, self.whole)


def is_in_memory(dataset: str) -> bool:
    return dataset != "imagefolder"


def split_name(split: str, dataset: str, root: Optional[Path] = None) -> str:
    """'train', or the held-out split: 'test' for in-memory datasets, where 'val' and 'test' mean the same. An image
    folder's is val/, which training evaluates on, or its test/ where one is asked for and there is one of class
    folders (`root`): the figure to report, which best.pt was not picked on."""
    if split == "train":
        return "train"
    if split not in ("val", "test"):
        raise VitError(f"unknown split '{split}': use train, val or test")
    if dataset != "imagefolder":
        return "test"
    return "test" if split == "test" and root is not None and has_class_folders(root / "test") else "val"


def has_class_folders(folder: Path) -> bool:
    """An image folder split: a folder of class folders (a Kaggle-style test/ of unlabelled images is none)."""
    try:
        return folder.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- readers


def _missing(dataset: str, root: Path, looked_for: str) -> DatasetNotFound:
    how = {
        "fashion_mnist": "install Debian's dataset-fashion-mnist and set data.root=/usr/share/datasets/fashion-mnist,"
                         " or set data.download=true",
        "mnist": "put the four idx files there, or set data.download=true",
        "cifar10": "unpack cifar-10-python.tar.gz there, or set data.download=true",
        "cifar100": "unpack cifar-100-python.tar.gz there, or set data.download=true",
    }[dataset]
    what = f"dataset {dataset} not found in {root} (looked for {looked_for})"
    return DatasetNotFound(f"{what}; {how}", what)


def _download(dataset: str, root: Path) -> None:
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}[dataset]
    for folder in (root, *root.parents):  # a file where the folder should be: no network can help
        if os.path.lexists(folder) and not folder.is_dir():
            raise VitError(f"data.root {root}: {folder} is a file, not a folder; set data.root to the folder to "
                           f"download {dataset} into")
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        why = short(" ".join(str(e).split()), 200)  # torchvision's text spans lines (the URL, then the cause)
        what = f"download of {dataset} into {root} failed ({type(e).__name__}: {why})"
        raise DatasetNotFound(f"{what}; check the network, or fetch the files by hand and set data.download=false",
                              what) from None


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        body = data[4 + 4 * ndim:]
        if len(body) != int(torch.tensor(shape).prod()):
            raise ValueError(f"expected {shape} bytes of data, found {len(body)}")
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as e:  # zlib: a damaged .gz
        raise VitError(f"{path}: unreadable idx file ({e}); download it again") from None
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _find_idx(root: Path, dataset: str, stem: str) -> Optional[Path]:
    """The idx file in root itself or in torchvision's download folder of this dataset (never the other one's:
    MNIST and Fashion-MNIST share file names)."""
    own = "FashionMNIST" if dataset == "fashion_mnist" else "MNIST"
    for folder in (root, root / own / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_idx_dataset(dataset: str, root: Path, split: str) -> ArrayDataset:
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find_idx(root, dataset, s) for s in stems]
    if None in paths:
        raise _missing(dataset, root, f"{stems[0]}[.gz] and {stems[1]}[.gz]")
    images, labels = _read_idx(paths[0]), _read_idx(paths[1])
    if images.ndim != 3:
        raise VitError(f"{paths[0]}: not an idx file of images (shape {tuple(images.shape)}, expected (N, H, W)); "
                       f"is it a labels file under the images' name? Put the original {paths[0].name} back")
    if labels.ndim != 1 or len(images) != len(labels):
        raise VitError(f"{paths[1]}: labels {tuple(labels.shape)} do not match the {len(images)} images of "
                       f"{paths[0]}; put the original files back")
    classes = FASHION_MNIST_CLASSES if dataset == "fashion_mnist" else MNIST_CLASSES
    check_labels(labels, classes, paths[1], "the idx files of MNIST and Fashion-MNIST hold 10 classes, 0-9")
    if split == "train" and len(images) >= 1000 and is_rank_zero():  # both ship as the same four file names
        mean = images.sum(dtype=torch.int64).item() / images.numel() / 255
        other = "mnist" if dataset == "fashion_mnist" else "fashion_mnist"
        own, theirs = (DATASET_DEFAULTS[name]["mean"][0] for name in (dataset, other))
        if abs(mean - theirs) < abs(mean - own) / 3:
            print(f"vit: note: the images in {paths[0].parent} have a mean of {mean:.3f}, {other}'s ({theirs}) "
                  f"rather than {dataset}'s ({own}): are they {other}? If so, set data.dataset={other} (its class "
                  f"names, normalization and flips)", file=sys.stderr)
    return ArrayDataset(images.unsqueeze(1).contiguous(), labels.long(), classes)


def check_labels(labels: torch.Tensor, classes: list[str], path: Path, advice: str) -> None:
    """Labels outside 0..classes-1 (EMNIST letters under MNIST's name, a batches.meta of fewer names): one line,
    not a traceback from the loss at the first step (a device-side assert on CUDA)."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        raise VitError(f"{path}: labels run from {int(labels.min())} to {int(labels.max())}, but the dataset has "
                       f"{len(classes)} classes (0 to {len(classes) - 1}); {advice}")


def load_cifar(dataset: str, root: Path, split: str) -> ArrayDataset:
    """Reads CIFAR's own python format (the folder inside cifar-10-python.tar.gz / cifar-100-python.tar.gz)."""
    folder_name = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"
    folder = root / folder_name if (root / folder_name).is_dir() else root
    if dataset == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, label_key, names_key = "batches.meta", "labels", "label_names"
    else:
        files = ["train"] if split == "train" else ["test"]
        meta, label_key, names_key = "meta", "fine_labels", "fine_label_names"
    if not all((folder / f).is_file() for f in files + [meta]):
        raise _missing(dataset, root, f"{folder_name}/{{{','.join(files + [meta])}}}")

    def unpickle(path: Path) -> dict:
        # CIFAR ships as Python pickles; this reads the dataset's own files, as torchvision does.
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except Exception as e:
            raise VitError(f"{path}: not a readable CIFAR batch file ({type(e).__name__}); download it again") \
                from None

    images, labels = [], []
    for name in files:
        batch = unpickle(folder / name)
        images.append(torch.as_tensor(batch["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(batch[label_key], dtype=torch.long))
    classes = list(unpickle(folder / meta)[names_key])
    check_labels(torch.cat(labels), classes, folder / files[0] if len(files) == 1 else folder,
                 f"its {meta} names {len(classes)}: put the dataset's original files back")
    return ArrayDataset(torch.cat(images), torch.cat(labels), classes)


def load_synthetic(config: Config, split: str) -> ArrayDataset:
    """Deterministic images from the seed: each of 10 classes is a fixed random pattern plus noise, so a model can
    learn it. For smoke tests only; every output calls it synthetic."""
    size, channels = config.image_size, DATASET_DEFAULTS["synthetic"]["channels"]
    g = torch.Generator().manual_seed(config.train.seed)
    # Low-frequency patterns (4x4 cells), so that random crops and flips keep them recognisable.
    coarse = torch.rand(10, channels, 4, 4, generator=g) * 255
    patterns = F.interpolate(coarse, size=(size, size), mode="nearest")
    n = SYNTHETIC_SIZES[split]
    g.manual_seed(config.train.seed + (1 if split == "train" else 2))
    labels = torch.randint(0, 10, (n,), generator=g)
    noise = torch.randn(n, channels, size, size, generator=g) * 60
    images = (patterns[labels] + noise).clamp(0, 255).to(torch.uint8)
    return ArrayDataset(images, labels, [f"synthetic-{i}" for i in range(10)])


def load_array_dataset(config: Config, split: str) -> ArrayDataset:
    """A whole split of an in-memory dataset on the CPU, cut to max_{train,val}_samples."""
    d = config.data
    split = split_name(split, d.dataset)
    root = config.data_root
    if d.dataset == "synthetic":
        data = load_synthetic(config, split)
    else:
        read = load_idx_dataset if d.dataset in ("mnist", "fashion_mnist") else load_cifar
        try:
            data = read(d.dataset, root, split)
        except VitError:
            if not d.download:
                raise
            _download(d.dataset, root)  # only when the files are not there yet
            data = read(d.dataset, root, split)
    limit = d.max_train_samples if split == "train" else d.max_val_samples
    if limit is not None and limit < len(data):
        data = ArrayDataset(data.images[:limit], data.labels[:limit], data.classes, len(data))
    return data


def imagefolder_classes(root: Path, split: str) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        what = (f"image folder {folder} not found: an imagefolder dataset needs {root}/train/<class>/* and "
                f"{root}/val/<class>/*")
        raise DatasetNotFound(f"{what}; set data.root to the folder holding them (--set data.root=DIR; a relative "
                              f"one is read from where vit runs)", what)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))  # (.ipynb_...)
    real: dict[str, str] = {}
    for name in classes:  # a class folder linked to another: the same images under two labels
        same = real.setdefault(os.path.realpath(folder / name), name)
        if same != name:
            raise VitError(f"{folder / name} and {folder / same} are the same folder (a link): its images would be "
                           f"two classes at once; remove the link, or make it a folder of its own")
    if not classes:
        raise VitError(f"no class folders in {folder}: put each class's images in {folder}/<class>/")
    if len(classes) == 1 and split == "train":  # it trained to "top-1 1.0000", which means nothing
        raise VitError(f"{folder} holds one class folder ({classes[0]}); a classifier needs two or more: put each "
                       f"class's images in {folder}/<class>/")
    return classes


def imagefolder_eval_view(size: int):
    """PIL image -> uint8 (C, size, size): the short side resized to size / 0.875, then the centre square, as
    timm and torchvision evaluate. `vit eval` and `vit predict` both use it, so an image scores the same in each."""
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.Resize(eval_resize(size), antialias=True), v2.CenterCrop(size)])


def eval_resize(size: int) -> int:
    return int(round(size / 0.875))


def make_imagefolder(config: Config, split: str, train: bool):
    """An image folder's split as ImageFiles yielding uint8 tensors of the model's size; augmentation (random
    resized crop, flip) happens in the DataLoader workers."""
    from torchvision.transforms import v2

    root = config.data_root
    split = split_name(split, "imagefolder", root)
    classes = imagefolder_classes(root, split)
    size = config.image_size
    if train:
        transform = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
                                *([v2.RandomHorizontalFlip()] if config.hflip else [])])
    else:
        transform = imagefolder_eval_view(size)
    # each class folder's files, through symlinked folders as torchvision's ImageFolder reads them, but each real
    # folder once, and through a link nothing else of the dataset (data.root): a link to a parent made ImageFolder
    # list every other class's images (and the other splits') under this one, or loop for ever
    folder = root / split
    dataset_root = os.path.realpath(root)
    samples, skipped = [], {}
    for target, name in enumerate(classes):
        own = os.path.realpath(folder / name)

        def elsewhere(real: str) -> bool:  # in the dataset but outside this class folder, or above the dataset
            return (within(real, dataset_root) and not within(real, own)) or within(dataset_root, real)

        for path in files_under(folder / name, elsewhere):
            suffix = os.path.splitext(path)[1].lower()
            if suffix in IMAGE_EXTENSIONS:
                samples.append((path, target))
            elif suffix in OTHER_PICTURES:
                skipped[suffix] = skipped.get(suffix, 0) + 1
    if skipped and is_rank_zero():  # PIL reads them, but they are not read: a class may be left with few images
        listed = ", ".join(f"{n} {suffix}" for suffix, n in sorted(skipped.items()))
        print(f"vit: note: {folder}: {listed} file{'s' if sum(skipped.values()) > 1 else ''} not read (the image "
              f"types read: {', '.join(IMAGE_EXTENSIONS)}); convert or rename them to use them", file=sys.stderr)
    dataset = ImageFiles(samples, classes, transform)
    empty = sorted(set(classes) - {classes[target] for target in dataset.targets})
    if empty:
        raise VitError(f"no images found in {root / split} for the classes {', '.join(empty)}: put images "
                       f"({', '.join(IMAGE_EXTENSIONS)}) in each class folder")
    limit = config.data.max_train_samples if split == "train" else config.data.max_val_samples  # the split's own
    if limit is not None and limit < len(dataset.samples):  # listed class by class: a seeded sample
        whole = len(dataset.samples)
        keep = torch.randperm(len(dataset.samples), generator=torch.Generator().manual_seed(config.train.seed))
        dataset = ImageFiles([dataset.samples[i] for i in keep[:limit].sort().values.tolist()], classes, transform)
        dataset.whole = whole
    return dataset


def _load_rgb(path: str):
    from vitcli.predict import convert_image, open_image

    return convert_image(open_image(path), "RGB")


class ImageFiles(torch.utils.data.Dataset):
    """(path, class index) samples read as torchvision's ImageFolder reads them ((image, target) items, `samples`,
    `targets`, `classes`): module-level, so that DataLoader workers started by spawn can unpickle it."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform):
        self.samples, self.classes, self.transform = samples, classes, transform
        self.targets = [target for _, target in samples]
        self.whole: Optional[int] = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        return self.transform(_load_rgb(path)), target


def files_under(folder: str | Path, skip: Callable[[str], bool] = lambda real: False) -> list[str]:
    """The files below a folder in torchvision's ImageFolder order (folders, then names, sorted as text), hidden
    ones and those in hidden folders left out, through symlinked folders, each real folder once (a link to a parent
    does not loop); `skip(realpath)`: folders below the top one not to go into."""
    found, seen, top = [], set(), os.fspath(folder)
    for where, dirs, names in os.walk(top, followlinks=True):
        real = os.path.realpath(where)
        if where != top and (real in seen or skip(real)):
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # which of two links to one folder is read
        found.extend((where, name) for name in names if not name.startswith("."))
    return [os.path.join(where, name) for where, name in sorted(found)]


def within(path: str, folder: str) -> bool:
    """A real path is `folder` or below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# pictures PIL opens under suffixes an image folder does not read (PIL's list also holds formats it only writes,
# .pdf, .h5, ...): counted in a note, since a class may be left with few images
OTHER_PICTURES = (".jfif", ".jpe", ".jp2", ".j2k", ".apng", ".avif", ".heic", ".heif", ".ico", ".tga", ".pbm",
                  ".pnm", ".pcx", ".dib", ".qoi", ".sgi", ".dds")


# ---------------------------------------------------------------------------------------------- batches


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class _StepSampler(torch.utils.data.Sampler):
    """Yields this rank's indices of each global batch of an epoch, from a given step on (for DataLoader)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.start_step = 0, 0

    def __iter__(self):
        order = epoch_permutation(self.n, self.seed, self.epoch)
        local = self.batch_size // self.world_size
        for step in range(self.start_step, self.n // self.batch_size):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield from batch[self.rank * local:(self.rank + 1) * local].tolist()

    def __len__(self) -> int:
        return (self.n // self.batch_size - self.start_step) * (self.batch_size // self.world_size)


class TrainBatches:
    """Training batches of one rank: uint8 images (b, C, H, W) and labels on the device, b = batch_size / world."""

    def __init__(self, config: Config, device: torch.device, rank: int = 0, world_size: int = 1):
        self.config, self.device, self.rank, self.world_size = config, device, rank, world_size
        self.batch_size = config.train.batch_size
        if self.batch_size % world_size:
            raise VitError(f"train.batch_size {self.batch_size} does not divide over {world_size} processes; "
                           f"use a multiple of {world_size}")
        self.local_batch_size = self.batch_size // world_size
        accum = config.train.grad_accum_steps
        if accum > self.local_batch_size:
            raise VitError(f"train.grad_accum_steps {accum} is more micro-batches than the {self.local_batch_size} "
                           f"images each of {world_size} processes takes of train.batch_size {self.batch_size}; set "
                           f"it at most {self.local_batch_size}")
        self.in_memory = is_in_memory(config.data.dataset)
        if self.in_memory:
            self.data = load_array_dataset(config, "train").to(device)
            self.classes, n = self.data.classes, len(self.data)
        else:
            self.dataset = make_imagefolder(config, "train", train=True)
            self.classes, n = self.dataset.classes, len(self.dataset)
            if n == 0:
                raise VitError(f"no images found in {config.data.root}/train")
            self.sampler = _StepSampler(n, self.batch_size, config.train.seed, rank, world_size)
            workers = config.data.num_workers
            self.loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=self.local_batch_size, sampler=self.sampler, num_workers=workers,
                pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=True,
                worker_init_fn=ignore_ctrl_c)
        self.num_samples = n
        self.steps_per_epoch = n // self.batch_size
        if self.steps_per_epoch == 0:
            limit = config.data.max_train_samples
            cut = f" after data.max_train_samples {limit}" if limit is not None and limit == n else ""
            raise VitError(f"train.batch_size {self.batch_size} is larger than the training set ({n} images{cut}); "
                           f"lower train.batch_size" + (" or raise data.max_train_samples" if cut else ""))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.in_memory:
            self.sampler.epoch, self.sampler.start_step = epoch, start_step
            for images, labels in self.loader:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            return
        order = epoch_permutation(self.num_samples, self.config.train.seed, epoch).to(self.device)
        b, B = self.local_batch_size, self.batch_size
        for step in range(start_step, self.steps_per_epoch):
            index = order[step * B + self.rank * b: step * B + (self.rank + 1) * b]
            yield self.data.images[index], self.data.labels[index]


def ignore_ctrl_c(worker_id: int = 0) -> None:
    """In DataLoader workers: Ctrl-C, which a terminal sends to the whole process group, is the main process's to
    handle (it finishes its step, saves and stops the workers). SIGTERM keeps its default: torch stops workers
    with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class EvalData(NamedTuple):
    classes: list[str]
    count: int  # the images evaluated (all ranks)
    batches: Callable[..., Iterator[tuple[torch.Tensor, torch.Tensor]]]
    whole: Optional[int]  # the split's size where data.max_val_samples (max_train_samples) left out some, else None


def eval_batches(config: Config, split: str, device: torch.device, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> EvalData:
    """Classes, number of samples, iterator factory for evaluation; each rank takes every world_size-th sample.
    The factory takes an optional batch size other than `batch_size` (a retry after running out of memory)."""
    if is_in_memory(config.data.dataset):
        data = load_array_dataset(config, split).to(device)

        def batches(size: Optional[int] = None):
            index = torch.arange(rank, len(data), world_size, device=device)
            for chunk in index.split(min(size or batch_size, max(len(index), 1))):  # (torch overflows past 2^63)
                yield data.images[chunk], data.labels[chunk]

        return EvalData(data.classes, len(data), batches, data.whole)
    dataset = make_imagefolder(config, split, train=False)
    if len(dataset) == 0:
        raise VitError(f"no images found in {config.data_root / split_name(split, 'imagefolder', config.data_root)}")
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    workers = config.data.num_workers
    # its own generator: the workers' base seed is not drawn from the global RNG, so an evaluation leaves the
    # training's random stream (dropout, drop_path) as it was, and eval_every does not change the trained weights
    loaders = {}  # batch size -> its DataLoader

    def batches(size: Optional[int] = None):
        size = min(size or batch_size, max(len(subset), 1))
        if size not in loaders:
            loaders[size] = torch.utils.data.DataLoader(subset, batch_size=size, num_workers=workers,
                                                        pin_memory=device.type == "cuda",
                                                        generator=torch.Generator(), worker_init_fn=ignore_ctrl_c)
        for images, labels in loaders[size]:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    return EvalData(dataset.classes, len(dataset), batches, dataset.whole)


# ---------------------------------------------------------------------------------------------- augmentation


class Preprocess:
    """uint8 batch on the device -> normalized float batch of the model's size. With `train=True` it also
    applies the config's per-batch augmentation, all random choices drawn from (seed, step)."""

    def __init__(self, config: Config, device: torch.device, train: bool, rank: int = 0, world_size: int = 1):
        self.config, self.train = config, train
        # Random draws are made for the global batch and each rank keeps its slice, so that N ranks x (B/N)
        # crop, flip and TrivialAugment exactly as 1 process x B does (MixUp/CutMix and the noise of random
        # erasing act per rank).
        self.rank, self.world_size = rank, world_size
        self.size = config.image_size
        self.mean = torch.tensor(config.mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(config.std, device=device).view(1, -1, 1, 1) * 255
        d = config.data
        in_memory = is_in_memory(d.dataset)
        self.crop_padding = config.crop_padding if (train and in_memory) else 0
        self.hflip = train and in_memory and config.hflip
        self.trivial = train and d.trivial_augment
        self.erasing = d.random_erasing if train else 0.0
        self.mixup, self.cutmix = (d.mixup_alpha, d.cutmix_alpha) if train else (0.0, 0.0)
        self.num_classes: Optional[int] = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int = 0):
        """Returns (images, targets): targets are class indices, or soft (b, classes) rows under MixUp/CutMix."""
        if not self.train:
            return self.normalize(images), labels
        g = torch.Generator(images.device).manual_seed(self.config.train.seed * 7_919 + step)
        share = (self.rank, self.world_size)
        if self.crop_padding:
            images = random_crop(images, self.crop_padding, g, share)
        if self.hflip:
            flip = _draw(torch.rand, images.shape[0], share, g, images.device) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        if self.trivial:  # each image its own op and magnitude
            images = trivial_augment(images, _draw(lambda n, **kw: torch.rand(n, 3, **kw), images.shape[0], share, g,
                                                   images.device))
        x = self.normalize(images)
        if self.erasing:
            x = random_erasing(x, self.erasing, g, share)
        if self.mixup or self.cutmix:
            return mix(x, labels, self.num_classes, self.mixup, self.cutmix, random.Random(g.initial_seed()))
        return x, labels


def _draw(fn, n: int, share: tuple[int, int], g: torch.Generator, device, **kwargs) -> torch.Tensor:
    """fn(...) drawn for the global batch of n * world_size images; this rank's slice of it."""
    rank, world = share
    values = fn(n * world, generator=g, device=device, **kwargs)
    return values[rank * n:(rank + 1) * n]


def random_crop(images: torch.Tensor, padding: int, g: torch.Generator,
                share: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Per-image random crop of the original size from the zero-padded batch, by two gathers (no loop)."""
    B, C, H, W = images.shape
    padded = F.pad(images, (padding,) * 4)  # (B, C, H+2p, W+2p)
    shift = _draw(lambda n, **kw: torch.randint(0, 2 * padding + 1, (n, 2), **kw), B, share, g, images.device)
    dy, dx = shift[:, 0].view(B, 1, 1, 1), shift[:, 1].view(B, 1, 1, 1)
    rows = (dy + torch.arange(H, device=images.device).view(1, 1, H, 1)).expand(B, C, H, W + 2 * padding)
    cols = (dx + torch.arange(W, device=images.device).view(1, 1, 1, W)).expand(B, C, H, W)
    return padded.gather(2, rows).gather(3, cols)


def random_erasing(x: torch.Tensor, p: float, g: torch.Generator, share: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Random erasing (Zhong et al.): with probability p per image, a rectangle of 2-33% of the area and aspect
    ratio 0.3-3.3 is replaced by normal noise (in normalized units)."""
    B, C, H, W = x.shape
    dev = x.device
    u = _draw(lambda n, **kw: torch.rand(n, 5, **kw), B, share, g, dev)  # area, ratio, top, left, on
    area = (0.02 + 0.31 * u[:, 0]) * H * W
    log_ratio = -1.2 + 2.4 * u[:, 1]
    h = (area * log_ratio.exp()).sqrt().round().clamp(1, H)
    w = (area / log_ratio.exp()).sqrt().round().clamp(1, W)
    top = (u[:, 2] * (H - h + 1)).floor()
    left = (u[:, 3] * (W - w + 1)).floor()
    on = u[:, 4] < p
    r = torch.arange(H, device=dev).view(1, H, 1)
    c = torch.arange(W, device=dev).view(1, 1, W)
    mask = ((r >= top.view(B, 1, 1)) & (r < (top + h).view(B, 1, 1)) & (c >= left.view(B, 1, 1))
            & (c < (left + w).view(B, 1, 1)) & on.view(B, 1, 1))
    noise = torch.randn(x.shape, device=dev, generator=g, dtype=x.dtype)
    return torch.where(mask.unsqueeze(1), noise, x)


def mix(x: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
        rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix (one of them per batch, half and half when both are on) with the batch flipped as partner;
    returns soft targets."""
    one_hot = F.one_hot(labels, num_classes).to(x.dtype)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < 0.5)
    lam = rng.betavariate(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.betavariate(mixup_alpha, mixup_alpha)
    partner = x.flip(0)
    if use_cutmix:
        H, W = x.shape[-2:]
        cut = (1 - lam) ** 0.5
        h, w = int(H * cut), int(W * cut)
        cy, cx = rng.randrange(H), rng.randrange(W)
        top, bottom = max(cy - h // 2, 0), min(cy + h // 2, H)
        left, right = max(cx - w // 2, 0), min(cx + w // 2, W)
        x = x.clone()
        x[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (H * W)
    else:
        x = x * lam + partner * (1 - lam)
    return x, one_hot * lam + one_hot.flip(0) * (1 - lam)
