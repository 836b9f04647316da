"""Run configuration: frozen dataclasses <- YAML file <- `--set section.key=value` overrides (lowest first).

Everything a user can get wrong here fails with one VitError line naming the file, the key and a fix.
This module imports no torch, so the CLI can validate configs instantly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from vitcli.errors import VitError

DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "synthetic")

# Native image size, channels and normalization of each dataset (imagefolder: ImageNet statistics).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar10": dict(image_size=32, channels=3, mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616]),
    "cifar100": dict(image_size=32, channels=3, mean=[0.5071, 0.4865, 0.4409], std=[0.2673, 0.2564, 0.2762]),
    "mnist": dict(image_size=28, channels=1, mean=[0.1307], std=[0.3081]),
    "fashion_mnist": dict(image_size=28, channels=1, mean=[0.2860], std=[0.3530]),
    "imagefolder": dict(image_size=224, channels=3, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    "synthetic": dict(image_size=32, channels=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]),
}


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar10"
    root: str = "data"
    download: bool = False
    image_size: Optional[int] = None  # None: the dataset's native size
    mean: Optional[list[float]] = None  # None: the dataset's own statistics
    std: Optional[list[float]] = None
    max_train_samples: Optional[int] = None
    max_val_samples: Optional[int] = None
    num_workers: int = 2  # DataLoader workers (imagefolder only; in-memory datasets need none)
    # Augmentation, applied per batch on the training device for in-memory datasets.
    crop_padding: Optional[int] = None  # random crop after zero padding; None: 4, or 0 for imagefolder
    hflip: Optional[bool] = None  # None: on, except for digits (mnist)
    trivial_augment: bool = False  # TrivialAugment Wide, each image its own op (vitcli/augment.py)
    random_erasing: float = 0.0  # probability per image
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    patch_size: int = 4
    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    attention: str = "auto"  # auto | explicit | fused
    stem: str = "linear"  # linear (the classic patch embedding) | conv (a small convolutional stem)
    stem_channels: Optional[list[int]] = None  # conv stem widths; None: dim/4, dim/2 (patch 4)
    init_from: Optional[str] = None  # weights to start from (fine-tuning)
    init_format: str = "vitcli"  # vitcli | timm | torchvision


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128  # global: split across DDP ranks
    grad_accum_steps: int = 1  # each rank's batch run as N micro-batches (less memory, the same optimizer steps)
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: Optional[float] = 1.0  # max global gradient norm; null disables
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps (cuda:N also accepted)
    compile: bool = False
    compile_mode: str = "auto"  # auto | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    ema_decay: float = 0.0  # 0 disables the EMA of the weights
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: only at epoch ends
    eval_batch_size: int = 512
    eval_every: int = 1  # epochs between evaluations on the test split; the last epoch is always evaluated
    eval_hflip: bool = False  # test-time augmentation: score each image with its mirror image (needs data.hflip)


@dataclass(frozen=True)
class Config:
    name: str = "vit"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def data_root(self) -> Path:
        """data.root with '~' expanded (os.path's: Path.expanduser raises on ~typo)."""
        return Path(os.path.expanduser(self.data.root))

    # Values resolved from the dataset when the config leaves them open.
    @property
    def image_size(self) -> int:
        size = self.data.image_size
        return DATASET_DEFAULTS[self.data.dataset]["image_size"] if size is None else size

    @property
    def mean(self) -> list[float]:
        return list(DATASET_DEFAULTS[self.data.dataset]["mean"] if self.data.mean is None else self.data.mean)

    @property
    def std(self) -> list[float]:
        return list(DATASET_DEFAULTS[self.data.dataset]["std"] if self.data.std is None else self.data.std)

    @property
    def crop_padding(self) -> int:
        if self.data.crop_padding is not None:
            return self.data.crop_padding
        return 4 if self.data.dataset != "imagefolder" else 0

    @property
    def hflip(self) -> bool:
        return self.data.hflip if self.data.hflip is not None else self.data.dataset != "mnist"


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
CHOICES = {
    ("data", "dataset"): DATASETS,
    ("model", "attention"): ("auto", "explicit", "fused"),
    ("model", "init_format"): ("vitcli", "timm", "torchvision"),
    ("model", "stem"): ("linear", "conv"),
    ("train", "precision"): ("auto", "fp32", "bf16", "fp16"),
    ("train", "compile_mode"): ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


def _near_miss(key: str, options: typing.Iterable[str]) -> Optional[str]:
    """The closest of `options` to a mistyped `key`, or None where none is close."""
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return match[0] if match else None


def _closest(key: str, options: typing.Iterable[str], section: str = "") -> str:
    """'; did you mean ...?' for a near miss, else the valid names; with `section`, written as section.key."""
    match = _near_miss(key, options)
    if match:
        return f"; did you mean '{section + '.' if section else ''}{match}'?"
    return f"; valid keys{f' in {section}' if section else ''}: {', '.join(options)}"


def _shown(value: Any) -> str:
    """A value as an error message quotes it; None (`--set key=` or `key:` left empty) as 'no value'."""
    return "no value (empty or null)" if value is None else repr(value)


def _quote_hint(value: Any) -> str:
    """For text that YAML read as something else (2024-01-01 a date, no false, 123 a number): quotes make it text."""
    return "; put it in quotes" if value is not None and not isinstance(value, (str, list, dict)) else ""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Checks `value` against the dataclass field type; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise VitError(f"{where}: expected a list, got {_shown(value)}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string; people write it anyway
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, float) and not math.isfinite(value):  # .inf, nan, "inf" by --set
        raise VitError(f"{where}: expected a finite number, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise VitError(f"{where}: expected true or false, got {_shown(value)}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise VitError(f"{where}: expected a whole number, got {_shown(value)}")
    if not isinstance(value, hint):
        what = {str: "text", float: "a number"}.get(hint, hint.__name__)
        raise VitError(f"{where}: expected {what}, got {_shown(value)}{_quote_hint(value) if hint is str else ''}")
    return value


def _as_typed(value: Any, hint: Any, where: str) -> Any:
    """A `--set` value for a text key, as typed: YAML reads `~` as null, 2024-01-01 as a date, no as false, but
    `--set data.root=~` means the home folder and `--set name=2024-01-01` that name. Other values, values from files
    (_coerce asks for quotes there), and null for a key that may be null (model.init_from) are left as they are."""
    text = where.split("=", 1)[1] if where.startswith("--set ") and "=" in where else ""
    may_be_null = typing.get_origin(hint) in (typing.Union, types.UnionType)
    is_text = hint is str or (may_be_null and str in typing.get_args(hint))
    if not text.strip() or not is_text or isinstance(value, (str, list, dict)) or (value is None and may_be_null):
        return value
    return text


def _merge(raw: dict[str, Any], into: dict[str, dict[str, Any]], source: str) -> list[tuple[str, list[str], str]]:
    """Each (value, source) into its section of `into`; returns the unknown names, for _refuse_unknown."""
    if not isinstance(raw, dict):
        raise VitError(f"{source}: the config must be a mapping of sections (data, model, train), got {raw!r}")
    unknown: list[tuple[str, list[str], str]] = []  # (the name as written in --set, the valid names, section)
    for section, values in raw.items():
        if not isinstance(section, str):  # `1:`, `true:`, `null:` are YAML numbers, booleans, nulls
            raise VitError(f"{source}: a section name must be text (data, model, train or name), got {section!r}")
        if section == "name":
            into["name"] = (values, source)
            continue
        if section not in SECTIONS:
            unknown.append((section, ["name", *SECTIONS], ""))
            continue
        if not isinstance(values, dict):
            raise VitError(f"{source}: section '{section}' must be a mapping of keys, got {values!r}")
        fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for key, value in values.items():
            if not isinstance(key, str):
                raise VitError(f"{source}: a key in section '{section}' must be text, got {key!r}; valid keys: "
                               f"{', '.join(sorted(fields))}")
            if key not in fields:
                unknown.append((key, sorted(fields), section))
                continue
            into[section][key] = (value, source)
    return unknown


def _refuse_unknown(unknown: list[tuple[str, list[str], str]], source: str) -> None:
    """Unknown names are one error for all of them (a file with three typos took three runs to fix, and so did three
    --set typos): a single one with its closest name or the valid ones."""
    if len(unknown) == 1:
        name, options, section = unknown[0]
        what = f"key '{section}.{name}'" if section else f"section '{name}'"
        raise VitError(f"{source}: unknown {what}{_closest(name, options, section)}")
    if unknown:
        listed = []
        for name, options, section in unknown:
            near = _near_miss(name, options)
            prefix = f"{section}." if section else ""
            listed.append(f"'{prefix}{name}'" + (f" (did you mean '{prefix}{near}'?)" if near else ""))
        raise VitError(f"{source}: unknown keys {', '.join(listed)}; the valid ones are in the README's Configs table")


def _set_to_dict(item: str) -> dict[str, Any]:
    if "=" not in item:
        raise VitError(f"--set {item!r}: expected section.key=value, e.g. --set train.epochs=5")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    if parts == ["name"]:
        return {"name": value}
    if len(parts) != 2:
        raise VitError(f"--set {item!r}: expected section.key=value, e.g. --set train.epochs=5")
    return {parts[0]: {parts[1]: value}}


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (the last one silently won)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, merged by SafeLoader's own mapping
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise _DuplicateKey(f"'{key}' is given twice (lines {seen[key]} and {line}); keep one")
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(os.path.expanduser(path))  # Path.expanduser would raise on ~typo
    if not path.is_file():
        from vitcli.errors import not_a_file

        raise VitError(not_a_file(path, "config file", "*.yaml")
                       + ("" if path.is_dir() else " (see configs/ for examples)"))
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise VitError(f"{path}: {e}") from None
    except UnicodeDecodeError:
        raise VitError(f"{path} is not a YAML text file (it is not UTF-8 text: a checkpoint or a picture, or text "
                       f"in another encoding?); pass a recipe such as configs/cifar10.yaml, or save the file as "
                       f"UTF-8") from None
    except RecursionError:
        raise VitError(f"{path}: nested too deeply to read; a recipe is a mapping of sections (data, model, train) "
                       f"of keys") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise VitError(f"{path}: YAML syntax error{line}: {problem}") from None
    return raw or {}


def build_config(raw: dict[str, Any] | None = None, overrides: typing.Sequence[str] = (),
                 source: str = "config", saved: bool = False) -> Config:
    """Defaults <- `raw` (a parsed YAML mapping) <- `--set` overrides; validated. `saved`: `raw` is the config of
    a run or checkpoint, whose model was trained with it: the checks that came later than some runs (data.mean /
    std on the 0-1 scale) do not refuse it."""
    values: dict[str, Any] = {s: {} for s in SECTIONS}
    _refuse_unknown(_merge(raw or {}, values, source), source)
    unknown, wrong = [], []
    for item in overrides:
        found = _merge(_set_to_dict(item), values, f"--set {item}")
        unknown, wrong = unknown + found, wrong + ([f"--set {item}"] * bool(found))
    _refuse_unknown(unknown, ", ".join(wrong))
    name, where = values.pop("name", ("vit", source))
    name = _as_typed(name, str, where)
    if isinstance(name, str) and len(name.encode()) > 200:  # a folder's name: file systems allow 255 bytes
        raise VitError(f"{where}: 'name' (runs/NAME/...) is {len(name.encode())} bytes long, more than a folder "
                       f"name may be; use a name of at most 200")
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise VitError(f"{where}: 'name' (runs/NAME/...) must be a non-empty string without '/', other than '.' "
                       f"and '..', got {name!r}{_quote_hint(name)}")
    sections = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, (value, where) in values[section].items():
            value = _as_typed(value, hints[key], where)
            choices = CHOICES.get((section, key))
            if choices and value not in choices:  # before the type check: a choice key lists its choices
                near = _near_miss(value, choices) if isinstance(value, str) else None  # the choices are listed
                raise VitError(f"{where}: {section}.{key} must be one of {', '.join(choices)}, got {_shown(value)}"
                               + (f"; did you mean '{near}'?" if near else ""))
            kwargs[key] = _coerce(value, hints[key], f"{where}: {section}.{key}")
        sections[section] = cls(**kwargs)
    config = Config(name=name, **sections)
    validate(config, source, {f"{section}.{key}": where for section in SECTIONS
                              for key, (_, where) in values[section].items()}, saved)
    return config


def unread_keys_note(config: Config) -> Optional[str]:
    """The notes (one line each) for keys set to something nothing reads: a train.compile_mode without
    train.compile, model.stem_channels with the linear stem; None when there are none."""
    t, m = config.train, config.model
    notes = []
    if not t.compile and t.compile_mode != "auto":
        notes.append(f"vit: note: train.compile_mode {t.compile_mode} has no effect without train.compile: true; "
                     f"running eagerly (--set train.compile=true compiles)")
    if m.stem == "linear" and m.stem_channels:
        notes.append(f"vit: note: model.stem_channels {m.stem_channels} has no effect with model.stem: linear (they "
                     f"are the conv stem's widths)")
    return "\n".join(notes) or None


# the keys a check reads besides the one it names (an error names the --set that gave any of them)
CHECK_READS = {
    "model.heads": ["model.dim", "model.heads"],
    "model.patch_size": ["data.image_size", "data.dataset", "model.patch_size"],
    "model.stem": ["model.stem", "model.patch_size"],
    "model.stem_channels": ["model.stem_channels", "model.patch_size"],
    "train.eval_hflip": ["train.eval_hflip", "data.hflip", "data.dataset"],
    "data.mean": ["data.mean", "data.dataset"],
    "data.std": ["data.std", "data.dataset"],
    "data.crop_padding": ["data.crop_padding", "data.dataset", "data.image_size"],
    "train.min_lr": ["train.min_lr", "train.lr"],
}


def device_name_ok(name: str) -> bool:
    """auto, cpu, cuda, cuda:N or mps."""
    return name in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", name) is not None


def validate(config: Config, source: str = "config", origins: Optional[dict[str, str]] = None,
             saved: bool = False) -> None:
    """Raises one VitError naming the first invalid key and where its value came from: the `--set` that gave it,
    else `source`. `origins`: section.key -> where its value came from."""
    d, m, t = config.data, config.model, config.train
    channels = DATASET_DEFAULTS[d.dataset]["channels"]
    device_ok = device_name_ok(t.device)
    stored = (config.image_size if d.dataset in ("synthetic", "imagefolder")  # the size of the images as held
              else DATASET_DEFAULTS[d.dataset]["image_size"])
    checks = [
        (config.image_size > 0, "data.image_size", f"must be positive, got {config.image_size}"),
        (m.patch_size > 0, "model.patch_size", f"must be positive, got {m.patch_size}"),
        (m.patch_size <= 0 or config.image_size % m.patch_size == 0, "model.patch_size",
         f"image_size {config.image_size} is not divisible by patch_size {m.patch_size}; "
         f"pick a patch size that divides it"),
        (m.dim > 0 and m.depth > 0 and m.heads > 0, "model.dim/depth/heads", "must be positive"),
        (m.dim % max(m.heads, 1) == 0, "model.heads",
         f"dim {m.dim} is not divisible by heads {m.heads}; pick heads that divide dim"),
        (m.mlp_ratio > 0 and int(m.dim * m.mlp_ratio) >= 1, "model.mlp_ratio",
         f"must give the MLP at least one unit (dim {m.dim} x mlp_ratio {m.mlp_ratio} = {m.dim * m.mlp_ratio:g})"),
        (m.stem != "conv" or m.patch_size <= 0 or t.grad_accum_steps <= 0
         or t.batch_size // t.grad_accum_steps * (config.image_size // m.patch_size) ** 2 > 1,
         "train.batch_size", "1 with one patch per image: the conv stem's BatchNorm needs more than one value per "
         "channel in a batch; use a batch of 2 or more" if t.grad_accum_steps <= 1 else
         f"{t.batch_size} in {t.grad_accum_steps} micro-batches (train.grad_accum_steps) leaves one image of one "
         f"patch in a micro-batch: the conv stem's BatchNorm needs more than one value per channel; use fewer "
         f"micro-batches"),
        (m.stem == "linear" or (m.patch_size >= 2 and m.patch_size & (m.patch_size - 1) == 0), "model.stem",
         f"conv needs a power-of-two patch_size (2, 4, 8, 16, ...), got {m.patch_size}"),
        (not m.stem_channels or (len(m.stem_channels) >= m.patch_size.bit_length() - 1
                                 and all(c > 0 for c in m.stem_channels)), "model.stem_channels",
         f"needs one positive width per stride-2 convolution (log2 of patch_size {m.patch_size}), "
         f"then optional extra stride-1 ones; got {m.stem_channels}"),
        (all(0 <= p < 1 for p in (m.dropout, m.attention_dropout, m.drop_path)), "model.dropout/drop_path",
         "must be in [0, 1)"),
        (t.epochs > 0, "train.epochs", f"must be positive, got {t.epochs}"),
        (t.batch_size > 0, "train.batch_size", f"must be positive, got {t.batch_size}"),
        (t.grad_accum_steps > 0, "train.grad_accum_steps", f"must be positive (1 runs the batch at once), got "
         f"{t.grad_accum_steps}"),
        (t.grad_accum_steps <= max(t.batch_size, 1), "train.grad_accum_steps",
         f"{t.grad_accum_steps} is more micro-batches than the {t.batch_size} images of a batch (train.batch_size); "
         f"set it at most {t.batch_size}"),
        (t.eval_batch_size > 0, "train.eval_batch_size", f"must be positive, got {t.eval_batch_size}"),
        (not t.eval_hflip or config.hflip, "train.eval_hflip",
         "averages each image's prediction with its mirror image's, so it needs data.hflip: true (a model trained "
         "without mirrored images has not learned them)"),
        (t.lr > 0, "train.lr", f"must be positive, got {t.lr}"),
        (t.min_lr >= 0, "train.min_lr", f"must be >= 0 (the learning rate the cosine schedule ends at), got "
         f"{t.min_lr}"),
        (t.min_lr <= t.lr, "train.min_lr", f"{t.min_lr:g} is above train.lr {t.lr:g}: the cosine schedule would "
         f"raise the learning rate to it; set train.min_lr at most train.lr ({TrainConfig.min_lr:g} by default)"),
        (t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}"),
        (t.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0"),
        (0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)"),
        (0 <= t.ema_decay < 1, "train.ema_decay", "must be in [0, 1); 0 disables it"),
        (t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0"),
        (t.eval_every >= 1, "train.eval_every", f"must be >= 1, got {t.eval_every}"),
        (t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "must be positive or null"),
        (device_ok, "train.device", f"must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}"),
        (len(config.mean) == channels, "data.mean",
         f"needs one value per channel: {d.dataset} images have {channels}, got {len(config.mean)}"),
        (len(config.std) == channels, "data.std",
         f"needs one value per channel: {d.dataset} images have {channels}, got {len(config.std)}"),
        (d.dataset != "imagefolder" or not d.crop_padding, "data.crop_padding",
         "applies to in-memory datasets; image folders use random resized crops (leave it unset)"),
        (d.crop_padding is None or d.crop_padding >= 0, "data.crop_padding", f"must be >= 0, got {d.crop_padding}"),
        # padded by its size or more, a random crop can hold no pixel of the image (and the padded batch may not fit
        # in memory: 100000 asked for 7 TB)
        # the crop is cut from the images as stored (CIFAR's 32x32, MNIST's 28x28), before any resize to image_size
        (saved or d.crop_padding is None or d.crop_padding < stored, "data.crop_padding",  # (saved: a checkpoint of
         # a version that checked it against image_size, whose run is what it is)
         f"{d.crop_padding} must be less than the {stored}x{stored} images it pads (the crop is cut before the resize "
         f"to data.image_size; 4 for 32x32 images is usual)"),
        (0 <= t.seed < 2**32, "train.seed", f"must be in [0, 2^32), got {t.seed}"),
        (0 <= d.random_erasing <= 1, "data.random_erasing", "must be a probability in [0, 1]"),
        (d.mixup_alpha >= 0 and d.cutmix_alpha >= 0, "data.mixup_alpha/cutmix_alpha", "must be >= 0"),
        (d.num_workers >= 0, "data.num_workers", "must be >= 0"),
        (all(s > 0 for s in config.std), "data.std", "must be positive"),
        # the scale of pixel values / 255, as torchvision's Normalize after ToTensor; 0-255 values (123.7) normalised
        # every image to about -2 without a word
        (saved or all(m >= 0 for m in config.mean), "data.mean",
         f"must be >= 0 (a pixel's mean on the 0-1 scale), got {config.mean}"),
        (saved or all(m <= 1 for m in config.mean), "data.mean",
         f"is on the 0-1 scale of pixel values / 255 (CIFAR-10's red: 0.4914), got {config.mean}: divide by 255"),
        (saved or all(s <= 1 for s in config.std), "data.std",
         f"is on the 0-1 scale of pixel values / 255 (CIFAR-10's red: 0.2470), got {config.std}: divide by 255"),
        (d.max_train_samples is None or d.max_train_samples > 0, "data.max_train_samples", "must be positive"),
        (d.max_val_samples is None or d.max_val_samples > 0, "data.max_val_samples", "must be positive"),
    ]
    for ok, key, message in checks:
        if not ok:
            section = key.split(".")[0]
            keys = CHECK_READS.get(key) or [k if "." in k else f"{section}.{k}" for k in key.split("/")]
            given = [origins[k] for k in keys if (origins or {}).get(k, "").startswith("--set")]
            raise VitError(f"{given[-1] if given else source}: {key} {message}")


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    raw = read_yaml(path) if path else {}
    if path and not raw:  # all defaults, silently, where `vit train -c my.yaml --print-config > my.yaml` emptied it
        raise VitError(f"{path} is empty (no settings, or only comments); start from a recipe in configs/ (a shell "
                       f"redirection to the file vit reads, > {Path(path).name}, empties it first)")
    return build_config(raw, overrides, source=str(path) if path else "defaults")


def config_from_dict(raw: dict[str, Any], source: str = "checkpoint") -> Config:
    return build_config(raw, (), source=source, saved=True)
