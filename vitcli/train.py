"""fit(): the training run, around the step of vitcli.step; the learning-rate schedule."""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from vitcli.checkpoint import atomic_save, load_weights, make_checkpoint, rng_state, set_rng_state
from vitcli.config import Config, unread_keys_note
from vitcli.data import Preprocess, TrainBatches, eval_batches
from vitcli.errors import BadData, Interrupted, OtherRankFailed, VitError, out_of_memory, own_line, vit_program
from vitcli.evaluate import evaluate, largest_batch_that_fits, listed_classes, unicode_note
from vitcli.interop import init_weights
from vitcli.metrics import MetricsWriter, closed_on_error, log_pictures
from vitcli.model import build_model
from vitcli.rundir import (OPTIMISATION_CHANGES, default_run_dir, keep_edited_config, lock_run_dir, prepare_run_dir,
                           resume_command_line, resume_config, resume_sets, write_config_yaml)
from vitcli.runtime import (StopSignals, WorkersStopped, all_reduce_sum, barrier, check_model_fits,
                            evaluation_compile_mode, init_distributed, rank0_first, resolve_attention,
                            resolve_compile_mode, resolve_device, resolve_precision, settle, until_stopped)
from vitcli.step import EMA, Forward, TrainStep, make_optimizer


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup from lr/warmup_steps to lr, then cosine decay to min_lr; per optimizer step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def read_or_say(batches: Iterable) -> Iterator:
    """The batches, where reading one fails on a file of the dataset (a truncated image, a link to nothing): BadData,
    which the run answers by keeping its work and saying how to go on."""
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except BadData:
            raise
        except VitError as e:
            raise BadData(own_line(e)) from None
        yield item


@contextlib.contextmanager
def memory_errors(advice: Callable[[], str]):
    """Running out of memory (a batch or model too large for the device) becomes one VitError line with advice."""
    try:
        yield
    except (RuntimeError, MemoryError, TypeError) as e:
        what = out_of_memory(e)
        if what is None:
            raise
        raise VitError(f"out of memory ({what}) {advice()}") from None


