"""The one error type a user can cause. The CLI prints it as one line and exits non-zero, without a traceback."""

import errno
import os
from pathlib import Path


class VitError(Exception):
    """A mistake the user can fix: bad config, missing file, wrong checkpoint. The message says what, where and how."""


class DatasetNotFound(VitError):
    """The dataset is not where the config's data.root says. `what` is the message without its advice, which names
    config keys: `vit eval`, which takes none, gives its --data-root instead."""

    def __init__(self, message: str, what: str | None = None):
        super().__init__(message)
        self.what = what or message


class BadData(VitError):
    """An image or file of the dataset that could not be read in the middle of a run: training keeps what it had
    done and says how to go on once the file is fixed (vitcli.train)."""


def own_line(error: VitError) -> str:
    """A VitError's message; raised in a DataLoader worker, torch wraps it in the worker's traceback: its own line."""
    message = str(error)
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1].split("VitError: ", 1)[-1]
    return message


class OtherRankFailed(Exception):
    """Under torchrun: rank 0 hit a VitError and says so in one line; the other ranks stop without a word."""


class Interrupted(Exception):
    """Training was stopped by Ctrl-C / SIGTERM after `last.pt` was written."""


def short(text: str, limit: int = 160) -> str:
    """A library's error text for our one line: its first line, cut at a word boundary with "..." past `limit`."""
    first = (text.strip().splitlines() or [""])[0]
    return first if len(first) <= limit else first[:limit].rsplit(" ", 1)[0] + "..."


def not_a_file(path, what: str, *patterns: str) -> str:
    """The one line for a path that does not name a file: a directory (with the files in it that would do: names
    or glob patterns, the first one the example), something else that is there (a FIFO), or nothing at all."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        found = sorted({p.name for pattern in patterns for p in path.glob(pattern) if p.is_file()})[:3]
        hint = f" ({', '.join(found)} in it)" if found else " (it holds no such file)"
        return f"{path} is a directory; pass the {what} itself, e.g. {path / patterns[0]}{hint}"
    if path.exists():  # a FIFO, a device: there, but no file to read (it said "not found")
        return f"{path} is not a regular file; pass the {what} itself"
    return f"{what} not found: {path}"


def write_problem(path, error: BaseException) -> tuple[str, bool]:
    """What stopped a write to `path`, and whether it is a lack of space (where freeing disk space helps): a file
    where a folder of the path should be is named as such ('File exists' / 'Not a directory' said nothing)."""
    for parent in Path(path).parents:
        if os.path.islink(parent) and not os.path.exists(parent):
            return f"{parent} is a broken link", False
        if os.path.lexists(parent) and not os.path.isdir(parent):
            return f"{parent} is a file, not a folder", False
    code = getattr(error, "errno", None)
    return getattr(error, "strerror", None) or str(error), code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def vit_program() -> str:
    """How the commands vit prints (resume, evaluate) start vit: `vit` where that name on PATH is the vit this
    process runs as, else the path the user ran (`.venv/bin/vit` without an activated venv), or this Python with
    `-m vitcli`. The processes `vit train --nproc` starts get their launcher's (VIT_PROGRAM). Needs no torch
    import."""
    import os
    import shlex
    import shutil
    import sys

    if os.environ.get("VIT_PROGRAM"):
        return os.environ["VIT_PROGRAM"]
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "vit":  # the console script
        on_path = shutil.which("vit")
        if on_path and os.path.abspath(on_path) == os.path.abspath(argv0):
            return "vit"
        return shlex.quote(argv0)
    python = shutil.which("python")
    same = python and os.path.abspath(python) == os.path.abspath(sys.executable)
    return f"{'python' if same else shlex.quote(sys.executable)} -m vitcli"


def is_rank_zero() -> bool:
    """False in the processes of a torchrun / `--nproc` run other than rank 0, which say nothing of a stop (rank 0
    speaks for the run). Needs no torch import."""
    import os

    return os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1"


def out_of_memory(error: BaseException) -> str | None:
    """For an allocation failure (torch.OutOfMemoryError on a GPU, the CPU allocator's RuntimeError, MemoryError, a
    tensor size past 2**63), a short "tried to allocate ..." phrase; None for any other error. Needs no torch
    import."""
    import re

    gpu = any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__)
    text = str(error)
    if isinstance(error, MemoryError):  # the C++ allocator's std::bad_alloc, for sizes past what can be mapped
        return "more than the machine can map"
    if ("Storage size calculation overflowed" in text and isinstance(error, RuntimeError)
            or "Overflow when unpacking long" in text and isinstance(error, TypeError)):
        return "a tensor too large to address"
    if not gpu and not (isinstance(error, RuntimeError) and "can't allocate memory" in text):
        return None
    found = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]i?B|\d+ bytes)", text)
    if not found:
        return "tried to allocate more than the device has"
    size = found.group(1)
    if size.endswith(" bytes"):
        n = int(size.split()[0])
        size = f"{n} bytes"
        for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
            if n >= 2**shift:
                size = f"{n / 2**shift:.1f} {unit}"
                break
    return f"tried to allocate {size}"


def names_a_folder(where: str) -> bool:
    """An output path given as a folder: ending in / (a folder to make; Typer's Path would drop the slash) or
    naming one that exists."""
    return where.endswith(("/", os.sep)) or Path(where).is_dir()
