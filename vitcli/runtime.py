"""Where and how the model runs: device, precision, attention implementation, torch.distributed; how a run stops
on a signal."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from vitcli.config import device_name_ok
from vitcli.errors import Interrupted, OtherRankFailed, VitError, is_rank_zero, vit_program

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


MALLOC_MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap, not from a fresh mmap each time
MALLOC_TRIM_THRESHOLD = 1 << 30  # freed heap memory up to this size stays in the process


# the user's own settings of the same thresholds, from the environment, win over ours
OWN_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                       "glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
                       "glibc.malloc.mmap_max")


def tune_malloc() -> bool:
    """Keeps freed activation memory in the process instead of handing it back to the OS after every step (glibc on
    Linux): a training step frees and re-allocates the same few MB-sized tensors, and glibc's default (dynamic) trim
    and mmap thresholds return them, so every step page-faults them in again. Measured on one real Fashion-MNIST epoch
    of `vit train`: minor page faults 3.8-5.6 M -> 0.29 M, system time 7-11 s -> 1-3 s, +7-14% img/s. The cost: freed
    memory stays reserved by the process (up to 1 GiB at the top of the heap, more where it is fragmented). Skipped
    with VIT_MALLOC_TUNING=0 or when the user set these thresholds (OWN_MALLOC_SETTINGS). Returns whether it
    applied."""
    if not sys.platform.startswith("linux") or os.environ.get("VIT_MALLOC_TUNING", "1") == "0":
        return False
    settings = " ".join(os.environ) + " " + os.environ.get("GLIBC_TUNABLES", "")
    if any(name in settings for name in OWN_MALLOC_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # absent outside glibc-compatible C libraries
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold,
                                                                                  MALLOC_TRIM_THRESHOLD))


def settle() -> None:
    """Ends a command's start-up, which `vit` runs with Python's cyclic garbage collector paused (cli.run_command):
    importing torch, its compiler and TensorBoard makes ~0.5M objects that live as long as the process, and the
    collector's full passes over them while they pile up cost ~0.7 s of a `vit train` start. Here they are moved out
    of its sight (gc.freeze: later passes skip them) and collection resumes, for the work that follows. Each command
    body calls it after its imports (`fit` before its training loop). Does nothing once collection runs."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def resolve_device(name: str, given_as: Optional[str] = None) -> torch.device:
    """auto: CUDA, else MPS, else the CPU. A device that is not there is one VitError line naming where it was
    asked for (`given_as`, default train.device=NAME)."""
    given_as = given_as or f"train.device={name}"
    if not device_name_ok(name):
        raise VitError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N, mps; use --device cpu (or auto)")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VitError(f"{given_as}: no CUDA GPU is visible to torch; use --device cpu (or auto)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise VitError(f"{given_as}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0; "
                       f"use --device cuda:0 (or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise VitError(f"{given_as}: MPS is not available here; use --device cpu (or auto)")
    return torch.device(name)


def check_model_fits(config, device: torch.device, training: bool = True) -> None:
    """Before the model is built: one VitError where its weights alone (with their gradients and AdamW's two
    moments when training, all fp32) would not fit in the device's memory. An absurd size (model.depth=1e11)
    otherwise built blocks for minutes until the machine ran out, or overflowed in a traceback."""
    from vitcli.config import DATASET_DEFAULTS

    m = config.model
    tokens = (config.image_size // m.patch_size) ** 2 + 1
    channels = DATASET_DEFAULTS[config.data.dataset]["channels"]
    # the blocks' linear layers (query/key/value, output, MLP) and the embeddings: a lower bound of the count
    params = m.depth * (4 + 2 * m.mlp_ratio) * m.dim**2 + tokens * m.dim + m.patch_size**2 * channels * m.dim
    need = params * 4 * (4 if training else 1)
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    elif device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return
    else:
        return
    if need > memory:
        raise VitError(f"the config's model has at least {params:.3g} parameters, {need / 2**30:.3g} GiB "
                       f"{'to train (fp32 weights, gradients and AdamW moments)' if training else 'of fp32 weights'}"
                       f", more than the {memory / 2**30:.3g} GiB of {device}; lower model.depth, model.dim, "
                       f"model.mlp_ratio or data.image_size, or raise model.patch_size")


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: the CPUs where bf16 matmuls beat fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 autocast where the hardware runs it fast, fp16 + gradient scaling on older GPUs, else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":  # bf16 tensor cores from Ampere (compute capability 8.0) on; emulated before
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


def resolve_attention(name: str, device: torch.device, precision: str) -> str:
    """`auto`: the explicit softmax(QK^T)V path for low precision on CPU (torch's fused attention backward in
    bf16 measured ~3-5x slower there), fused scaled_dot_product_attention everywhere else."""
    if name != "auto":
        return name
    return "explicit" if device.type == "cpu" and precision in ("bf16", "fp16") else "fused"


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


def resolve_compile_mode(name: str, device: torch.device, world_size: int = 1, micro_batches: int = 1) -> str:
    """torch.compile's mode for the training step. `auto`: CUDA graphs (reduce-overhead) on a GPU in one process,
    where a small model's step is bound by kernel launches (on an H200: fashion_mnist.yaml 15214 against 7118
    img/s, cifar10.yaml 9597 against 5682; README "On a GPU"); torch's default elsewhere (a CPU has no graphs to
    replay). Under DDP (world_size > 1) no mode replays graphs: unmeasured here, and torch has open issues with CUDA
    graphs beside DistributedDataParallel's hooks; nor with micro-batches (train.grad_accum_steps): each replay
    frees the last one's outputs, among them the gradients the next micro-batch adds to (torch raises "accessing
    gradient tensor output of CUDAGraphs that has been overwritten"). `reduce-overhead` and `max-autotune` become
    their modes without."""
    graphs = world_size == 1 and micro_batches == 1
    if name == "auto":
        return "reduce-overhead" if device.type == "cuda" and graphs else "default"
    return name if graphs else evaluation_compile_mode(name)


def evaluation_compile_mode(mode: str) -> str:
    """The evaluation's mode: the training's without CUDA graphs (test-time flips call the model twice per batch,
    whose replays would share their output memory)."""
    return {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_ddp_devices(device_name: str, per_node: int) -> bool:
    """For `per_node` processes on one machine: whether they run on CUDA (one GPU each), which must be there."""
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return False
    resolve_device(device_name if device_name != "auto" else "cuda")  # no GPU at all: its one line
    if per_node > torch.cuda.device_count():
        raise VitError(f"{per_node} processes on {device_name}: each needs a GPU of its own, but torch sees "
                       f"{torch.cuda.device_count()}; use --nproc {torch.cuda.device_count()} (torchrun: "
                       f"--nproc_per_node), or --device cpu")
    return True


def init_distributed(device_name: str) -> tuple[Distributed, str]:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU.
    Returns the rank info and the device name this rank uses."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise VitError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes: unset it for one "
                       f"process, or start several with vit train --nproc N or torchrun") from None
    if world_size <= 1:
        return Distributed(), device_name
    import torch.distributed as dist

    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    except (KeyError, ValueError):
        raise VitError(f"WORLD_SIZE={world_size} is set but RANK / LOCAL_RANK are not (or not numbers): start "
                       f"several processes with vit train --nproc N or torchrun, or unset WORLD_SIZE for one") from None
    # torchrun sets the rendezvous address; without it (WORLD_SIZE and RANK left over in a job script) the process
    # group cannot start
    unset = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if unset:
        raise VitError(f"WORLD_SIZE={world_size} and RANK={rank} are set but {' and '.join(unset)} "
                       f"{'is' if len(unset) == 1 else 'are'} not: start the processes with vit train --nproc N or "
                       f"torchrun (which set them), or unset WORLD_SIZE for one process")
    use_cuda = check_ddp_devices(device_name, local_world_size)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    else:
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world_size, local_rank), device_name


def all_reduce_sum(tensor: torch.Tensor, dist_info: Distributed) -> torch.Tensor:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def _child_exited(signum, frame) -> None:
    pass


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """First Ctrl-C / SIGTERM: finish the current step, save last.pt, stop. Second: exit at once (saves are
    atomic, so nothing is torn)."""

    def __init__(self):
        self.requested = False
        self.first = 0.0
        self.previous = {}

    def _handle(self, signum, frame):
        if self.requested and time.monotonic() - self.first < 2.0:
            return  # the same stop delivered twice (Slurm signals torchrun and the workers, torchrun forwards)
        if self.requested:
            if is_rank_zero():
                print("\nvit: second interrupt, exiting now (saves are atomic: any checkpoint written is intact)",
                      file=sys.stderr)
            os._exit(130)
        self.requested, self.first = True, time.monotonic()
        # A stop sent to the whole process group (timeout, kill -TERM -PGID) kills DataLoader workers too; torch's
        # SIGCHLD handler would then raise in the middle of the step or of the save. From here on a dead worker
        # shows only when the next batch is fetched, which `until_stopped` turns into the stop. A handler that
        # does nothing, not SIG_DFL: a SIGCHLD caught while this one is put in place then finds a Python handler
        # (with SIG_DFL Python printed 'OSError: Signal 17 ignored due to race condition' and a traceback)
        if hasattr(signal, "SIGCHLD"):
            signal.signal(signal.SIGCHLD, _child_exited)
        if is_rank_zero():
            print("\nvit: interrupt received, saving last.pt after this step (after the evaluation if it ends the "
                  "epoch; press Ctrl-C again, 2 s or more later, to quit at once)", file=sys.stderr)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, Interrupted):
            # The stop is done and the process is on its way out (message, exit 130): this handler stays, so a
            # repeated signal is still ignored (within 2 s) or exits 130, never Python's KeyboardInterrupt or a -2
            # exit. Interpreter teardown puts the default action back on handlers written in Python, not on an
            # ignored signal, hence the atexit hook for its last moments (all threads are joined by then).
            # Any other way out (the run finished, an error) gives the caller its own handlers back.
            atexit.register(_ignore_stop_signals)
            return
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class WorkersStopped(Exception):
    """Fetching a batch failed after a stop was requested: the stop killed the DataLoader workers too."""


