"""The `vit` command. Thin commands that hand off to library code; torch is imported only inside command bodies,
so `vit --help` stays instant."""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Train, evaluate and use Vision Transformers.")
STATE = {"debug": False}

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML recipe, e.g. configs/cifar10.yaml.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="K=V", help="Override a config key: section.key=value (value parsed as YAML). Repeatable.")]
CkptOpt = Annotated[Optional[Path], typer.Option(
    "--ckpt", help="Checkpoint (best.pt / last.pt). Default: best.pt of the newest run under runs/.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
TtaOpt = Annotated[Optional[bool], typer.Option(
    "--tta/--no-tta", help="Average each image's prediction with its mirror image's (test-time augmentation). "
    "Default: the checkpoint's train.eval_hflip.")]


def err(message: str) -> None:
    typer.echo(f"vit: {message}", err=True)


def user_path(value):
    """A path option with '~' expanded, as the shell does not after '=' (--out=~/m.onnx made a folder named ~)."""
    if value is None:
        return None
    # os.path's: Path.expanduser raises on ~typo (no such user); this leaves it, for "not found" to say
    return os.path.expanduser(value) if isinstance(value, str) else Path(os.path.expanduser(value))


def check_new_out(target: Path, what: str) -> None:
    """Before the work: the file `--out` names is not there (a broken link neither: writing would replace the
    link; nothing is overwritten) and its folder takes a file."""
    from vitcli.checkpoint import check_writable
    from vitcli.errors import VitError

    if os.path.lexists(target):
        raise VitError(f"{target} exists; choose another --out (nothing is overwritten)")
    check_writable(target.parent, f"{what} {target}", "choose another --out")


def path_option(value: Optional[str], option: str) -> Optional[Path]:
    """An option's path; an empty one ('' would be the current folder) is refused in one line."""
    from vitcli.errors import VitError

    if value is not None and not value.strip():
        raise VitError(f"{option} is empty ('{value}'); give a path")
    return Path(value) if value is not None else None


def leave_process_group() -> None:
    """Under torchrun, a run leaves the process group before it exits, after dropping what the run held
    (DistributedDataParallel's reducer, which holds the group): left to interpreter teardown, they aborted the
    process ('terminate called without an active exception', SIGABRT) in about a third of the runs that ended early
    (a user error, a stop), so the launcher saw a crash instead of the one-line error's exit 2, and now and then
    after a run that finished (the group destroyed with the reducer still alive)."""
    dist = sys.modules.get("torch.distributed")  # loaded only by a run under torchrun: nothing to import here
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    traceback.clear_frames(sys.exc_info()[2])  # the failed run's locals, while the group they use is still there
    gc.unfreeze()  # the model and DDP wrapper were frozen with the start-up's objects (runtime.settle)
    gc.collect()
    try:
        dist.destroy_process_group()
    except Exception:  # the others may be gone already; leaving is all that is wanted
        pass


def run_command(body: Callable[[], int | None]) -> None:
    """Runs a command body: user errors become one line and a non-zero exit; --debug shows the traceback."""
    from vitcli.errors import Interrupted, OtherRankFailed, VitError, is_rank_zero, out_of_memory, own_line

    gc.disable()  # for the start-up's imports; vitcli.runtime.settle() turns collection on when the work starts
    try:
        try:
            code = body() or 0
        finally:
            leave_process_group()
            # what is left is for the exit: without this the interpreter's collections at exit go over every
            # object torch's compiler made (1.5 s after a compiled `vit train` on a 2-core CPU)
            gc.freeze()
    except OtherRankFailed:
        raise typer.Exit(2)
    except VitError as e:
        if STATE["debug"]:
            traceback.print_exc()
        err(f"error: {own_line(e)}")
        raise typer.Exit(2)
    except (RuntimeError, MemoryError, TypeError) as e:  # running out of memory is a size the user chose; anything
        # else is our bug
        what = out_of_memory(e)
        if what is None:
            raise
        if STATE["debug"]:
            traceback.print_exc()
        err(f"error: out of memory ({what}); lower the batch size (train.batch_size, train.eval_batch_size "
            f"or vit eval's --batch-size), data.image_size or the model size")
        raise typer.Exit(2)
    except BrokenPipeError:  # whoever read the output stopped (vit eval | head -1): nothing to report
        quiet_stdout()
        raise typer.Exit(141)  # 128 + SIGPIPE, as a command killed by the broken pipe
    except OSError as e:  # a path the user gave that cannot be written or read: permissions, a full disk, ...
        if STATE["debug"]:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        err(f"error: {where}{e.strerror or e}; check the path, its permissions and the free disk space")
        raise typer.Exit(2)
    except Interrupted as e:
        from vitcli.rundir import resume_command_line  # torch is loaded already: a run was interrupted

        if is_rank_zero():
            err(f"interrupted; the run is saved in {e}. Continue it with: {resume_command_line(Path(str(e)))}")
        raise typer.Exit(130)
    except KeyboardInterrupt:
        err("interrupted")
        raise typer.Exit(130)
    raise typer.Exit(code)


def check_device_option(device: Optional[str]) -> None:
    from vitcli.config import device_name_ok
    from vitcli.errors import VitError

    if device is not None and not device_name_ok(device):
        raise VitError(f"--device {device}: must be auto, cpu, cuda, cuda:N or mps")


def check_device_there(device: Optional[str]) -> None:
    """--device, where given, is on this machine: else one line naming the option as typed (train and bench would
    name the config key, train.device=...)."""
    if device is not None:
        from vitcli.runtime import resolve_device

        resolve_device(device, f"--device {device}")


def checkpoint_device(device: Optional[str], config):
    """eval / predict: --device (one line where it is not there), else the checkpoint's train.device, else, where
    that is not here (a run trained with --device cuda, used on a laptop), auto with a note."""
    from vitcli.errors import VitError
    from vitcli.runtime import resolve_device

    if device:
        return resolve_device(device, f"--device {device}")
    try:
        return resolve_device(config.train.device)
    except VitError:
        dev = resolve_device("auto")
        err(f"note: the checkpoint's run trained on train.device={config.train.device}, which is not here; running "
            f"on {dev} (choose with --device)")
        return dev


def find_latest_checkpoint(runs: Path = Path("runs")) -> Path:
    from vitcli.errors import VitError

    found = sorted(runs.glob("**/best.pt"), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
    if not found:
        raise VitError("no checkpoint given and none found under runs/; train one with "
                       "'vit train --config configs/smoke.yaml' or pass --ckpt PATH")
    err(f"using the newest checkpoint: {found[-1]}")
    return found[-1]


def _tta_choice(tta: Optional[bool], config) -> bool:
    """--tta / --no-tta, else the checkpoint's train.eval_hflip; a note when the model never saw mirror images."""
    if tta is None:
        return config.train.eval_hflip
    if tta and not config.hflip:
        err("note: --tta with a model trained without mirrored images (data.hflip off): its mirror-image "
            "predictions may be worse than its plain ones")
    return tta


def _inference_model(checkpoint: dict, path: Path, no_ema: bool, dev, precision: str):
    """The checkpoint's model on `dev` for vit eval and vit predict: in fp32 on a CPU with its conv stem in
    channels-last layout (VisionTransformer.channels_last_stem says why there only)."""
    from vitcli.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(checkpoint, path, use_ema=not no_ema).to(dev)
    if dev.type == "cpu" and precision == "fp32":
        model.channels_last_stem()
    return model


def _resolve_ckpt(ckpt: Optional[Path]) -> Path:
    return user_path(ckpt) if ckpt is not None else find_latest_checkpoint()


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    STATE["debug"] = debug


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe, e.g. configs/cifar10.yaml.")] = None,
    set_: SetOpt = None,
    run_dir: Annotated[Optional[str], typer.Option("--run-dir", help="Exactly this run directory "
                                                    "(default runs/<name>/<timestamp>).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run of this checkpoint "
                                                   "(its last.pt), in its run directory.")] = None,
    device: DeviceOpt = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config as YAML and "
                                               "exit.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="Launch N processes on this machine with torchrun "
                                       "(DistributedDataParallel).")] = 1,
) -> None:
    """Train a ViT from a YAML recipe; TensorBoard logs and checkpoints go to the run directory."""

    resume = user_path(resume)

    def body():
        from vitcli.config import load_config
        from vitcli.errors import VitError

        check_device_option(device)
        run_path = path_option(user_path(run_dir), "--run-dir")
        overrides = list(set_ or []) + ([f"train.device={device}"] if device else [])
        if resume is None and config is None:
            raise VitError("give --config PATH (e.g. configs/smoke.yaml) or --resume CKPT")
        if resume is not None and config is not None:
            raise VitError("--resume continues a run with the config saved in its checkpoint; drop --config "
                           "(use --set train.epochs=N to extend it)")
        if resume is not None and run_dir is not None:
            raise VitError("--resume continues in the checkpoint's own run directory; drop --run-dir (to start a "
                           "new run from its weights: --config ... --set model.init_from=CKPT)")
        cfg = load_config(config, overrides) if config is not None else None
        if print_config:
            if cfg is None:  # what the resumed run would use: the saved config with the allowed --set changes
                from vitcli.rundir import resume_config

                cfg = resume_config(resume, overrides, check_folder=False)[1]
            typer.echo(cfg.to_yaml(), nl=False)
            return 0
        if nproc < 1:
            raise VitError(f"--nproc {nproc}: the number of processes must be 1 or more")
        if nproc > 1:
            from vitcli.runtime import check_ddp_devices
            from vitcli.rundir import resume_config

            run_cfg = cfg if cfg is not None else resume_config(resume, overrides)[1]
            if nproc > run_cfg.train.batch_size:  # a multiple of 10^20 was the advice
                raise VitError(f"--nproc {nproc}: more processes than train.batch_size {run_cfg.train.batch_size}, "
                               f"the global batch they split; use one process per GPU (or a few on a CPU), a number "
                               f"that divides {run_cfg.train.batch_size}")
            if run_cfg.train.batch_size % nproc:
                raise VitError(f"train.batch_size {run_cfg.train.batch_size} does not divide over {nproc} "
                               f"processes; use a multiple of {nproc}")
            check_ddp_devices(run_cfg.train.device, nproc)  # here, once, not as each process's traceback
            from vitcli.runtime import check_model_fits, resolve_device

            check_model_fits(run_cfg, resolve_device(run_cfg.train.device))  # once, not as one line per process
            if cfg is not None:  # a resumed run does not read model.init_from
                from vitcli.interop import check_init_from

                check_init_from(run_cfg)  # once, not as one line per process
            from vitcli.runtime import launch_torchrun

            return launch_torchrun(nproc, sys.argv[1:])
        from vitcli.runtime import tune_malloc
        from vitcli.train import fit

        check_device_there(device)
        tune_malloc()
        fit(cfg, run_dir=run_path, resume=resume, resume_overrides=tuple(overrides))
        return 0

    run_command(body)


