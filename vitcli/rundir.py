"""Run directories and resuming: the folder a run writes into, and which checkpoint a resume may continue (and with
which changes)."""

from __future__ import annotations

import os
import re
import shlex
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from vitcli.checkpoint import atomic_write, check_writable, load_checkpoint
from vitcli.config import Config, build_config, read_yaml
from vitcli.errors import VitError, vit_program

# Keys that may differ on --resume: most change where or how fast the run computes, not what; train.epochs extends
# it (the cosine schedule is stretched over the new total, as the README says); the optimisation settings let a run
# whose loss diverged continue from its last checkpoint (`fit` notes from which step they apply).
OPTIMISATION_CHANGES = ("lr", "min_lr", "grad_clip")
RESUMABLE_CHANGES = {("train", "epochs"), ("train", "device"), ("data", "num_workers"), ("data", "root"),
                     ("train", "checkpoint_every"), ("data", "download"), ("train", "eval_batch_size"),
                     ("train", "compile"), ("train", "compile_mode"), ("train", "grad_accum_steps"),
                     ("train", "eval_every")} | {("train", key) for key in OPTIMISATION_CHANGES}


RESOLVED = ("image_size", "mean", "std", "crop_padding", "hflip")  # data keys that a Config resolves when null


def resume_sets(saved: Config, config: Config, leave_out: Sequence[str] = ()) -> list[str]:
    """`--set` arguments (shell-quoted) that make a resume of a checkpoint saved with `saved` continue with `config`:
    the resumable keys where they differ, except the dotted keys in `leave_out`."""
    old_d, new_d = saved.to_dict(), config.to_dict()
    sets = []
    for section, key in sorted(RESUMABLE_CHANGES):
        value = new_d[section][key]
        if value != old_d[section][key] and f"{section}.{key}" not in leave_out:
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()
            sets.append(f"--set {shlex.quote(f'{section}.{key}={text}')}")
    return sets


def resume_command_line(path: Path) -> str:
    """`vit train --resume PATH`, with `--nproc N` when this process is one of N on this machine (`--nproc` or a
    one-node torchrun): the command that continues the run as it runs now. Across nodes, relaunch as before."""
    command = f"{vit_program()} train --resume {shlex.quote(str(path))}"
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:
            command += f" --nproc {world}"
    except ValueError:
        pass
    return command


_LOCKED_RUN_DIRS: list[int] = []  # open until the process ends, which releases their locks


def lock_run_dir(run_dir: Path) -> None:
    """An exclusive lock on the run directory for the rest of the process: a second `vit train` writing into it
    (a resume started while the run still goes) is one error, not two processes writing over each other's
    last.pt and metrics. flock on the folder itself, so no lock file is left behind, and the lock ends with the
    process however it ends. Where the file system has no such locks (some network file systems), none is taken."""
    try:
        import fcntl
    except ImportError:  # not on POSIX
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise VitError(f"run directory {run_dir} is in use by another vit process (the run, or a resume of it, is "
                       f"still going); wait for it to end or stop it (Ctrl-C saves last.pt), then resume; a new run "
                       f"goes in another --run-dir") from None
    except OSError:
        os.close(fd)
        return
    _LOCKED_RUN_DIRS.append(fd)