def until_stopped(batches, stop: "StopSignals"):
    """The batches, except that a failure to fetch one after a stop was requested ends them with WorkersStopped."""
    iterator = iter(batches)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception:  # torch's RuntimeError for a dead worker, or EOFError / ConnectionError when the worker
            if not stop.requested:  # died while handing a batch over
                raise
            raise WorkersStopped() from None
        yield item


def barrier(dist_info) -> None:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()


def rank0_first(dist_info, work: Callable[[], Any], others_too: bool = True) -> Any:
    """work() on rank 0, then (others_too) on the other ranks; where rank 0 fails with a user error, it reports it
    in one line and the other ranks stop without a word (instead of each failing on its own, or waiting forever
    for rank 0 at the next collective)."""
    if not dist_info.enabled:
        return work()
    import torch.distributed as dist

    result, failure = None, None
    if dist_info.is_main:
        try:
            result = work()
        except (VitError, OSError) as e:
            failure = e
    verdict = [failure is not None]
    dist.broadcast_object_list(verdict, src=0)
    if failure is not None:
        raise failure
    if verdict[0]:
        raise OtherRankFailed()
    if not dist_info.is_main and others_too:
        result = work()
    return result


def launch_torchrun(nproc: int, command: list[str]) -> int:
    """`vit train --nproc N ...` (`command`: the arguments after `vit`) = `torchrun --nproc_per_node N -m vitcli
    train ...` (without --nproc). Returns the exit code."""
    args, skip = [], False
    for arg in command:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        args.append(arg)
    argv = ["--standalone", f"--nproc_per_node={nproc}", "-m", "vitcli", *args]
    # the workers run as `python -m vitcli`; the commands they print (resume, evaluate) start vit as the user did
    os.environ["VIT_PROGRAM"] = vit_program()
    print("vit: launching: torchrun " + shlex.join(argv), file=sys.stderr)
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1 and print four lines of warning about it
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cpus // nproc))  # the CPUs this process may use (Slurm, taskset)
    # torchrun in this process: a Ctrl-C / SIGTERM reaches it once; it passes the signal on to the workers, which
    # finish their step, save last.pt and stop (rank 0 prints how to resume), and it waits for them
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # a failed worker is reported below in one line, not also in torchrun's log record
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    settle()  # this process watches the workers for the whole run: collection on, as in theirs
    try:
        torchrun(argv)
    except SignalException:
        return 130
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        if 2 in codes:  # a mistake the user can fix: rank 0 said what in its one line above
            return 2
        if codes == {130}:  # the workers were stopped (signalled themselves): each saved and rank 0 said so
            return 130
        rank, first = e.get_first_failure()  # the one that failed first; torchrun then stopped the others
        how = f"signal {-first.exitcode}" if first.exitcode < 0 else f"exit code {first.exitcode}"
        print(f"vit: error: training process {rank} failed ({how}); its own message, if any, is above",
              file=sys.stderr)
        return 1
    return 0
