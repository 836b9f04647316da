"""Device, precision and attention choice, including the CUDA branches (no GPU here: the capability is faked);
the malloc tuning of the vit process."""

import math
import os
import platform
import resource
import subprocess
import sys

import pytest
import torch

from vitcli.config import build_config
from vitcli.bench import Workload
from vitcli.errors import VitError
from vitcli.runtime import (cpu_has_bf16, evaluation_compile_mode, resolve_attention, resolve_compile_mode,
                            resolve_device, resolve_precision)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_the_cpu_flags(monkeypatch, has_bf16, expected):
    monkeypatch.setattr("vitcli.runtime.cpu_has_bf16", lambda: has_bf16)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp16", CPU) == "fp16"


@pytest.mark.parametrize("flags, expected", [("fpu sse avx512f avx512_bf16 amx_tile", True),
                                             ("fpu sse avx2 amx_bf16", True), ("fpu sse avx2 avx512f", False)])
def test_cpu_has_bf16_reads_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr("vitcli.runtime.Path.read_text", lambda self: f"processor : 0\nflags : {flags}\n")
    assert cpu_has_bf16() is expected


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"),
                                                  ((6, 1), "fp16")])
def test_auto_precision_on_cuda_by_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", CUDA) == expected


def test_attention_choice():
    assert resolve_attention("auto", CPU, "bf16") == "explicit"
    assert resolve_attention("auto", CPU, "fp32") == "fused"
    assert resolve_attention("auto", CUDA, "bf16") == "fused"
    assert resolve_attention("auto", CUDA, "fp16") == "fused"
    assert resolve_attention("explicit", CUDA, "fp16") == "explicit"


def test_compile_mode_choice():
    """CUDA graphs for the training step on one GPU (measured 1.7-2.1x there), torch's default mode elsewhere; the
    evaluation never replays graphs (its last batch differs, test-time flips call the model twice per batch)."""
    assert resolve_compile_mode("auto", CUDA) == "reduce-overhead"
    assert resolve_compile_mode("auto", torch.device("cuda:1")) == "reduce-overhead"
    assert resolve_compile_mode("auto", CUDA, world_size=2) == "default"
    assert resolve_compile_mode("auto", CPU) == "default"
    assert resolve_compile_mode("max-autotune", CPU) == "max-autotune"
    assert resolve_compile_mode("default", CUDA) == "default"
    assert resolve_compile_mode("reduce-overhead", CUDA, world_size=2) == "default"
    assert resolve_compile_mode("max-autotune", CUDA, world_size=4) == "max-autotune-no-cudagraphs"
    # micro-batches: a replay would free the gradients the next micro-batch adds to (torch raises there)
    assert resolve_compile_mode("auto", CUDA, micro_batches=2) == "default"
    assert resolve_compile_mode("reduce-overhead", CUDA, micro_batches=2) == "default"
    assert resolve_compile_mode("max-autotune", CUDA, micro_batches=4) == "max-autotune-no-cudagraphs"
    assert resolve_compile_mode("auto", CUDA, micro_batches=1) == "reduce-overhead"
    assert [evaluation_compile_mode(m) for m in ("reduce-overhead", "max-autotune", "default",
                                                 "max-autotune-no-cudagraphs")] == [
        "default", "max-autotune-no-cudagraphs", "default", "max-autotune-no-cudagraphs"]
    with pytest.raises(VitError, match="train.compile_mode must be one of auto, default, reduce-overhead"):
        build_config({"train": {"compile_mode": "fast"}})


def test_the_training_step_compiles_static_after_another_batch_size(monkeypatch):
    """dynamo keys its graphs by the model's code: once an evaluation of the same ViT code ran at another batch size
    (a resumed run that evaluates first; the benchmark's other contenders), a plain torch.compile would trace the
    training step with a symbolic batch size, which is not the static graph (and CUDA graphs) measured. The
    training Forward asks for static shapes; inductor is swapped for a backend that records what dynamo gives it."""
    from vitcli.model import build_model
    from vitcli.step import Forward

    symbolic = []

    def recorder(gm, example_inputs):
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        symbolic.append(any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(
            isinstance(d, torch.SymInt) for d in v.shape)) for v in values))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: real_compile(model, backend=recorder, **kw))
    config = build_config({"data": {"dataset": "synthetic", "image_size": 16},
                           "model": {"patch_size": 4, "dim": 32, "depth": 1, "heads": 2}})
    torch._dynamo.reset()
    try:
        evaluating = Forward(build_model(config, 10).eval(), compile=True, doing="evaluating")
        with torch.inference_mode():
            evaluating(torch.randn(8, 3, 16, 16))
        training = Forward(build_model(config, 10), compile=True)
        training(torch.randn(4, 3, 16, 16)).sum().backward()
        plain = real_compile(build_model(config, 10), backend=recorder)  # the same without static shapes
        plain(torch.randn(6, 3, 16, 16)).sum().backward()
    finally:
        torch._dynamo.reset()
    assert symbolic == [False, False, True], symbolic


