#!/usr/bin/env bash
# What ran on a lent GPU (the figures are in the README, "On a GPU"; its second call, for cifar10.yaml, is in
# benchmarks/NOTES.md item 26). From the repo root:
#   OUT=/tmp/cuda FMNIST=/usr/share/datasets/fashion-mnist bash benchmarks/cuda_session.sh
# 1. benchmarks/vs_timm.py --device cuda --profile: vitcli bf16/fp16/fp32, eager, compiled and compiled with CUDA
#    graphs (train.compile_mode: reduce-overhead), against timm on the GPU; each train step also unsynced and
#    profiled (kernel launches, CUDA graph replays, device busy time per step).
# 2. one end-to-end epoch of real Fashion-MNIST: `vit train` (the recipe, and timm's linear-stem model) against
#    timm + DataLoader on the GPU (with each of the two models, since 2026-11-30's same-stem contenders), with the
#    compile mode that step 1 measured faster for fashion_mnist.yaml. Step 1 also measures timm with the recipe's
#    conv stem now (two more contenders, one compiled): widen BENCH_S and DEADLINE_S if the device time allows.
# Budget: BENCH_S seconds for 1, then 2 until DEADLINE_S seconds after the start.
set -u
OUT=${OUT:?set OUT to a folder for the results}
PY=${PY:-python3}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
DEVICE=${DEVICE:-cuda}
BENCH_S=${BENCH_S:-330}
DEADLINE_S=${DEADLINE_S:-530}
BENCH_ARGS=${BENCH_ARGS:---steps 20 --rounds 3 --profile}
export PYTHONUNBUFFERED=1
start=$(date +%s)
mkdir -p "$OUT/bench" "$OUT/epoch"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; "$PY" -c \
  'import torch, timm, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__)'
  nproc; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# shellcheck disable=SC2086
timeout -s INT -k 20 "$BENCH_S" "$PY" benchmarks/vs_timm.py --device "$DEVICE" --out "$OUT/bench" $BENCH_ARGS \
  > "$OUT/bench.log" 2>&1
echo "benchmark: exit $? after $(( $(date +%s) - start )) s"
grep -v "^ \|^{\|^}" "$OUT/bench.log" | grep -iv "warn" | tail -n 20
[ -f "$OUT/bench/vs_timm.md" ] && cat "$OUT/bench/vs_timm.md"

mode=$("$PY" - "$OUT/bench/vs_timm.json" <<'EOF'
import json, sys
try:
    f = json.load(open(sys.argv[1]))["step"]["configs/fashion_mnist.yaml"]
    graphs = f["vitcli bf16 compiled, CUDA graphs"]["train_images_per_second"]
    plain = f["vitcli bf16 compiled"]["train_images_per_second"]
    print("reduce-overhead" if graphs > plain else "default")
except (OSError, KeyError, ValueError):
    print("default")
EOF
)
left=$(( DEADLINE_S - ($(date +%s) - start) ))
echo "epoch with train.compile_mode=$mode, at most $left s"
timeout -s INT -k 20 "$left" "$PY" benchmarks/vs_timm.py --device "$DEVICE" --configs --epoch --epoch-rounds 1 \
  --epoch-set "train.compile_mode=$mode" --fmnist-root "$FMNIST" --out "$OUT/epoch" > "$OUT/epoch.log" 2>&1
echo "epoch: exit $? after $(( $(date +%s) - start )) s"
tail -n 25 "$OUT/epoch.log"