@app.command("eval")
def eval_(
    ckpt: CkptOpt = None,
    data_root: Annotated[Optional[str], typer.Option("--data-root", help="Dataset folder, if not the one "
                                                     "trained on.")] = None,
    split: Annotated[str, typer.Option("--split", help="test (an image folder's test/ where it has one, else "
                                       "its val/), val or train.")] = "test",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Evaluation batch size (halved where "
                                                                    "it runs out of memory).")] = None,
    device: DeviceOpt = None,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Use the raw weights even if the checkpoint has "
                                         "EMA weights.")] = False,
    report_dir: Annotated[Optional[str], typer.Option(
        "--report", help="Write a confusion matrix, per-class accuracy chart, the most confident mistakes and "
        "report.json to this folder.")] = None,
    tta: TtaOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Loss, top-1, top-5 and per-class accuracy of a checkpoint on the test split."""

    report_dir = user_path(report_dir)

    def body():
        import dataclasses

        from vitcli.checkpoint import load_checkpoint
        from vitcli.data import Preprocess, eval_batches, split_name
        from vitcli.errors import DatasetNotFound, VitError, out_of_memory
        from vitcli.evaluate import check_same_classes, evaluate, largest_batch_that_fits
        from vitcli.interop import placeholder_classes
        from vitcli.runtime import resolve_precision, settle, tune_malloc

        settle()
        tune_malloc()
        path = _resolve_ckpt(ckpt)
        checkpoint = load_checkpoint(path)
        config = checkpoint["config"]
        path_option(data_root, "--data-root")
        if data_root is not None and config.data.dataset == "synthetic":
            err("note: --data-root is not read: this checkpoint was trained on synthetic data, made in memory")
        elif data_root is not None:
            config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=data_root,
                                                                          download=False))
        if batch_size is not None and batch_size <= 0:
            raise VitError(f"--batch-size must be positive, got {batch_size}")
        report = path_option(report_dir, "--report")
        if report is not None:  # before the evaluation, not after it
            from vitcli.visualize import check_report_folder

            check_report_folder(report)
        dev = checkpoint_device(device, config)
        precision = resolve_precision(config.train.precision, dev)
        model = _inference_model(checkpoint, path, no_ema, dev, precision)
        try:
            classes, n, batches, whole = eval_batches(config, split, dev, batch_size or config.train.eval_batch_size)
        except DatasetNotFound as e:  # the checkpoint's data.root is from where it was trained
            debian = (" (Debian's dataset-fashion-mnist puts it in /usr/share/datasets/fashion-mnist)"
                      if config.data.dataset == "fashion_mnist" else "")
            raise VitError(f"{e.what}; give the dataset's folder with --data-root DIR{debian}") from None
        if checkpoint["classes"] == placeholder_classes(len(classes)):  # vit convert without --classes
            err(f"note: {path} names its classes class_0...; using the dataset's names")
        else:
            check_same_classes(classes, checkpoint["classes"], config, split)
        mistakes = None
        hflip = _tta_choice(tta, config)

        def run(size: int) -> dict:
            nonlocal mistakes
            if report is not None:
                from vitcli.visualize import Mistakes

                mistakes = Mistakes()  # a retry collects afresh
            return evaluate(model, lambda: batches(size), Preprocess(config, dev, train=False), classes, dev,
                            precision, on_batch=mistakes, hflip=hflip)

        def smaller(size: int, half: int, what: str) -> None:
            err(f"note: out of memory at batch size {size} ({what}); evaluating at {half}")

        # the largest batch that fits, from --batch-size (or the run's train.eval_batch_size) down
        try:
            start = min(batch_size or config.train.eval_batch_size, max(n, 1))  # the size eval_batches runs
            result, used = largest_batch_that_fits(run, start, smaller)
        except (RuntimeError, MemoryError) as e:
            what = out_of_memory(e)
            if what is None:
                raise
            raise VitError(f"out of memory ({what}) at batch size 1 on {dev}; evaluate a smaller model or "
                           f"data.image_size, or on a device with more memory") from None
        result["tta_hflip"] = hflip
        result["batch_size"] = used
        synthetic = config.data.dataset == "synthetic"
        scored = split_name(split, config.data.dataset, config.data_root)
        about = {"checkpoint": str(path), "split": scored, "dataset": config.data.dataset,
                 **({"synthetic": True} if synthetic else {})}
        if report is not None:  # which checkpoint and split it scored, as --json says
            from vitcli.visualize import eval_report

            written = eval_report(classes, {**result, **about}, mistakes, report)
            err(f"report written: {', '.join(str(p) for p in written)}")
        result.pop("confusion")
        if json_:
            typer.echo(json.dumps({**result, **about}))
        else:
            tag = " [SYNTHETIC DATA]" if synthetic else ""
            mode = ", each with its mirror image (--tta)" if hflip else ""
            key = "max_train_samples" if split == "train" else "max_val_samples"
            cut = f" (of the split's {whole}, limited by the run's data.{key})" if whole is not None else ""
            typer.echo(f"{path} on {config.data.dataset} {scored}{tag}: {result['num_samples']} "
                       f"image{'' if result['num_samples'] == 1 else 's'}{cut}{mode}")
            single = f"  (single view: top-1 {result['top1_single_view']:.4f})" if hflip else ""
            top = min(5, len(classes))  # (the top5 key of --json too: all classes where there are fewer)
            typer.echo(f"top-1 {result['top1']:.4f}  top-{top} {result['top5']:.4f}  loss {result['loss']:.4f}{single}")
            width = max(len(c) for c in result["per_class"]) if result["per_class"] else 0
            for name, acc in result["per_class"].items():
                typer.echo(f"  {name:<{width}}  {acc:.4f}")
        return 0

    run_command(body)


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files or folders of images.")],
    ckpt: CkptOpt = None,
    top_k: Annotated[Optional[int], typer.Option(
        "--top-k", "-k", help="How many classes to show (default 5, or all of fewer).", show_default=False)] = None,
    device: DeviceOpt = None,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Use the raw weights even if the checkpoint has "
                                         "EMA weights.")] = False,
    attention: Annotated[Optional[str], typer.Option(
        "--attention", help="Write the image with its attention heat map to this picture (.png, .jpg, .pdf, .svg, "
        "...; a folder, DIR/, for several images).")] = None,
    attention_mode: Annotated[str, typer.Option(
        "--attention-mode", help="rollout (all layers, Abnar & Zuidema 2020) or last (class token, last "
        "layer).")] = "rollout",
    tta: TtaOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Top-k classes for each image, optionally with its attention map."""

    images, attention = [user_path(image) for image in images], user_path(attention)

    def body():
        from vitcli.checkpoint import load_checkpoint
        from vitcli.errors import VitError
        from vitcli.predict import attention_outputs, expand_inputs, image_to_tensor, open_image, write_attention
        from vitcli.predict import predict as run_predict
        from vitcli.runtime import resolve_precision, settle

        settle()
        if top_k is not None and top_k <= 0:
            raise VitError(f"--top-k must be positive, got {top_k}")
        if attention_mode not in ("rollout", "last"):
            raise VitError(f"--attention-mode must be rollout or last, got {attention_mode!r}")
        path_option(attention, "--attention")
        path = _resolve_ckpt(ckpt)
        checkpoint = load_checkpoint(path)
        config, classes = checkpoint["config"], checkpoint["classes"]
        dev = checkpoint_device(device, config)
        precision = resolve_precision(config.train.precision, dev)
        model = _inference_model(checkpoint, path, no_ema, dev, precision)
        hflip = _tta_choice(tta, config)
        if top_k is not None and top_k > len(classes):  # the default, 5, shows all of fewer classes silently
            err(f"note: --top-k {top_k} is more than the checkpoint's {len(classes)} classes: showing all "
                f"{len(classes)}")
        k = top_k or 5
        # before the predictions, so that an image's error stays the last line; not for weights `vit convert` made
        # with a synthetic config (trained elsewhere)
        if config.data.dataset == "synthetic" and "converted_from" not in (checkpoint.get("metrics") or {}):
            err("note: this checkpoint was trained on SYNTHETIC data")
        paths, empty_folders = expand_inputs(images)
        for problem in empty_folders:
            err(f"error: {problem}")
        results, failures = [], len(empty_folders)
        attention_paths = attention_outputs(attention, paths) if attention is not None else {}
        for image_path in paths:
            try:
                image = open_image(image_path)
                tensor = image_to_tensor(image, config)
            except VitError as e:
                err(f"error: {e}")
                failures += 1
                continue
            predictions = run_predict(model, config, classes, tensor[None], dev, precision, k, hflip=hflip)[0]
            entry = {"path": str(image_path), "predictions": predictions}
            if attention is not None:
                entry["attention"] = str(write_attention(model, config, tensor, dev, attention_mode,
                                                         attention_paths[image_path], image, predictions[0]))
            results.append(entry)
            if not json_:
                best = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in predictions)
                typer.echo(f"{image_path}: {best}" + (f"  (attention: {entry['attention']})" if attention else ""))
        if json_:
            typer.echo(json.dumps(results, indent=1))
        return 1 if failures else 0

    run_command(body)


