"""Checkpoints: the one place that knows their keys. Atomic saves; safe loads (weights_only, plain data only)."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from vitcli.config import Config, config_from_dict
from vitcli.errors import VitError, not_a_file, short, write_problem

FORMAT = "vitcli-checkpoint"
VERSION = 1


def check_writable(folder: Path, what: str, fix: str, keep: bool = False) -> None:
    """Before work whose results go to `folder`: it exists (made if need be) and takes a file, else one VitError
    ("cannot write {what}: ...; {fix}"). The folders it made are taken back unless `keep` (and after a failure)."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
    error = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{os.getpid()}"
        probe.open("wb").close()
        probe.unlink()
    except OSError as e:
        error = e
    for made_folder in made if error or not keep else []:  # a later write makes them again
        if not os.path.isdir(made_folder):  # not made: the failure came first (a name too long for the disk)
            continue
        try:
            made_folder.rmdir()
        except OSError:
            break
    if error is not None:
        problem, _ = write_problem(folder / "file", error)
        raise VitError(f"cannot write {what}: {problem}; {fix}")


RUN_DIR_FIX = "free disk space or check that the run directory can be written"  # for the files of a run


def atomic_save(obj: Any, path: Path, fix: str = RUN_DIR_FIX) -> None:
    """torch.save through atomic_write."""
    atomic_write(path, lambda f: torch.save(obj, f), "checkpoint", fix)


def atomic_write(path: Path, write: Callable[[Any], None], what: str = "file",
                 fix: str = "free disk space or choose another path") -> None:
    """Temporary file in the same folder, `write(file)`, flush, fsync, rename, fsync the folder: a crash at any
    moment leaves either the old file or the new one, never a torn one; an error is one VitError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    f = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as raw:
            f = _WriteErrors(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:  # Ctrl-C in the middle too: no temporary file is left behind
        with contextlib.suppress(OSError):  # (where a file stands for the folder, unlink fails as open did)
            tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        # torch.save's zip writer turns a failed write (a full disk) into a RuntimeError ("unexpected pos ...")
        error = e if isinstance(e, OSError) else getattr(f, "error", None)
        if error is None:
            raise
        problem, space = write_problem(path, error)
        raise VitError(f"cannot write {what} {path}: {problem}; "
                       f"{fix if space else fix.removeprefix('free disk space or ')}") from None


class _WriteErrors:
    """A binary file whose first failed write is kept (`error`), for writers that report it as something else."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def rng_state() -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [list(v) if isinstance(v, tuple) else v for v in random.getstate()],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_checkpoint(*, config: Config, classes: list[str], model: torch.nn.Module,
                    ema: Optional[torch.nn.Module], optimizer, scaler, epoch: int, step: int, global_step: int,
                    best_top1: float, epoch_stats: dict[str, float], metrics: dict[str, Any],
                    rng_ranks: Optional[list[dict[str, Any]]] = None, elapsed_seconds: float = 0.0,
                    run_id: Optional[str] = None, attention_drawn_at: Optional[int] = None) -> dict[str, Any]:
    """`epoch` is the epoch in progress and `step` the steps of it already done (step == steps_per_epoch once
    the epoch is finished); `elapsed_seconds` the run's wall time so far, over all its sessions; `run_id` names the
    run, the same in all its checkpoints (a resumed run keeps it); `attention_drawn_at` the epoch whose attention
    maps TensorBoard last got, so that a resumed run keeps their spacing."""
    from vitcli import __version__

    return {
        "format": FORMAT,
        "version": VERSION,
        "vitcli_version": __version__,
        "config": config.to_dict(),
        "classes": list(classes),
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "global_step": global_step,
        "best_top1": best_top1,
        "epoch_stats": epoch_stats,
        "metrics": metrics,
        "elapsed_seconds": elapsed_seconds,
        "run_id": run_id,
        "attention_drawn_at": attention_drawn_at,
        "rng": rng_ranks[0] if rng_ranks else rng_state(),
        "rng_ranks": rng_ranks,  # under DDP: every rank's own state, for an exact resume with as many ranks
    }


def written_by_torch_save(path: Path) -> bool:
    """By its first bytes: torch.save writes a zip file; torch before 1.6 a bare pickle."""
    with open(path, "rb") as f:
        return f.read(2).startswith((b"PK", b"\x80"))


def damaged_part(archive) -> Optional[str]:
    """The first part of a zip file written by torch.save (an open zipfile.ZipFile) whose CRC-32 does not match its
    bytes (a torn copy, a disk fault, an edit), else None. torch.load does not check them: a flipped byte in a tensor
    loaded silently, one in the pickle was taken for a file that may run code."""
    import zipfile

    for info in archive.infolist():
        if info.CRC == 0 and info.file_size > 0:  # saved without checksums (torch.serialization.
            continue                              # set_crc32_options(False)), which torch.load reads
        try:
            with archive.open(info) as part:
                while part.read(1 << 24):  # the CRC is checked at the part's end
                    pass
        except zipfile.BadZipFile:
            return info.filename
        except Exception:  # zlib.error and the like: torch.load says what is wrong
            return None
    return None


