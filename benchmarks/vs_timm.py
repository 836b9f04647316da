"""vitcli against timm on this machine, side by side in one process, alternating rounds.

    python benchmarks/vs_timm.py [--configs configs/fashion_mnist.yaml configs/cifar10.yaml] [--rounds 5]
                                 [--epoch [--epoch-rounds 2]]   (also end-to-end epochs of real Fashion-MNIST)
    python benchmarks/vs_timm.py --device cuda --out benchmarks/results/cuda [--profile]   (a GPU: vitcli bf16
                                 eager, compiled and with CUDA graphs, fp16 and fp32 with CUDA graphs, fp32 eager,
                                 against timm fp32, timm AMP and timm AMP compiled)
    python benchmarks/vs_timm.py --fp32 --out benchmarks/results/cpu-fp32   (a CPU without bf16, as most
                                 laptops: every contender in fp32, timm eager and compiled)

Train step: vitcli's exact `vit train` step (vitcli.bench.Workload) against timm's VisionTransformer of the same
shape, (a) fp32 eager with timm's defaults and (b) timm's best setting seen here: fused attention off, bf16
autocast, torch.compile. For a config with a convolutional stem, timm's ViT is measured twice: with the same stem
(timm's HybridEmbed over the same Conv-BatchNorm-ReLU layers: the same model, tests/test_benchmarks.py), and with
its own linear patch embedding (fewer FLOPs), against which vitcli also runs the config with a linear stem. Eval:
inference forward at the eval batch size. On a GPU (`--device cuda`) timm's best setting is its default fused
attention with bf16 autocast and torch.compile (no CUDA graphs), and vitcli runs in each precision, eager, compiled
and compiled with CUDA graphs (train.compile_mode: reduce-overhead, what `auto` picks on a GPU). Each contender is
timed for a few steps in every round, rounds alternate, the median per contender is reported. Writes
benchmarks/results/*.json and *.md.
End to end: one epoch of `vit train` with the recipe's conv stem, one with timm's linear patch embedding, and the
timm + DataLoader pipeline (benchmarks/timm_epoch.py) with each of those two models, each a command of its own timed
from start to exit, in alternating rounds (--epoch-rounds; round r trains with seed r on every side, and the medians
of the wall times and of the test accuracies are reported). Each `vit train` variant first runs once on 10 batches,
untimed, so that torch.compile's on-disk cache holds its graphs, as after a user's first run; that warm-up's wall
time is reported beside it.
glibc's malloc is tuned for the whole process as `vit` tunes its own (vitcli.runtime.tune_malloc), timm included.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitcli.bench import Workload, forward_flops, timed  # noqa: E402
from vitcli.config import DATASET_DEFAULTS, load_config  # noqa: E402
from vitcli.runtime import tune_malloc  # noqa: E402

from timm_epoch import timm_vit  # noqa: E402  (benchmarks/, this script's folder)


class TimmWorkload:
    """timm's VisionTransformer with the config's shape (timm's linear patch embedding, or with stem="conv" the
    config's convolutional stem), trained the way a timm user would."""

    def __init__(self, config, precision: str, fused_attention: bool, compile: bool,
                 device: torch.device = torch.device("cpu"), stem: str = "linear"):
        import timm.layers

        timm.layers.set_fused_attn(fused_attention)
        channels = DATASET_DEFAULTS[config.data.dataset]["channels"]
        self.model = timm_vit(config, stem).to(device)
        self.forward = torch.compile(self.model) if compile else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        self.device, self.precision = device, precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None  # as timm's train.py
        b, eb, size = config.train.batch_size, config.train.eval_batch_size, config.image_size
        self.batch_size, self.eval_batch_size = b, eb
        self.x = torch.randn(b, channels, size, size, device=device)
        self.y = torch.randint(0, 10, (b,), device=device)
        self.eval_x = torch.randn(eb, channels, size, size, device=device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def train_step(self, sync: bool = True) -> float:
        self.model.train()
        with self.autocast():
            loss = F.cross_entropy(self.forward(self.x), self.y, label_smoothing=0.1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return float(loss.detach()) if sync else 0.0  # waits for the GPU: each timed step is complete

    @torch.inference_mode()
    def infer(self) -> None:
        self.model.eval()
        with self.autocast():
            float(self.forward(self.eval_x).float().sum())


def measure(contenders: dict, rounds: int, steps: int, profile: bool = False) -> dict[str, dict[str, float]]:
    for w in contenders.values():  # warm-up, compile included: every training step first, as `vit train` compiles
        for _ in range(3):  # its step before its evaluation
            w.train_step()
    for w in contenders.values():
        w.infer()
    train = {name: [] for name in contenders}
    infer = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, w in contenders.items():
            train[name].append(w.batch_size / timed(w.train_step, steps))
            infer[name].append(w.eval_batch_size / timed(w.infer, max(2, steps // 2)))
    figures = {name: {"train_images_per_second": statistics.median(train[name]),
                      "infer_images_per_second": statistics.median(infer[name]),
                      "train_rounds": [round(v, 1) for v in train[name]],
                      "infer_rounds": [round(v, 1) for v in infer[name]]} for name in contenders}
    if profile:
        for name, w in contenders.items():
            figures[name].update(profile_step(w, steps))
    return figures


def profile_step(w, steps: int) -> dict[str, float]:
    """On a GPU: the train step without waiting for the device after each step (how fast it could go if the loop
    read its loss later), and torch.profiler's count per step of kernel launches and CUDA graph replays, the
    device's busy time (the kernels' durations summed) and the host's time."""
    from torch.profiler import ProfilerActivity, profile

    def unsynced():
        for _ in range(steps):
            w.train_step(sync=False)
        w.train_step()  # waits for the device

    unsynced()
    seconds = timed(unsynced, 1) / (steps + 1)
    n = 5
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            w.train_step()
    events = prof.key_averages()
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    graphs = sum(e.count for e in events if "GraphLaunch" in e.key)
    device_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    top = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total)[:8]
    return {"unsynced_train_images_per_second": w.batch_size / seconds,
            "kernel_launches_per_step": launches / n, "graph_replays_per_step": graphs / n,
            "device_busy_ms_per_step": device_us / n / 1000,
            "top_host_ops": {e.key[:60]: round(e.self_cpu_time_total / n / 1000, 3) for e in top}}


def bf16_matmul_peak(device: torch.device = torch.device("cpu"), repeats: int = 10,
                     dtype: torch.dtype = torch.bfloat16) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))

    def product():
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        product()
    seconds = timed(product, repeats)
    return 2 * n**3 / seconds / 1e9


TIMM_BEST = {"cpu": "timm best (bf16, explicit attn, compiled)", "cuda": "timm best (bf16, fused attn, compiled)",
             "cpu-fp32": "timm fp32 compiled"}


def contenders_for(config, device: torch.device, fp32: bool = False) -> dict:
    """On the CPU: vit bench as configured (and in timm's linear-stem shape), timm fp32 eager and timm's best;
    with `fp32` (a CPU without bf16) vitcli in fp32 and timm fp32 eager and compiled.
    On a GPU: vitcli bf16 eager, compiled and compiled with CUDA graphs, fp16 and fp32 compiled with CUDA graphs,
    fp32 eager; timm fp32 eager, timm bf16 autocast eager and timm's best (bf16, fused attention, compiled).
    A config with a convolutional stem also gets timm's fp32 eager and best with that same stem (CONV_STEM)."""
    def vitcli(**train):
        return Workload(dataclasses.replace(config, train=dataclasses.replace(config.train, **train)))

    conv = config.model.stem != "linear"
    if device.type == "cpu" and fp32:  # what train.precision: auto picks on a CPU without bf16
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision="fp32"))
        contenders = {"vitcli fp32 (vit bench)": Workload(config)}
        if conv:
            contenders["vitcli fp32, linear stem (timm's shape)"] = Workload(linear_stem(config))
        timm = {"timm fp32 eager": ("fp32", True, False), TIMM_BEST["cpu-fp32"]: ("fp32", True, True)}
    elif device.type == "cpu":
        contenders = {"vitcli (vit bench)": Workload(config)}
        if conv:  # timm's ViT has the linear patch embedding: compare that shape too
            contenders["vitcli, linear stem (timm's shape)"] = Workload(linear_stem(config))
        timm = {"timm fp32 eager": ("fp32", True, False), TIMM_BEST["cpu"]: ("bf16", False, True)}
    else:
        graphs = {"compile": True, "compile_mode": "reduce-overhead"}
        d = str(device)
        contenders = {
            "vitcli bf16": vitcli(device=d, precision="bf16", compile=False),
            "vitcli bf16 compiled": vitcli(device=d, precision="bf16", compile=True, compile_mode="default"),
            "vitcli bf16 compiled, CUDA graphs": vitcli(device=d, precision="bf16", **graphs),
            "vitcli fp16 compiled, CUDA graphs": vitcli(device=d, precision="fp16", **graphs),
            "vitcli fp32": vitcli(device=d, precision="fp32", compile=False),
            "vitcli fp32 compiled, CUDA graphs": vitcli(device=d, precision="fp32", **graphs),
        }
        timm = {"timm fp32 eager": ("fp32", True, False), "timm bf16 eager": ("bf16", True, False),
                TIMM_BEST["cuda"]: ("bf16", True, True)}
    for name, (precision, fused, compiled) in timm.items():
        contenders[name] = TimmWorkload(config, precision, fused_attention=fused, compile=compiled, device=device)
    if conv:  # the same shape as vitcli's: timm's fp32 eager and its best with the config's own stem
        for name in ("timm fp32 eager", list(timm)[-1]):  # (timm's best is each branch's last)
            precision, fused, compiled = timm[name]
            contenders[name + CONV_STEM] = TimmWorkload(config, precision, fused_attention=fused, compile=compiled,
                                                        device=device, stem=config.model.stem)
    return contenders


CONV_STEM = ", conv stem"  # timm contenders with the config's convolutional stem (timm's HybridEmbed)


def stem_of(name: str, config_stem: str) -> str:
    """The stem a contender's model has: timm's own ViT and vitcli's linear-stem row have the linear patch
    embedding; vitcli's other rows and timm's CONV_STEM ones the config's."""
    if name.endswith(CONV_STEM) or (name.startswith("vitcli") and "linear stem" not in name):
        return config_stem
    return "linear"


LINEAR_STEM_SETS = ("model.stem=linear", "model.stem_channels=null")
LINEAR_EPOCH = "vitcli, linear stem (timm's model)"
TIMM_CONV_EPOCH = "timm + DataLoader, conv stem (the recipe's model)"


def linear_stem(config):
    return dataclasses.replace(config, model=dataclasses.replace(config.model, stem="linear", stem_channels=None))


def timm_epoch(root: str, seed: int = 0, device: str = "cpu", stem: str = "linear") -> dict[str, float]:
    """benchmarks/timm_epoch.py, what a timm user writes, run as a command of its own and timed from outside as
    `vit train` is: `seconds` from its start to its exit (Python, importing torch, torchvision and timm included);
    `in_process_seconds` its own clock, from building the datasets to the end of the test pass (what this benchmark
    reported as timm's time until 2026-11-29, while vitcli's included its start and imports)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "timm_epoch.py"), "--root", root,
                           "--seed", str(seed), "--device", device, "--stem", stem], cwd=REPO, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"benchmarks/timm_epoch.py failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    inner = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "test_top1": inner["test_top1"], "in_process_seconds": inner["seconds"]}


def vitcli_epoch(root: str, tmp: Path, epochs: int = 1, extra: tuple[str, ...] = (), seed: int = 0,
                 warm_up: bool = False) -> dict[str, float]:
    """The real `vit train` command: one epoch of configs/fashion_mnist.yaml (with `extra` --set overrides), then
    its test accuracy. `warm_up`: 10 training batches and 1296 test images (two full evaluation batches and the
    test set's last, shorter one), which compiles, or loads from torch's on-disk cache, every graph the epoch runs."""
    run_dir = tmp / f"vitcli-epoch-{time.time_ns()}"
    start = time.perf_counter()
    sets = [f"data.root={root}", f"train.epochs={epochs}", "train.ema_decay=0", "train.warmup_epochs=0.2",
            "train.eval_hflip=false", f"train.seed={seed}", *extra]  # one view, as timm's
    if warm_up:
        sets += ["data.max_train_samples=1280", "data.max_val_samples=1296"]
    subprocess.run([sys.executable, "-m", "vitcli", "train", "--config", str(REPO / "configs" / "fashion_mnist.yaml"),
                    *[arg for kv in sets for arg in ("--set", kv)], "--run-dir", str(run_dir)],
                   check=True, cwd=REPO, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "test_top1": [r for r in rows if "epoch" in r][-1]["val_top1"]}


def torchvision_fmnist_root(root: str, tmp: Path) -> str:
    """torchvision's FashionMNIST wants <root>/FashionMNIST/raw/*; link Debian's files there."""
    raw = tmp / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in Path(root).glob("*-ubyte.gz"):
        target = raw / f.name
        if not target.exists():
            target.symlink_to(f)
        plain = raw / f.name[:-3]
        if not plain.exists():
            plain.write_bytes(gzip.open(f).read())
    return str(tmp / "tv")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="*", default=["configs/fashion_mnist.yaml", "configs/cifar10.yaml"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--epoch", action="store_true", help="also one end-to-end epoch of real Fashion-MNIST")
    parser.add_argument("--epoch-rounds", type=int, default=3,
                        help="alternating rounds of the end-to-end epochs, round r with seed r (medians reported)")
    parser.add_argument("--fmnist-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--epoch-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a --set for both `vit train` epochs (repeatable), e.g. train.compile_mode=reduce-overhead")
    parser.add_argument("--only", default="", help="only the contenders whose names hold one of these comma-"
                        "separated texts (timm fp32 eager and timm's best, with each stem, are always measured)")
    parser.add_argument("--profile", action="store_true",
                        help="GPU: also each train step unsynced, and its kernel launches and device time (profiler)")
    parser.add_argument("--fp32", action="store_true",
                        help="CPU: every contender in fp32 (what a CPU without bf16, as most laptops, runs)")
    args = parser.parse_args()
    if args.epoch_rounds < 1 or args.rounds < 1:
        parser.error("--rounds and --epoch-rounds must be at least 1")
    if args.fp32 and not args.device.startswith("cpu"):
        parser.error("--fp32 is the CPU comparison; --device cuda measures fp32 beside bf16 and fp16 already")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    # `vit train` and `vit bench` keep freed memory in the process (vitcli.runtime.tune_malloc); done here for the
    # whole process, so timm's contenders and its epoch (and its DataLoader workers, where they fork) run with it too
    malloc_tuned = tune_malloc()
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "device": device.type, "malloc_tuned_for_all": malloc_tuned}
    if args.fp32:
        machine["precision"] = "fp32"
    try:  # "AMD EPYC" alone names two CPUs of 2x different speed here: keep the family and model numbers too
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        machine["cpu"] = info["model name"]
        machine["cpu_family_model"] = f"{info['cpu family']}/{info['model']}"
    except (OSError, KeyError):
        pass
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    results = {"machine": machine, "step": {}, "measured": {}, "epoch": None}
    previous = out / "vs_timm.json"
    old = json.loads(previous.read_text()) if previous.exists() else {}
    kind = ("device", "precision", "cpu", "cpu_family_model", "gpu", "malloc_tuned_for_all")
    same_kind = all(old.get("machine", {}).get(k) == machine.get(k) for k in kind)
    if old and same_kind:  # configs not measured this time keep their earlier figures (each row says when)
        results["step"] = {k: v for k, v in old.get("step", {}).items() if k not in args.configs}
        results["measured"] = {k: v for k, v in old.get("measured", {}).items() if k not in args.configs}
        results["epoch"] = None if args.epoch else old.get("epoch")
    peak_key = "fp32_matmul_peak_gflops" if args.fp32 else "bf16_matmul_peak_gflops"
    if args.configs or not (old and same_kind):
        dtype = torch.float32 if args.fp32 else torch.bfloat16
        machine[peak_key] = peak = bf16_matmul_peak(device, dtype=dtype)
    else:  # no train step measured: the peak of the run whose rows are kept
        machine[peak_key] = peak = old["machine"][peak_key]
    # every contender's train and eval graphs of the same model code in one process: more than torch's 8 per function
    # (past them it runs eagerly, silently)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)
    for path in args.configs:
        torch._dynamo.reset()  # no graph of another config's shapes: dynamo would trace this one's with symbolic sizes
        config = load_config(REPO / path)
        contenders = contenders_for(config, device, args.fp32)
        if args.only:
            keep = ["timm fp32 eager", *TIMM_BEST.values(), *args.only.split(",")]
            contenders = {k: v for k, v in contenders.items() if any(s in k for s in keep)}
        figures = measure(contenders, args.rounds, args.steps, profile=args.profile and device.type == "cuda")
        for name, f in figures.items():  # each contender's own FLOPs (its stem; timm's last block is full)
            f["stem"] = stem_of(name, config.model.stem)
            flops = forward_flops(config if f["stem"] == config.model.stem else linear_stem(config),
                                  class_token_only=name.startswith("vitcli"))
            f["train_gflops_per_second"] = 3 * flops * f["train_images_per_second"] / 1e9
        results["measured"][path] = {"date": time.strftime("%Y-%m-%d"), "stem": config.model.stem,
                                "stem_channels": config.model.stem_channels, "compile": config.train.compile,
                                "matmul_peak_gflops": peak}  # rows kept from an earlier run keep their own
        results["step"][path] = figures
        print(path, json.dumps(figures, indent=1), flush=True)
        (out / "vs_timm.json").write_text(json.dumps(results, indent=1))  # each config's figures as they come,
        (out / "vs_timm.md").write_text(markdown(results))  # so that a run stopped later (a time limit) keeps them
    if args.epoch:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tv_root = torchvision_fmnist_root(args.fmnist_root, Path(tmp))
            sets = tuple(args.epoch_set)
            runs = {"vitcli": lambda **kw: vitcli_epoch(args.fmnist_root, Path(tmp), extra=sets, **kw),
                    LINEAR_EPOCH: lambda **kw: vitcli_epoch(args.fmnist_root, Path(tmp),
                                                            extra=LINEAR_STEM_SETS + sets, **kw),
                    "timm + DataLoader": lambda **kw: timm_epoch(tv_root, device=args.device, **kw),
                    TIMM_CONV_EPOCH: lambda **kw: timm_epoch(tv_root, device=args.device, stem="conv", **kw)}
            warm_up = {name: runs[name](warm_up=True)["seconds"] for name in runs if name.startswith("vitcli")}
            print("warm-up runs (seconds)", warm_up, flush=True)
            rounds = {name: [] for name in runs}
            for r in range(args.epoch_rounds):  # alternating, the order reversed every other round
                for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    rounds[name].append({"seed": r, **runs[name](seed=r)})
                    print(name, rounds[name][-1], flush=True)
        results["epoch"] = {name: {"seconds": statistics.median(f["seconds"] for f in figures),
                                   "test_top1": statistics.median(f["test_top1"] for f in figures),
                                   **({"warm_up_seconds": warm_up[name]} if name in warm_up else {}),
                                   "rounds": figures} for name, figures in rounds.items()}
    (out / "vs_timm.json").write_text(json.dumps(results, indent=1))
    (out / "vs_timm.md").write_text(markdown(results))
    print(markdown(results))


def percent(part: float, whole: float) -> str:
    share = 100 * part / whole
    return f"{share:.0f}%" if share >= 10 else f"{share:.1f}%"


def markdown(results: dict) -> str:
    m = results["machine"]
    cpu = f"{m['cpu']} (family/model {m['cpu_family_model']})" if m.get("cpu_family_model") else m["cpu"]
    where = f"{m['gpu']} (host CPU {cpu})" if m.get("gpu") else f"{cpu}, {m['threads']} threads"
    fp32 = m.get("precision") == "fp32"
    dtype, peak = ("fp32", m["fp32_matmul_peak_gflops"]) if fp32 else ("bf16", m["bf16_matmul_peak_gflops"])
    lines = [f"Machine: {where}, torch {m['torch']}; measured {dtype} matmul peak {peak:.0f} GFLOP/s"
             + (" (every contender in fp32, as on a CPU without bf16)." if fp32 else ".")
             + (" glibc malloc tuned as `vit` does, for every contender." if m.get("malloc_tuned_for_all") else "")]
    if results["step"]:
        best_name = "timm fp32 compiled" if fp32 else "timm best"
        lines += ["", "Each row against timm's contenders with its stem: timm's ViT with its linear patch embedding, "
                  "or with the config's convolutional stem (timm's HybridEmbed over the same Conv-BatchNorm-ReLU "
                  "layers, `, conv stem`), where the run measured one.",
                  "", f"| config | contender | stem | train img/s | x timm fp32 | x {best_name} | train GFLOP/s (% of "
                  f"{dtype} peak) | eval img/s | eval x timm fp32 |", "|---|---|---|---|---|---|---|---|---|"]
    linear_rows = []
    best_key = TIMM_BEST["cpu-fp32" if fp32 else m.get("device", "cpu")]
    for path, figures in results["step"].items():
        conv_timm = "timm fp32 eager" + CONV_STEM in figures  # runs before 73784dd measured timm's linear ViT only

        def row_ratios(f: dict, stem: str) -> tuple[str, str, str]:  # train, x best, eval: against that stem's
            tail = CONV_STEM if stem != "linear" and conv_timm else ""
            base, best = figures["timm fp32 eager" + tail], figures[best_key + tail]
            return (f"{f['train_images_per_second'] / base['train_images_per_second']:.2f}",
                    f"{f['train_images_per_second'] / best['train_images_per_second']:.2f}",
                    f"{f['infer_images_per_second'] / base['infer_images_per_second']:.2f}")

        when = results.get("measured", {}).get(path)
        compiled = when and when.get("compile") and m.get("device", "cpu") == "cpu"  # on a GPU: per contender
        label = f"{path} ({when['date']}{', compiled' if compiled else ''})" if when else path
        row_peak = (when or {}).get("matmul_peak_gflops") or peak  # the peak of the run that measured the row
        if row_peak != peak:
            label += f" (peak of its run: {row_peak:.0f} GFLOP/s)"
        for name, f in figures.items():
            stem = f.get("stem") or stem_of(name, (when or {}).get("stem") or "linear")  # rows of earlier runs
            train, train_best, infer = row_ratios(f, stem)
            against = " (ratios against timm's linear stem)" if stem != "linear" and not conv_timm else ""
            lines.append(
                f"| {label} | {name}{against} | {stem} | {f['train_images_per_second']:.0f} | {train} | {train_best} | "
                f"{f['train_gflops_per_second']:.0f} ({percent(f['train_gflops_per_second'], row_peak)}) | "
                f"{f['infer_images_per_second']:.0f} | {infer} |")
            if stem != "linear" and name.startswith("vitcli") and conv_timm:
                train, train_best, infer = row_ratios(f, "linear")
                linear_rows.append(f"{path} {name}: {train}x timm fp32 eager, {train_best}x {best_name}, "
                                   f"eval {infer}x")
    if linear_rows:
        lines += ["", "The rows with a convolutional stem against timm's ViT with its linear patch embedding (the "
                  "stricter comparison: timm's model then does fewer FLOPs per image): " + "; ".join(linear_rows) + "."]
    profiled = [(path, name, f) for path, figures in results["step"].items() for name, f in figures.items()
                if "kernel_launches_per_step" in f]
    if profiled:
        lines += ["", "| config | contender | train img/s, each step waited for | not waited for | kernel launches "
                  "per step | CUDA graph replays per step | device busy ms per step |", "|---|---|---|---|---|---|---|"]
        for path, name, f in profiled:
            lines.append(f"| {path} | {name} | {f['train_images_per_second']:.0f} | "
                         f"{f['unsynced_train_images_per_second']:.0f} | {f['kernel_launches_per_step']:.0f} | "
                         f"{f['graph_replays_per_step']:.0f} | {f['device_busy_ms_per_step']:.2f} |")
    if results["epoch"]:
        e = results["epoch"]
        lines += ["", "| one epoch of real Fashion-MNIST + test | wall seconds | test top-1 |", "|---|---|---|"]
        for name, f in e.items():
            lines.append(f"| {name} | {f['seconds']:.0f} | {f['test_top1']:.4f} |")
        if len(e["vitcli"].get("rounds", [])) > 1:
            seeds = "round r with seed r, " if "seed" in e["vitcli"]["rounds"][0] else ""
            lines.append(f"\nMedians of {len(e['vitcli']['rounds'])} alternating rounds ({seeds}wall seconds / test "
                         "top-1): " + "; ".join(f"{name} " + ", ".join(
                             f"{r['seconds']:.0f} / {100 * r['test_top1']:.2f}%" for r in f["rounds"])
                             for name, f in e.items()) + ".")
        if any("warm_up_seconds" in f for f in e.values()):
            lines.append("Before the rounds each `vit train` variant ran once on 10 batches, untimed, so that "
                         "torch.compile's on-disk cache holds its graphs (as after a first run); that took "
                         + ", ".join(f"{f['warm_up_seconds']:.0f} s ({name})" for name, f in e.items()
                                     if "warm_up_seconds" in f) + ".")

        def epoch_ratios(timm: dict[str, float]) -> str:  # vitcli's commands against timm's seconds
            same = []
            if TIMM_CONV_EPOCH in timm:
                same.append(f"the recipe (conv stem) {timm[TIMM_CONV_EPOCH] / e['vitcli']['seconds']:.2f}x")
            if LINEAR_EPOCH in e:
                same.append(f"the linear stem {timm['timm + DataLoader'] / e[LINEAR_EPOCH]['seconds']:.2f}x")
            return ((f"each training the same model, {' and '.join(same)}; " if same else "")
                    + f"the recipe against timm's linear-stem ViT (fewer FLOPs) "
                    f"{timm['timm + DataLoader'] / e['vitcli']['seconds']:.2f}x")

        timm_sides = [name for name in e if name.startswith("timm")]
        lines.append(f"\nvitcli end to end against timm + DataLoader (above 1: faster), "
                     f"{epoch_ratios({n: e[n]['seconds'] for n in timm_sides})}.")
        inner = {n: [r["in_process_seconds"] for r in e[n].get("rounds", []) if "in_process_seconds" in r]
                 for n in timm_sides}
        if all(inner.values()):  # each side is timed from its command's start to its exit; timm's own clock
            own = {n: statistics.median(v) for n, v in inner.items()}  # leaves Python's start and the imports out
            lines.append("Every side is timed as a command, from its start to its exit. By timm's script's own clock "
                         "(datasets to the end of the test pass, without Python's start and the imports), medians "
                         + ", ".join(f"{own[n]:.0f} s ({n})" for n in timm_sides)
                         + f"; against those, vitcli's commands {epoch_ratios(own)}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