EXPORT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts", "safetensors": ".safetensors"}  # vit export's formats


@app.command()
def bench(
    config: ConfigOpt,
    set_: SetOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="Timed train steps after warm-up.")] = 20,
    device: DeviceOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Images/s of the exact train step and eval forward of a config, on synthetic batches of its shape."""

    def body():
        from vitcli.bench import bench as run_bench
        from vitcli.config import load_config, unread_keys_note
        from vitcli.errors import VitError
        from vitcli.runtime import settle, tune_malloc

        settle()
        if steps <= 0:
            raise VitError(f"--steps must be positive, got {steps}")
        check_device_option(device)
        check_device_there(device)
        cfg = load_config(config, list(set_ or []) + ([f"train.device={device}"] if device else []))
        note = unread_keys_note(cfg)
        if note:
            typer.echo(note, err=True)
        tune_malloc()  # as `vit train` does, so that the figures are the training's
        result = run_bench(cfg, steps=steps)
        if json_:
            typer.echo(json.dumps(result))
        else:
            for key, value in result.items():
                shown = (f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}") if isinstance(value, float) else value
                typer.echo(f"{key:>26}: {shown}")
        return 0

    run_command(body)


@app.command()
def convert(
    weights: Annotated[Path, typer.Argument(help="State dict of a timm or torchvision ViT (.pth/.pt/.safetensors).")],
    from_: Annotated[str, typer.Option("--from", help="timm or torchvision.")],
    config: ConfigOpt,
    out: Annotated[str, typer.Option("--out", help="The vitcli checkpoint to write.")],
    set_: SetOpt = None,
    classes: Annotated[Optional[str], typer.Option(
        "--classes", help="Comma-separated class names (default: the config's dataset's, or class_0...).")] = None,
) -> None:
    """Turn a timm / torchvision ViT state dict into a vitcli checkpoint that eval and predict use."""

    weights, out = user_path(weights), user_path(out)

    def body():
        from vitcli.checkpoint import atomic_save
        from vitcli.config import load_config
        from vitcli.errors import VitError, names_a_folder
        from vitcli.interop import convert
        from vitcli.runtime import settle

        settle()
        if from_ not in ("timm", "torchvision"):
            raise VitError(f"--from must be timm or torchvision, got {from_!r}")
        path_option(out, "--out")
        if names_a_folder(out):
            raise VitError(f"--out {out}: a folder; give the checkpoint file to write, such as "
                           f"{Path(out) / (weights.stem + '.pt')}")
        check_new_out(Path(out), "checkpoint")
        cfg = load_config(config, list(set_ or []))
        checkpoint, parameters, source = convert(weights, from_, cfg, classes)
        atomic_save(checkpoint, out, fix="free disk space or choose another --out")
        err(f"wrote {out} ({parameters / 1e6:.2f}M parameters from {source})")
        return 0

    run_command(body)


@app.command()
def export(
    ckpt: CkptOpt = None,
    format_: Annotated[str, typer.Option("--format", help="onnx, torchscript or safetensors.")] = "onnx",
    out: Annotated[Optional[str], typer.Option(
        "--out", help="File to write; a folder (DIR/) for the checkpoint's name with the format's suffix.")] = None,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Export the raw weights instead of the EMA.")] = False,
) -> None:
    """Export a checkpoint: ONNX / TorchScript (normalized N x C x H x W in, logits out, dynamic batch) or
    safetensors (weights + config as metadata). The export is checked against PyTorch."""

    out = user_path(out)

    def body():
        from vitcli.checkpoint import load_checkpoint, model_from_checkpoint
        from vitcli.errors import VitError, names_a_folder
        from vitcli.interop import export as run_export
        from vitcli.runtime import settle

        settle()  # the exporters (ONNX's above all) make many short-lived objects
        if format_ not in ("onnx", "torchscript", "safetensors"):
            raise VitError(f"--format must be onnx, torchscript or safetensors, got {format_!r}")
        path_option(out, "--out")
        path = _resolve_ckpt(ckpt)
        default = path.with_suffix(EXPORT_SUFFIXES[format_])
        if out is None:
            target = default
        elif names_a_folder(out):
            target = Path(out) / default.name
        else:
            target = Path(out)
        check_new_out(target, f"the {format_} model")
        checkpoint = load_checkpoint(path)
        model = model_from_checkpoint(checkpoint, path, use_ema=not no_ema)
        diff = run_export(model, checkpoint["config"], checkpoint["classes"], format_, target)
        err(f"wrote {target} (max |logit difference| vs PyTorch {diff:.1e})")
        suffix, expected = target.suffix.lower(), EXPORT_SUFFIXES[format_]
        named = {suffix: fmt for fmt, suffix in EXPORT_SUFFIXES.items()}.get(suffix, format_)
        if named != format_:
            err(f"note: {target} is a {format_} file, although its name ends in {target.suffix} ({named}'s); "
                f"rename it, or export with --format {named}")
        elif suffix != expected and not (format_ == "torchscript" and suffix in (".pt", ".pth")):  # (jit's custom)
            ends = f"ends in {target.suffix}" + (" (a checkpoint's)" if suffix in (".pt", ".pth", ".ckpt") else "")
            err(f"note: {target} is a {format_} file, although its name {ends if suffix else 'has no suffix'}; "
                f"rename it to *{expected}, which tools (and vit's own messages) read as {format_}")
        return 0

    run_command(body)


def quiet_stdout() -> None:
    """Standard output that could not be written points at /dev/null from here: no second error at exit's flush."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass


def console_script() -> None:
    """The `vit` command: the app, with help or usage text that cannot be written (a full disk) ending in one line
    instead of a traceback. Typer itself exits 1 on a closed pipe there; command bodies handle theirs
    (run_command)."""
    try:
        app(prog_name="vit")
    except OSError as e:
        quiet_stdout()
        err(f"error: cannot write the output: {e.strerror or e}")
        sys.exit(1)