def default_run_dir(config: Config) -> Path:
    """runs/NAME/YYYYmmdd-HHMMSS, made here (empty) so that it is this run's alone: a second run of the recipe
    started in the same second (a seed sweep started with &) gets ...-HHMMSS-2, not an error (as timm's get_outdir
    adds -1, -2). Where the folder cannot be made, the plain name is returned for prepare_run_dir to report."""
    base = Path("runs") / config.name / datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return base
    for n in range(1, 1000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()  # atomic: of two processes only one makes it
            return candidate
        except FileExistsError:
            continue
        except OSError:
            return candidate
    return base


def run_folder_config(run_dir: Path) -> Optional[Config]:
    """The config in a run directory's config.yaml; None where there is none to read: missing, unreadable, empty, or
    not a vit config (a project's own config.yaml, a file edited by hand into something else)."""
    path = run_dir / "config.yaml"
    try:
        raw = read_yaml(path)
        return build_config(raw, source=str(path), saved=True) if raw else None
    except (VitError, OSError):
        return None


def prepare_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise VitError(f"run directory {run_dir} is a file, not a folder; choose another --run-dir")
    if run_dir.exists() and any(run_dir.iterdir()):
        if run_folder_config(run_dir) is None:  # not a run's folder (., ~, runs/, a project): never advise deleting
            raise VitError(f"run directory {run_dir} already holds files and is not a vit run (no config.yaml of a "
                           f"vit run); choose a new or empty --run-dir, such as {run_dir / 'my-run'}")
        if not (run_dir / "last.pt").exists():  # e.g. a run that failed before its first checkpoint
            raise VitError(f"run directory {run_dir} already holds files but no last.pt to resume (a run that "
                           f"stopped before its first checkpoint?); delete it or choose another --run-dir")
        raise VitError(f"run directory {run_dir} already holds files; choose another --run-dir, or resume it "
                       f"with: {resume_command_line(run_dir / 'last.pt')}")
    check_writable(run_dir, f"to run directory {run_dir}", "choose a writable --run-dir", keep=True)


def config_changes(saved: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each setting that differs, the name first; the data keys a Config resolves
    when left open (null) compared as resolved (data.hflip=true for synthetic data is no change)."""
    old_d, new_d = saved.to_dict(), new.to_dict()
    changes = [("name", old_d["name"], new_d["name"])] if old_d["name"] != new_d["name"] else []
    for section in ("data", "model", "train"):
        for key, value in new_d[section].items():
            old = old_d[section][key]
            if section == "data" and key in RESOLVED:
                old, value = getattr(saved, key), getattr(new, key)
            if value != old:
                changes.append((f"{section}.{key}", old, value))
    return changes


def run_changes(saved: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """config_changes that would make `new` another run than `saved`: all but RESUMABLE_CHANGES."""
    return [change for change in config_changes(saved, new)
            if tuple(change[0].split(".")) not in RESUMABLE_CHANGES]


def as_yaml(value: Any) -> str:
    """A config value as the YAML a user writes: false, null, [0.5, 0.5]."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def check_resume_overrides(saved: Config, new: Config, path: Path) -> None:
    changes = run_changes(saved, new)
    if changes and changes[0][0] == "name":
        raise VitError(f"--resume {path}: name differs from the checkpoint's")
    if changes:
        key, old, value = changes[0]
        raise VitError(f"--resume {path}: changing {key} from {as_yaml(old)} to {as_yaml(value)} would silently "
                       f"alter the run; only {', '.join(sorted(f'{s}.{k}' for s, k in RESUMABLE_CHANGES))} may "
                       f"change on resume; start a new run instead")
    if new.train.epochs < saved.train.epochs:
        raise VitError(f"--resume {path}: train.epochs may grow on resume, not shrink "
                       f"({saved.train.epochs} -> {new.train.epochs})")


def write_config_yaml(run_dir: Path, config: Config) -> None:
    """config.yaml, atomically: a resume reads it to tell its run from another's (check_resumable)."""
    text = config.to_yaml().encode()
    atomic_write(run_dir / "config.yaml", lambda f: f.write(text), "config", "free disk space or check the run "
                 "directory's permissions")


def keep_edited_config(run_dir: Path, saved: Config, config: Config) -> Optional[str]:
    """A resumed run rewrites config.yaml with the config it continues with (`config`: the checkpoint's, `saved`,
    changed by --set). Where the file was edited by hand (--resume does not read it) and the run will not have an
    edit, or comments were added to it, it is first copied to config.edited.yaml (-2, -3, ... where that exists);
    returns the note that says so, or None."""
    path = run_dir / "config.yaml"
    try:
        data = path.read_bytes()
    except OSError:
        return None  # check_resumable found it; gone since: nothing to keep
    edited = run_folder_config(run_dir)  # None: not a config any more (broken YAML, an unknown key): kept all the same
    first, commented = None, False
    if edited is not None:
        # the first setting edited in the file (it differs from the checkpoint's) that the run will not have
        edits = {key for key, _, _ in config_changes(saved, edited)}
        first = next((change for change in config_changes(edited, config) if change[0] in edits), None)
        commented = added_comments(data.decode(errors="replace"), saved.to_yaml())
        if first is None and not commented:  # no edit, or each one given again with --set: nothing is lost
            return None
    copy, n = run_dir / "config.edited.yaml", 1
    while os.path.lexists(copy):
        n += 1
        copy = run_dir / f"config.edited-{n}.yaml"
    atomic_write(copy, lambda f: f.write(data), "config", "free disk space or check the run directory's permissions")
    what = (f"({first[0]} {as_yaml(first[1])} there, {as_yaml(first[2])} in the run)" if first else
            "(comments added: the rewritten file has none)" if commented else "(it is not a config vit can read)")
    return (f"vit: note: {path} was edited {what}; --resume does not read it: the run continues with its "
            f"checkpoint's config and the --set changes given, and the edited file is kept as {copy.name} (change a "
            f"setting with --resume ... --set section.key=value)")


def added_comments(text: str, written: str) -> bool:
    """Whether config.yaml as it is (`text`) has lines with a comment that the file vit wrote (`written`) has not:
    notes a user keeps beside the run's settings, which a rewrite would drop."""
    ours = set(written.splitlines())
    # a comment starts a line or follows a space; a # inside a value (root: /data/ds#1) is part of the value
    return any(re.search(r"(^|\s)#", line) and line not in ours for line in text.splitlines())


def check_resumable(ckpt: dict[str, Any], path: Path) -> None:
    """A resumed run writes into the checkpoint's folder: refuse where that would lose or scatter anything."""
    new_run = ("start a new run from its weights instead with --config ... --set "
               f"model.init_from={shlex.quote(str(path))}")
    if ckpt.get("optimizer") is None:
        raise VitError(f"--resume {path}: it holds weights only (written by vit convert), no training state; "
                       f"{new_run}")
    if not (path.parent / "config.yaml").is_file():
        if (path.parent / "metrics.jsonl").is_file():  # its run directory, from which config.yaml went
            config_yaml = shlex.quote(str(path.parent / "config.yaml"))
            raise VitError(f"--resume {path}: no config.yaml beside it, in what looks like its run directory "
                           f"(metrics.jsonl is there); if it was deleted, write it back from the checkpoint with: "
                           f"{vit_program()} train --resume {shlex.quote(str(path))} --print-config > {config_yaml}"
                           f" (then resume), or {new_run}")
        raise VitError(f"--resume {path}: it is not in its run directory (no config.yaml beside it), where a "
                       f"resumed run writes; resume it inside a copy of the whole run directory, or {new_run}")
    another = (f"resuming it here would write over that run's files; resume it inside a copy of its own run "
               f"directory, or {new_run}")
    # the run the folder holds: config.yaml is the config of its last.pt (None, unreadable or emptied by hand: the
    # checks below still hold)
    folder_config = run_folder_config(path.parent)
    changes = run_changes(ckpt["config"], folder_config) if folder_config is not None else []
    if changes:
        key, mine, theirs = changes[0]
        raise VitError(f"--resume {path}: the config.yaml beside it is another run's ({key} {as_yaml(theirs)}, "
                       f"the checkpoint's {as_yaml(mine)}); {another}")
    last = path.parent / "last.pt"
    if last.is_file() and not last.samefile(path):
        beside = load_checkpoint(last)
        if beside.get("run_id") and ckpt.get("run_id") and beside["run_id"] != ckpt["run_id"]:
            raise VitError(f"--resume {path}: the last.pt beside it is another run's; {another}")
        later = beside["global_step"]
        if later > ckpt["global_step"]:
            raise VitError(f"--resume {path}: the run went on to step {later} ({last}); resuming from step "
                           f"{ckpt['global_step']} would overwrite that. Resume from {last}, or copy the run "
                           f"directory first to branch off at this point")


def resume_config(resume: Path, overrides: Sequence[str] = (),
                  check_folder: bool = True) -> tuple[dict[str, Any], Config]:
    """The checkpoint and the config a resumed run continues with: the saved config plus the `--set` changes that
    keep it the same run (any other change is one clear error). `check_folder=False` (--print-config, which writes
    nothing): also where the run directory would refuse the resume, so that a deleted config.yaml can be rebuilt."""
    ckpt = load_checkpoint(resume, example="last.pt")
    if check_folder:
        check_resumable(ckpt, Path(resume))
    config = build_config(ckpt["config"].to_dict(), overrides, source=f"{resume} + --set", saved=True)
    check_resume_overrides(ckpt["config"], config, resume)
    return ckpt, config