def check_torch_zip(path: Path, torchscript: str, fix: str) -> None:
    """Before torch.load of a file torch.save wrote, with the zip opened once: a TorchScript archive (vit export
    --format torchscript, torch.jit.save: a zip holding code/; torch.load would warn in two lines, then fail;
    `torchscript` says what it is not and what to pass) and a part that fails its checksum (damaged_part; `fix` says
    what to do) are one VitError each. A file that is no zip at all passes: torch.load says what it is."""
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except Exception:  # BadZipFile, a header too damaged to read: torch.load's error follows
        return
    with archive:
        if any("/code/" in name for name in archive.namelist()[:4096]):
            raise VitError(f"{path} is an exported TorchScript model{torchscript}")
        part = damaged_part(archive)
    if part is not None:
        raise VitError(f"{path} is damaged: its part {part} fails its checksum (a torn copy or a disk fault); "
                       f"{fix}")


def is_safetensors(path: Path) -> bool:
    """A safetensors file by its start: the length of its JSON header (8 bytes, little-endian), then the header's
    '{', and no longer than the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


def load_checkpoint(path: str | Path, not_vitcli_advice: str = "", example: str = "best.pt") -> dict[str, Any]:
    """Loads with weights_only=True: tensors and plain data only, so a crafted file cannot run code. `example`: the
    file to suggest when `path` is a run directory."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise VitError(not_a_file(path, "checkpoint", example, "*.pt"))
    if path.stat().st_size == 0:
        raise VitError(f"checkpoint {path} is empty (0 bytes); use another checkpoint, e.g. the run's best.pt")
    exported = "safetensors" if is_safetensors(path) else {".onnx": "ONNX", ".safetensors": "safetensors"}.get(
        path.suffix.lower())  # by its content where it can be told (an export named m.pt, or m.onnx)
    if exported and not zipfile.is_zipfile(path):  # (a safetensors header can begin with torch's pickle byte)
        raise VitError(f"{path} is an exported {exported} model (vit export), not a checkpoint; pass the best.pt or "
                       f"last.pt it was exported from"
                       + (f" (or start a run from it: --set model.init_from={path})" if exported == "safetensors"
                          else ""))
    if not written_by_torch_save(path):
        raise VitError(f"{path} is not a checkpoint (not a file written by torch.save); pass a best.pt or last.pt "
                       f"written by 'vit train'")
    check_torch_zip(path, " (vit export), not a checkpoint; pass the best.pt or last.pt it was exported from",
                    "use another checkpoint, e.g. the run's best.pt or last.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise VitError(f"refused to load {path}: it holds more than tensors and plain data, so it may run code "
                       f"({short(str(e))})") from None
    except Exception as e:  # torn zip, legacy-format garbage, text: torch raises many types for a bad file
        reason = str(e).split(". This is an internal")[0]  # miniz's advice to file a bug is not for this case
        raise VitError(f"{path} is not a readable checkpoint (truncated or not a torch file: "
                       f"{short(reason) or type(e).__name__}); use another checkpoint, e.g. the run's best.pt or "
                       f"last.pt") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise VitError(f"{path} is not a vitcli checkpoint (no '{FORMAT}' marker); pass a best.pt or last.pt "
                       f"written by 'vit train'{not_vitcli_advice}")
    if ckpt.get("version") != VERSION:
        newer = isinstance(ckpt.get("version"), int) and ckpt["version"] > VERSION
        raise VitError(f"{path} is a version {ckpt.get('version')} checkpoint (written by vitcli "
                       f"{ckpt.get('vitcli_version')}); this vitcli reads version {VERSION}"
                       + ("; update vitcli to read it" if newer else ""))
    missing = [key for key in ("config", "classes", "model") if not isinstance(ckpt.get(key), (dict, list))]
    if missing:  # damaged, or edited by hand
        raise VitError(f"{path} is an incomplete vitcli checkpoint (no {', '.join(missing)}); use another "
                       f"checkpoint, e.g. the run's best.pt or last.pt")
    ckpt["config"] = config_from_dict(ckpt["config"], source=f"{path} (config)")
    return ckpt


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path,
                 names: Optional[dict[str, str]] = None) -> None:
    """Loads a state dict whole (check_fit, check_finite): a mismatch or a damaged value is one line."""
    check_fit(model.state_dict(), state_dict, path, names)
    check_finite(state_dict, path)
    model.load_state_dict(state_dict)