def fit(config: Config, run_dir: Optional[Path] = None, resume: Optional[Path] = None,
        resume_overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Trains per `config` (or continues the checkpoint `resume`); returns the final metrics."""
    # ---- resume: the checkpoint's config, with only harmless changes allowed
    ckpt = None
    if resume is not None:
        ckpt, config = resume_config(resume, resume_overrides)
        run_dir = Path(resume).parent

    # ---- where and how to run
    dist_info, device_name = init_distributed(config.train.device)
    device = resolve_device(device_name)
    check_model_fits(config, device)
    precision = resolve_precision(config.train.precision, device)
    attention = resolve_attention(config.model.attention, device, precision)
    main = dist_info.is_main
    torch.manual_seed(config.train.seed)

    # ---- data (before the run directory exists, so a missing dataset leaves nothing behind); rank 0 first, so
    # that a download (data.download) into the shared folder happens once, and its error is the one line
    def load_data():
        train = TrainBatches(config, device, dist_info.rank, dist_info.world_size)
        val = eval_batches(config, "val", device, config.train.eval_batch_size, dist_info.rank, dist_info.world_size)
        if val.classes != train.classes:  # image folders: each split numbers its own class folders
            where = config.data_root
            missing = sorted(set(train.classes) - set(val.classes))
            extra = sorted(set(val.classes) - set(train.classes))
            raise VitError(f"{where}: the val split's class folders differ from train's (in train only: "
                           f"{missing or 'none'}; in val only: {extra or 'none'})"
                           f"{unicode_note(train.classes, val.classes)}; give val/ the same class folders as "
                           f"train/, so that each label means the same class in both")
        # a fixed set of validation images whose attention TensorBoard shows as it forms: the first evaluation
        # batch, so a file of it that cannot be read stops the run before anything is written
        watch = None
        if main:
            try:
                watch = next(iter(read_or_say(val.batches())))
            except BadData as e:
                raise VitError(f"{e} (in the validation images); fix or remove the file and run the command "
                               f"again") from None
            watch = (watch[0][:8], watch[1][:8])
        return train, val, watch

    train_data, val_data, watch = rank0_first(dist_info, load_data)
    num_val, val_batches = val_data.count, val_data.batches
    classes = train_data.classes
    if ckpt is not None and classes != ckpt["classes"]:  # renamed, added or removed class folders: each output
        # would go on to learn another class (or the head would not fit)
        raise VitError(f"--resume {resume}: the training data's classes in {config.data_root} "
                       f"({listed_classes(classes)}) are not the checkpoint's ({listed_classes(ckpt['classes'])})"
                       f"{unicode_note(classes, ckpt['classes'])}: its outputs would change meaning; resume with the "
                       f"data it trained on (its class folders as they were), or start a new run "
                       f"(--set model.init_from={resume} to start from its weights)")
    preprocess = Preprocess(config, device, train=True, rank=dist_info.rank, world_size=dist_info.world_size)
    preprocess.num_classes = len(classes)
    eval_preprocess = Preprocess(config, device, train=False)

    # ---- model, optimizer, EMA, gradient scaler
    model = build_model(config, len(classes)).to(device)
    model.set_fused_attention(attention == "fused")
    if config.model.init_from and ckpt is None:
        init_weights(model, config, main)
    optimizer = make_optimizer(model, config, device)
    ema = EMA(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if dist_info.rank:  # the same initial weights everywhere (above), then each rank its own dropout draws
        torch.manual_seed(config.train.seed + dist_info.rank)
    epoch, start_step, global_step, best_top1 = 0, 0, 0, -1.0
    epoch_stats = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "seconds": 0.0, "data_seconds": 0.0}
    if ckpt is not None:
        load_weights(model, ckpt["model"], resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None and ckpt["ema"] is not None:
            ema.module.load_state_dict(ckpt["ema"])
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        epoch, start_step, global_step = ckpt["epoch"], ckpt["step"], ckpt["global_step"]
        best_top1, epoch_stats = ckpt["best_top1"], dict(ckpt["epoch_stats"])
        ranks = ckpt.get("rng_ranks")
        if ranks and len(ranks) == dist_info.world_size:
            set_rng_state(ranks[dist_info.rank])
        else:  # another number of processes: rank 0 continues its stream, the others start their own
            set_rng_state(ckpt["rng"])
            if dist_info.rank:
                torch.manual_seed(config.train.seed + dist_info.rank + 7919 * global_step)
        # an epoch's training finished; saved with its row, it is done. Saved without (a stop that ended the
        # DataLoader workers during its evaluation), the loop below runs no step of it and evaluates it
        if start_step >= train_data.steps_per_epoch and ckpt["metrics"].get("epoch") == epoch + 1:
            epoch, start_step = epoch + 1, 0
            epoch_stats = {k: 0.0 for k in epoch_stats}
        if epoch >= config.train.epochs:
            raise VitError(f"--resume {resume}: this run already finished its {config.train.epochs} epochs; "
                           f"extend it with --set train.epochs={config.train.epochs + 10} (for example)")
    train_model = model
    if dist_info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    compile_mode = resolve_compile_mode(config.train.compile_mode, device, dist_info.world_size,
                                        config.train.grad_accum_steps)
    note = unread_keys_note(config)
    if main and note:
        print(note, file=sys.stderr)
    if main and config.train.compile and config.train.compile_mode not in ("auto", compile_mode):
        where = ("under torchrun / --nproc" if dist_info.enabled else
                 "with micro-batches (train.grad_accum_steps: a replay frees the gradients the next one adds to)")
        print(f"vit: train.compile_mode {config.train.compile_mode} replays CUDA graphs, which vit does not use "
              f"{where}; compiling with {compile_mode}", file=sys.stderr)
    step_fn = TrainStep(model, optimizer, config, device, precision, ema, scaler,
                        forward=Forward(train_model, config.train.compile, mode=compile_mode))
    eval_model = ema.module if ema is not None else model
    # compiled too where training is: the same weights, updated in place, so it compiles once per run
    eval_forward = Forward(eval_model, config.train.compile, "evaluating", evaluation_compile_mode(compile_mode))

    # ---- the run directory
    run_dir = Path(run_dir) if run_dir else default_run_dir(config) if main else None
    if dist_info.enabled:  # rank 0's: the default name holds a timestamp, which ranks could read in different seconds
        import torch.distributed as dist

        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])

    def set_up_run_dir():
        existed = run_dir.is_dir()
        if existed:  # a run still going in it is said as such, before what the folder holds is judged
            lock_run_dir(run_dir)
        if ckpt is None:
            prepare_run_dir(run_dir)
        if not existed:
            lock_run_dir(run_dir)
        for stale in run_dir.glob(".*.pt.tmp*"):  # left by a save that was killed half-way
            stale.unlink(missing_ok=True)
        if ckpt is None:  # a resumed run's changes (more epochs, a new lr) go in with its first last.pt (save)
            write_config_yaml(run_dir, config)
        else:  # which rewrites config.yaml: hand edits there are kept aside, with a note
            edited = keep_edited_config(run_dir, ckpt["config"], config)
            if edited:
                print(edited, file=sys.stderr)

    rank0_first(dist_info, set_up_run_dir, others_too=False)
    writer = MetricsWriter(run_dir, main, (epoch, global_step) if ckpt is not None else None)
    total_steps = config.train.epochs * train_data.steps_per_epoch
    warmup_steps = round(config.train.warmup_epochs * train_data.steps_per_epoch)
    if main and warmup_steps >= total_steps > 0:
        print(f"vit: note: train.warmup_epochs {config.train.warmup_epochs:g} >= train.epochs {config.train.epochs}: "
              f"the learning rate rises toward train.lr for the whole run and never decays (set train.warmup_epochs "
              f"below train.epochs for the cosine decay)", file=sys.stderr)
    synthetic = " [SYNTHETIC DATA: numbers mean nothing]" if config.data.dataset == "synthetic" else ""
    if main:
        params = sum(p.numel() for p in model.parameters())
        what = "resuming" if ckpt else "training"
        print(f"vit: {what} {config.name}{synthetic}: {params / 1e6:.2f}M parameters, {train_data.num_samples} "
              f"train / {num_val} val images, {len(classes)} classes, device {device}, precision {precision}, "
              f"attention {attention}" + (f", compiled ({compile_mode})" if config.train.compile else "")
              + (f", {dist_info.world_size} processes" if dist_info.enabled else ""),
              file=sys.stderr)
        print(f"vit: run directory {run_dir}  (watch it: tensorboard --logdir {shlex.quote(str(run_dir))})",
              file=sys.stderr)
        if ckpt:
            pending = " (its training is done: its evaluation)" if start_step >= train_data.steps_per_epoch else ""
            print(f"vit: continuing at epoch {epoch + 1}, step {start_step} of {train_data.steps_per_epoch}{pending}",
                  file=sys.stderr)
            saved = ckpt["config"].train
            changed = [f"train.{key} {getattr(saved, key)} -> {getattr(config.train, key)}"
                       for key in OPTIMISATION_CHANGES if getattr(saved, key) != getattr(config.train, key)]
            if changed:
                print(f"vit: note: {', '.join(changed)} from global step {global_step + 1} on (the steps before "
                      f"it used the old values)", file=sys.stderr)

    saved_step = global_step if ckpt is not None else None  # the global step last.pt holds
    saved_config = ckpt["config"] if ckpt is not None else None  # and its config

    def save(name: str, epoch_now: int, step_now: int, metrics: dict[str, Any]) -> Path:
        """Called by every rank at the same points; rank 0 writes."""
        nonlocal saved_step, saved_config
        path = run_dir / name
        rng_ranks = None
        if dist_info.enabled:
            import torch.distributed as dist

            rng_ranks = [None] * dist_info.world_size
            dist.all_gather_object(rng_ranks, rng_state())
        if main:
            atomic_save(make_checkpoint(
                config=config, classes=classes, model=model, ema=ema.module if ema else None, optimizer=optimizer,
                scaler=scaler, epoch=epoch_now, step=step_now, global_step=global_step, best_top1=best_top1,
                epoch_stats=epoch_stats, metrics=metrics, rng_ranks=rng_ranks,
                elapsed_seconds=time.perf_counter() - start_time, run_id=run_id, attention_drawn_at=drawn_at), path)
        if name == "last.pt":
            if main and saved_config is not None and saved_config is not config:  # a resumed run's, from here on
                write_config_yaml(run_dir, config)
            saved_step, saved_config = global_step, config
        return path

    from tqdm import tqdm

    first_epoch = epoch
    attention_every = max(1, config.train.epochs // 5)
    drawn_at: Optional[int] = ckpt.get("attention_drawn_at") if ckpt is not None else None  # the epoch whose
    # attention maps TensorBoard last got (a resumed run keeps their spacing)

    last_metrics: dict[str, Any] = {}
    # the run's wall time over all its sessions: a resumed run counts on from its checkpoint's
    start_time = time.perf_counter() - (float(ckpt.get("elapsed_seconds", 0.0)) if ckpt is not None else 0.0)
    run_id = (ckpt.get("run_id") if ckpt is not None else None) or uuid.uuid4().hex  # checkpoints before it had none
    evaluating = False  # which of the two a memory error happened in
    # halved for the rest of the session where an evaluation runs out of memory; from what eval_batches runs
    eval_size = min(config.train.eval_batch_size, max(num_val, 1))

    def smaller_evaluation_batch(size: int, smaller: int, what: str) -> None:
        nonlocal eval_size
        eval_size = smaller  # the session's size from now on (the advice names it if this one runs out too)
        if main:
            print(f"vit: out of memory evaluating at batch size {size} ({what}); evaluating at {smaller} from now on "
                  f"(--set train.eval_batch_size={smaller} starts there)", file=sys.stderr)

    def kept() -> str:
        return (f"last.pt (global step {saved_step}) is kept in {run_dir}" if saved_step is not None
                else "no checkpoint had been saved")

    def out_of_memory_advice() -> str:
        if evaluating:
            size = eval_size
            smaller = max(size // 4, 1)
            how = (f"continue with a smaller evaluation batch: {resume_command(['train.eval_batch_size'])} "
                   f"--set train.eval_batch_size={smaller}"
                   if saved_step is not None and smaller < size else
                   "lower train.eval_batch_size" if smaller < size else
                   "batch size 1 runs out of memory too: use a smaller model or data.image_size, or a larger device")
            return (f"while evaluating at batch size {size} on {device}; {kept()}; "
                    f"{how}")
        tokens = (config.image_size // config.model.patch_size) ** 2 + 1
        graphs = ""
        if step_fn.forward.graphs:  # CUDA graphs hold a memory pool of their own, beside the caching allocator's
            graphs = ("; or train without CUDA graphs, which keep a memory pool of their own: "
                      + (f"{resume_command(['train.compile_mode'])} " if saved_step is not None else "")
                      + "--set train.compile_mode=default")
        local, accum = train_data.local_batch_size, config.train.grad_accum_steps
        micro = -(-local // accum)  # the largest micro-batch
        at = f"train.batch_size {config.train.batch_size}" + (f" in {accum} micro-batches of up to {micro}"
                                                              if accum > 1 else "")
        more = min(2 * accum, local)
        smaller = f"micro-batches of up to {-(-local // more)} images"
        if micro <= 1:
            how = "lower data.image_size or the model size in a new run"
        elif saved_step is not None:  # the same batch, in more passes: the run goes on
            how = (f"continue it in {smaller}: {resume_command(['train.grad_accum_steps'])} "
                   f"--set train.grad_accum_steps={more}")
        else:
            how = (f"set train.grad_accum_steps={more} (the same batch in {smaller}), or lower train.batch_size, "
                   f"data.image_size or the model size")
        return f"in the training step at {at} ({tokens} tokens per image) on {device}; {kept()}; {how}{graphs}"

    def resume_command(leave_out: Sequence[str] = ()) -> str:
        """The command that continues from last.pt with this session's settings (those given at this resume are
        not in last.pt until its first save), except `leave_out`."""
        return " ".join([resume_command_line(run_dir / "last.pt"), *resume_sets(saved_config, config, leave_out)])

    def diverged_advice() -> str:
        """After a non-finite loss at global step `global_step + 1`."""
        t = config.train
        new_run = f"start a new run with a lower train.lr{'' if t.grad_clip else ' or with train.grad_clip'}"
        if saved_step is None:
            return new_run
        if saved_step == global_step:  # resuming would run the same weights on the same batch
            return f"its weights are the ones that gave this loss, so resuming cannot help: {new_run}"
        lower = [f"--set train.lr={t.lr / 2:g}"] + [f"--set train.min_lr={t.min_lr / 2:g}"] * (t.min_lr > 0)
        clip = [] if t.grad_clip else ["--set train.grad_clip=1.0"]
        command = resume_command(["train.lr", "train.min_lr"] + ["train.grad_clip"] * bool(clip))
        return f"continue from it with a lower train.lr: {' '.join([command, *lower, *clip])}"

    def go_on_advice(training: bool) -> str:
        """After a dataset file could not be read. A training image is to be replaced, not removed: one image fewer
        makes the resumed epoch's order (and a max_train_samples subset) another from the saved step on."""
        if saved_step is None:
            return "fix or remove the file and start the run again"
        if training:
            return (f"replace the file with a readable copy of the image (removing it changes the order a resumed "
                    f"epoch sees), then continue: {resume_command()}")
        return f"fix or remove the file, then continue: {resume_command()}"

    def stop_without_workers(done: int) -> None:
        """The stop killed DataLoader workers: save the `done` steps of this epoch and stop. Under torchrun the
        ranks could not agree on that step: the run keeps its last checkpoint."""
        if dist_info.enabled:
            raise VitError("the stop signal also ended this rank's DataLoader workers; the run keeps its last "
                           "checkpoint (send the signal to torchrun or the vit processes, not to the whole group)")
        raise Interrupted(str(save("last.pt", epoch, done, last_metrics)))

    # the learning rate of the last step taken: a resumed run that starts by evaluating a finished epoch logs the
    # rate that epoch ended at (its optimizer's), not the one a changed train.lr would have given
    lr = (optimizer.param_groups[0]["lr"] if ckpt is not None and global_step > 0 else
          lr_at(max(global_step - 1, 0), total_steps, warmup_steps, config.train.lr, config.train.min_lr))
    settle()
    with StopSignals() as stop, memory_errors(out_of_memory_advice), closed_on_error(writer):
        while epoch < config.train.epochs:
            bar = tqdm(total=train_data.steps_per_epoch, initial=start_step, disable=not main, leave=True,
                       desc=f"epoch {epoch + 1}/{config.train.epochs}", file=sys.stderr, dynamic_ncols=True)
            t_epoch = time.perf_counter()
            t_ready = time.perf_counter()
            stopping = False
            done = start_step  # steps of this epoch finished
            try:  # the bar is closed before any message, so an error never lands on its line
                for step, (images, labels) in enumerate(read_or_say(until_stopped(train_data.epoch(epoch, start_step),
                                                                                  stop)), start=start_step):
                    t_data = time.perf_counter() - t_ready
                    x, targets = preprocess(images, labels, global_step)
                    if main and step == start_step and epoch == first_epoch and ckpt is None:  # once per run
                        std, mean = preprocess.std / 255, preprocess.mean / 255
                        writer.images("train/augmented_batch", (x[:32].float() * std + mean).clamp(0, 1),
                                      global_step)
                    lr = lr_at(global_step, total_steps, warmup_steps, config.train.lr, config.train.min_lr)
                    loss, logits = step_fn(x, targets, lr, global_step)
                    correct = (logits.argmax(1) == labels).sum()
                    stats = all_reduce_sum(torch.stack([loss.float() * len(labels), correct.float(),
                                                        torch.tensor(float(len(labels)), device=device),
                                                        torch.tensor(float(stop.requested), device=device)]),
                                           dist_info).tolist()
                    if not math.isfinite(stats[0]):  # every rank has the same sum: rank 0 says it, once
                        if not main:
                            raise OtherRankFailed()
                        raise VitError(f"loss became {stats[0] / stats[2]} at epoch {epoch + 1}, step {step + 1} "
                                       f"(global step {global_step + 1}); {kept()}; {diverged_advice()}")
                    global_step += 1
                    done = step + 1
                    elapsed = time.perf_counter() - t_ready
                    epoch_stats["loss"] += stats[0]
                    epoch_stats["correct"] += stats[1]
                    epoch_stats["seen"] += stats[2]
                    epoch_stats["seconds"] += elapsed
                    epoch_stats["data_seconds"] += t_data
                    if main:
                        bar.update(1)
                        bar.set_postfix(loss=f"{stats[0] / stats[2]:.3f}", acc=f"{stats[1] / stats[2]:.3f}",
                                        lr=f"{lr:.2e}", img_s=f"{stats[2] / elapsed:.0f}",
                                        data_ms=f"{1000 * t_data:.1f}", refresh=False)
                        if global_step % 10 == 0:
                            writer.scalars({"train/loss": stats[0] / stats[2], "train/lr": lr}, global_step)
                    stopping = stats[3] > 0  # agreed by all ranks
                    if stopping and step + 1 < train_data.steps_per_epoch:
                        path = save("last.pt", epoch, step + 1, last_metrics)
                        barrier(dist_info)  # no rank exits before rank 0 has saved
                        raise Interrupted(str(path))
                    # on an epoch's last step the stop waits for the epoch's evaluation and save below
                    every = config.train.checkpoint_every
                    if every and global_step % every == 0 and step + 1 < train_data.steps_per_epoch:
                        save("last.pt", epoch, step + 1, last_metrics)
                    t_ready = time.perf_counter()
            except WorkersStopped:  # the stop killed the DataLoader workers while this rank waited for a batch
                stop_without_workers(done)
            except BadData as e:  # the steps of this epoch since the last save are redone on resume
                raise VitError(f"{e}; {kept()}; {go_on_advice(training=True)}") from None
            finally:
                bar.close()

            # ---- end of epoch: evaluate (every train.eval_every epochs, and the last), log, checkpoint
            evaluated = (epoch + 1) % config.train.eval_every == 0 or epoch + 1 == config.train.epochs
            evaluating = evaluated
            short_of_memory = None

            def run_evaluation(size: int) -> dict[str, Any]:
                return evaluate(eval_model, lambda: read_or_say(until_stopped(val_batches(size), stop)),
                                eval_preprocess, classes,
                                device, precision, dist_info, forward=eval_forward, hflip=config.train.eval_hflip,
                                fixed_batch=eval_forward.running_compiled)

            try:
                val = None
                if evaluated and dist_info.enabled:  # the ranks cannot agree on a retry at another size
                    val = run_evaluation(eval_size)
                elif evaluated:
                    val = largest_batch_that_fits(run_evaluation, eval_size, smaller_evaluation_batch)[0]
            except WorkersStopped:  # in the evaluation's: the epoch's training is kept, not evaluated
                stop_without_workers(train_data.steps_per_epoch)
            except BadData as e:  # a validation image: the epoch's training is kept (one process), as after a stop
                if not dist_info.enabled:
                    save("last.pt", epoch, train_data.steps_per_epoch, last_metrics)
                raise VitError(f"{e} (while evaluating epoch {epoch + 1}); {kept()}; {go_on_advice(training=False)}") \
                    from None
            except (RuntimeError, MemoryError) as e:  # out of memory: as after a stop, the epoch's training is
                # kept (one process: under torchrun the ranks cannot agree on it)
                if out_of_memory(e) is None or dist_info.enabled:
                    raise
                short_of_memory = e.with_traceback(None)  # without the evaluation's frames and their tensors
            if short_of_memory is not None:  # the resumed run evaluates the epoch first
                save("last.pt", epoch, train_data.steps_per_epoch, last_metrics)
                raise short_of_memory
            evaluating = False  # pictures and saves below are not the evaluation batch's doing
            seen = max(epoch_stats["seen"], 1.0)
            last_metrics = {
                "epoch": epoch + 1,
                "global_step": global_step,
                "train_loss": epoch_stats["loss"] / seen,
                "train_top1": epoch_stats["correct"] / seen,
                **({"val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"]} if val is not None else {}),
                **({"val_top1_single_view": val["top1_single_view"]} if val and "top1_single_view" in val else {}),
                "lr": lr,
                "train_images_per_second": seen / max(epoch_stats["seconds"], 1e-9),
                "data_ms_per_step": 1000 * epoch_stats["data_seconds"] / max(train_data.steps_per_epoch, 1),
                "epoch_seconds": time.perf_counter() - t_epoch,
                "elapsed_seconds": time.perf_counter() - start_time,
            }
            if synthetic:
                last_metrics["synthetic"] = True
            writer.record(last_metrics)
            writer.scalars({"train/epoch_loss": last_metrics["train_loss"],
                            "train/top1": last_metrics["train_top1"],
                            "perf/train_images_per_second": last_metrics["train_images_per_second"]}, global_step)
            is_best = False
            if val is not None:
                writer.scalars({"val/loss": val["loss"], "val/top1": val["top1"], "val/top5": val["top5"],
                                **({"val/top1_single_view": val["top1_single_view"]}
                                   if "top1_single_view" in val else {})}, global_step)
                writer.scalars({f"val_per_class/{name}": acc for name, acc in val["per_class"].items()},
                               global_step)
                if main:  # attention maps at the first evaluation, then every few epochs, and at the end
                    draw = (drawn_at is None or epoch + 1 - drawn_at >= attention_every
                            or epoch + 1 == config.train.epochs)
                    log_pictures(writer, eval_model, config, classes, val, watch, device, global_step, attention=draw)
                    drawn_at = epoch + 1 if draw else drawn_at
                is_best = val["top1"] > best_top1
                if is_best:
                    best_top1 = val["top1"]
            epoch_stats = {k: 0.0 for k in epoch_stats}
            # best.pt first: a run killed between the two saves resumes from the older last.pt and redoes the epoch,
            # instead of believing a best.pt that was never written
            if is_best:
                save("best.pt", epoch, train_data.steps_per_epoch, last_metrics)
            save("last.pt", epoch, train_data.steps_per_epoch, last_metrics)
            if main and val is not None:
                flips = (f" with test-time flips (single view {val['top1_single_view']:.4f})"
                         if "top1_single_view" in val else "")
                print(f"vit: epoch {epoch + 1}: val top-1 {val['top1']:.4f}{flips}, top-{min(5, len(classes))} "
                      f"{val['top5']:.4f}, loss {val['loss']:.4f}{' (best)' if is_best else ''}", file=sys.stderr)
            elif main:
                print(f"vit: epoch {epoch + 1}: train loss {last_metrics['train_loss']:.4f} (not evaluated: "
                      f"train.eval_every is {config.train.eval_every})", file=sys.stderr)
            epoch, start_step, evaluating = epoch + 1, 0, False
            if stopping and epoch < config.train.epochs:
                barrier(dist_info)
                raise Interrupted(str(run_dir / "last.pt"))

    if main and writer.tb:
        from vitcli.visualize import figure_to_array, position_similarity_figure

        writer.image("model/position_embedding_similarity",
                     figure_to_array(position_similarity_figure(model.patch_embedding.position_embedding.detach())),
                     global_step)
    final = {"final": True, "best_val_top1": best_top1, "test_top1": last_metrics.get("val_top1"),
             "epochs": config.train.epochs, "elapsed_seconds": time.perf_counter() - start_time}
    if synthetic:
        final["synthetic"] = True
    if config.train.eval_hflip:  # the figure with its mirror images, and the one without, side by side
        final["tta_hflip"] = True
        final["test_top1_single_view"] = last_metrics.get("val_top1_single_view")
    writer.record(final)

    def earlier_hparams(tb) -> None:  # a resumed run's summary replaces the earlier sessions' (one per run)
        for old in (run_dir / "hparams").glob("events.out.tfevents.*"):
            old.unlink()

    writer.tensorboard(earlier_hparams)
    writer.tensorboard(lambda tb: tb.add_hparams(
        {"dim": config.model.dim, "depth": config.model.depth, "heads": config.model.heads,
         "patch_size": config.model.patch_size, "lr": config.train.lr, "batch_size": config.train.batch_size,
         "epochs": config.train.epochs, "precision": precision},
        {"hparam/best_val_top1": best_top1}, run_name="hparams"))
    writer.close()
    # under torchrun the process group stays for cli.leave_process_group, which frees DistributedDataParallel's
    # reducer (it holds the group) before it destroys the group
    if main:
        print(f"vit: done{synthetic}. best val top-1 {best_top1:.4f}: {run_dir / 'best.pt'}", file=sys.stderr)
        # a data.root relative to where the run started: the command works from any folder with it made absolute
        root = ("" if config.data.dataset == "synthetic" or config.data_root.is_absolute() else
                f" --data-root {shlex.quote(str(config.data_root.resolve()))}")
        best = shlex.quote(os.path.abspath(run_dir / "best.pt"))  # as --data-root: from any folder
        print(f"vit: evaluate it with: {vit_program()} eval --ckpt {best}{root}", file=sys.stderr)
    return {"run_dir": str(run_dir), "best_top1": best_top1, **last_metrics}