def test_the_compiled_evaluation_runs_one_static_graph_for_a_short_last_batch(monkeypatch):
    """After training at another batch size, the evaluation compiles one static graph: its last, shorter batch is
    padded to the first's size (fixed_batch) and the padding's outputs dropped, so the results are the eager
    evaluation's. Without the padding the short batch is a second graph."""
    from vitcli.data import Preprocess
    from vitcli.evaluate import evaluate
    from vitcli.model import build_model
    from vitcli.step import Forward

    graphs = []

    def recorder(gm, example_inputs):
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        graphs.append([tuple(v.shape) for v in values if isinstance(v, torch.Tensor) and v.dim() == 4])
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: real_compile(model, backend=recorder, **kw))
    config = build_config({"data": {"dataset": "synthetic", "image_size": 16},
                           "model": {"patch_size": 4, "dim": 32, "depth": 1, "heads": 2}})
    torch.manual_seed(0)
    model = build_model(config, 10)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (19, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (19,), generator=g)

    def batches():  # 8, 8, 3
        return zip(images.split(8), labels.split(8))

    cpu = torch.device("cpu")
    preprocess = Preprocess(config, cpu, train=False)
    classes = [str(i) for i in range(10)]
    torch._dynamo.reset()
    try:
        Forward(model, compile=True)(torch.randn(4, 3, 16, 16)).sum().backward()  # the training step's graph
        graphs.clear()
        padded = evaluate(model, batches, preprocess, classes, cpu, "fp32", forward=Forward(
            model, compile=True, doing="evaluating"), hflip=True, fixed_batch=True)
        assert graphs == [[(8, 3, 16, 16)]], graphs  # one graph, for the flips too
        graphs.clear()
        evaluate(model, batches, preprocess, classes, cpu, "fp32",
                 forward=Forward(model, compile=True, doing="evaluating"))
        assert graphs == [[(3, 3, 16, 16)]], graphs  # without: a graph of its own (the 8's is dynamo's already)
    finally:
        torch._dynamo.reset()
    eager = evaluate(model, batches, preprocess, classes, cpu, "fp32", hflip=True)
    assert padded["num_samples"] == eager["num_samples"] == 19
    assert padded["confusion"] == eager["confusion"] and padded["top1_single_view"] == eager["top1_single_view"]
    assert padded["loss"] == pytest.approx(eager["loss"], rel=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_requested_without_a_gpu_is_one_clear_error():
    with pytest.raises(VitError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_fp16_with_a_gradient_scaler_trains_on_cpu():
    """The fp16 path (autocast + GradScaler), which `auto` picks on pre-Ampere GPUs, runs its real code on CPU."""
    config = build_config({"data": {"dataset": "synthetic", "image_size": 16},
                           "model": {"patch_size": 4, "dim": 32, "depth": 1, "heads": 2},
                           "train": {"batch_size": 8, "precision": "fp16", "device": "cpu"}})
    workload = Workload(config)
    before = [p.detach().clone() for p in workload.model.parameters()]
    losses = [workload.train_step() for _ in range(3)]
    assert workload.precision == "fp16" and workload.step_fn.scaler is not None
    assert all(math.isfinite(loss) for loss in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, workload.model.parameters()))


def test_compile_failure_falls_back_to_eager_once(capsys):
    """A real inductor failure (no working C++ compiler): one message, then the module's own results."""
    from vitcli.step import Forward

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.GELU())
    x = torch.randn(3, 7)
    try:
        with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
            forward = Forward(module, compile=True, doing="evaluating")
            assert forward.compiled is not module
            assert torch.equal(forward(x), module(x))
            assert torch.equal(forward(x), module(x))
    finally:
        torch._dynamo.reset()
    err = capsys.readouterr().err
    assert err.count("torch.compile failed") == 1 and "evaluating eagerly instead" in err, err
    assert forward.compiled is module


def test_out_of_memory_under_compile_is_not_a_compile_failure(capsys):
    """A compiled forward that runs out of memory is the caller's out-of-memory error (one line there), not "torch.compile
    failed ... eagerly instead" followed by the same failure, and compile stays on."""
    from vitcli.errors import out_of_memory
    from vitcli.step import Forward

    class Huge(torch.nn.Module):
        def forward(self, x):
            return x.repeat(2**38)  # 8 TiB

    forward = Forward(Huge(), compile=True)
    try:
        with pytest.raises(RuntimeError) as raised:
            forward(torch.ones(8))
    finally:
        torch._dynamo.reset()
    assert out_of_memory(raised.value), raised.value
    assert forward.compiled is not forward.module and "torch.compile failed" not in capsys.readouterr().err


MALLOC_CHURN = """
import ctypes, resource, sys
from vitcli.runtime import tune_malloc
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, so that page faults count pages on any THP setting
print(tune_malloc())
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def round_of_page_faults():  # what a train step does: allocate 40 activations of 4 MiB, write them, free them
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(4 << 20) for _ in range(40)]
    for block in blocks:
        ctypes.memset(block, 1, 4 << 20)
    for block in blocks:
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[round_of_page_faults() for _ in range(3)])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("setting", ["default", "off", "own"])
def test_tune_malloc_keeps_freed_memory_for_the_next_step(setting):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "VIT_MALLOC_TUNING")}
    env.update({"off": {"VIT_MALLOC_TUNING": "0"}, "own": {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
                "default": {"MALLOC_ARENA_MAX": "2"}}[setting])  # other malloc settings do not turn it off
    result = subprocess.run([sys.executable, "-c", MALLOC_CHURN], env=env, capture_output=True, text=True, check=True,
                            timeout=120)
    applied, counts = result.stdout.splitlines()
    first, *later = map(int, counts.split())
    assert first > 40 * (4 << 20) // resource.getpagesize() // 2  # 160 MiB written, page by page
    if setting == "default":
        assert applied == "True" and max(later) < first // 20  # the blocks come back without faulting in again
    else:  # glibc's own or the user's thresholds: the freed blocks go back to the OS and fault in again
        assert applied == "False" and min(later) > first // 2