def check_fit(own: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], path: str | Path,
              names: Optional[dict[str, str]] = None, new: Sequence[str] = ()) -> None:
    """The weights have the model's tensors (`own`, less `new`: those left at their start, a new head), each of its
    shape, else one line naming them. `names`: for weights from outside a checkpoint, whose shapes the config
    describes, the file's own name of each renamed tensor ({} for none: interop.file_names); the line then also
    names the config key to set."""
    described = names is not None
    whose = "the config's model" if described else "the model"
    missing = [k for k in own if k not in state_dict and k not in new]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        advice = f"; {missing_keys_advice(list(own), list(state_dict))}" if described else ""
        unexpected = [(names or {}).get(k, k) for k in unexpected[:4]]  # as the file names them
        raise VitError(f"{path}: weights do not fit {whose} (missing {missing[:4]}, unexpected {unexpected}){advice}")
    for key, value in state_dict.items():
        if value.shape != own[key].shape:
            raise VitError(f"{path}: tensor {tensor_name(key, names)} has shape {tuple(value.shape)}, {whose} "
                           f"expects {tuple(own[key].shape)}"
                           + (shape_advice(key, value.shape, own[key].shape) if described else ""))


def shape_advice(key: str, given: Sequence[int], expected: Sequence[int]) -> str:
    """Which config key gives a tensor's shape: '; set ... as the weights were trained' for a mismatch."""
    if key == "patch_embedding.to_patch_embedding.weight" and len(given) == len(expected) == 2 \
            and given[0] == expected[0] and 3 in (given[1] / expected[1], expected[1] / given[1]):
        # (dim, channels x patch x patch): 3 times the values per patch is RGB against gray at one patch size
        # (or, rarely, gray at a 3x larger patch against RGB: both are said)
        rgb = given[1] > expected[1]
        return (f"; 3x {'more' if rgb else 'fewer'} values per patch: weights for {'RGB' if rgb else 'grayscale'} "
                f"images on a {'grayscale' if rgb else 'RGB'} dataset (use a dataset of "
                f"{'RGB images: cifar10, cifar100 or imagefolder' if rgb else 'grayscale images: fashion_mnist or mnist'}"
                f"), or of another model.patch_size")
    if key.endswith("position_embedding"):
        keys = "data.image_size and model.patch_size (the patch grid) and model.dim"
    elif "to_patch_embedding" in key:
        keys = "model.patch_size and model.dim"
    elif ".mlp.fc" in key:
        keys = "model.mlp_ratio and model.dim"
    else:
        keys = "model.dim"
    return f"; set the config's {keys} as the weights were trained"


def missing_keys_advice(own: list[str], given: list[str]) -> str:
    """Which config key to set where the weights (`given`, vitcli's names) have other tensors than the model."""
    def conv_stem(keys: list[str]) -> bool:
        return any(".stem." in key for key in keys)

    if conv_stem(own) != conv_stem(given):
        stem = "conv" if conv_stem(given) else "linear"
        return f"set model.stem: {stem} as the weights were trained (and model.stem_channels, for a conv stem)"
    differ = set(own) ^ set(given)
    if conv_stem(list(differ)):  # conv stems of other layer counts
        return "set model.stem_channels as the weights were trained"
    if any(key.startswith("encoder.blocks.") for key in differ):
        def depth(keys: list[str]) -> int:
            return len({key.split(".")[2] for key in keys if key.startswith("encoder.blocks.")})

        if depth(own) != depth(given):
            return f"set model.depth as the weights were trained ({depth(given)} blocks)"
        return "their blocks hold other layers than vitcli's: weights of another ViT variant"
    return "check model.dim/depth/heads/patch_size"


def tensor_name(key: str, names: Optional[dict[str, str]]) -> str:
    """'key', and its name in the file where that differs (interop.file_names)."""
    return f"'{key}'" + (f" ('{names[key]}' in the file)" if names and key in names else "")


def check_finite(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Weights with NaN or infinite values give NaN logits: eval reported a loss of nan and predict printed NaN
    (not JSON) as if all were well. Training never saves such weights (a non-finite loss stops it)."""
    for key, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise VitError(f"{path}: tensor '{key}' holds NaN or infinite values (a damaged or edited file, or "
                           f"weights from a run that diverged); use another checkpoint")


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path, use_ema: bool = True):
    """The model a checkpoint describes, with its EMA weights when it has them and use_ema is set."""
    from vitcli.model import build_model

    config: Config = ckpt["config"]
    model = build_model(config, len(ckpt["classes"]))
    weights = ckpt["ema"] if (use_ema and ckpt.get("ema") is not None) else ckpt["model"]
    load_weights(model, weights, path)
    return model.eval()
