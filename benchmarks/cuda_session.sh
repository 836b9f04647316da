#!/usr/bin/env bash
# What ran on a lent GPU, in one call (the figures are in the README, "On a GPU"). From the repo root:
#   OUT=/tmp/cuda FMNIST=/usr/share/datasets/fashion-mnist bash benchmarks/cuda_session.sh
# 1. benchmarks/vs_timm.py --device cuda: vitcli bf16/fp16/fp32, eager and compiled, against timm on the GPU.
# 2. two larger variants of configs/fashion_mnist_long.yaml trained side by side on the same GPU with `vit train`
#    (a run still going at the deadline is stopped as Ctrl-C stops it: its metrics so far stay).
# Budget: BENCH_S seconds for 1, then training until DEADLINE_S seconds after the start.
set -u
OUT=${OUT:?set OUT to a folder for the results}
PY=${PY:-python3}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
DEVICE=${DEVICE:-cuda}
BENCH_S=${BENCH_S:-200}
DEADLINE_S=${DEADLINE_S:-545}
BENCH_ARGS=${BENCH_ARGS:---steps 20}
TRAIN_SET=${TRAIN_SET:-}   # extra --set for every run (a CPU dry run shortens them)
export PYTHONUNBUFFERED=1
start=$(date +%s)
mkdir -p "$OUT/bench"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; "$PY" -c \
  'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)'; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"

timeout -s INT "$BENCH_S" "$PY" benchmarks/vs_timm.py --device "$DEVICE" --out "$OUT/bench" $BENCH_ARGS \
  > "$OUT/bench.log" 2>&1
echo "benchmark: exit $? after $(( $(date +%s) - start )) s"
[ -f "$OUT/bench/vs_timm.md" ] && cat "$OUT/bench/vs_timm.md"

runs=/tmp/vitcli-cuda-runs
rm -rf "$runs"; mkdir -p "$runs"
declare -A variants=(   # wider and deeper than the CPU recipe, which reached 93.86-93.95% single view
  [long-dim192]="--set model.dim=192 --set model.heads=3"
  [long-depth9]="--set model.depth=9"
)
left=$(( DEADLINE_S - ($(date +%s) - start) ))
echo "training ${!variants[*]} for at most $left s"
for name in "${!variants[@]}"; do
  # shellcheck disable=SC2086
  timeout -s INT -k 30 "$left" "$PY" -m vitcli train --config configs/fashion_mnist_long.yaml \
    --set "data.root=$FMNIST" --set "train.device=$DEVICE" ${variants[$name]} $TRAIN_SET \
    --run-dir "$runs/$name" > "$runs/$name.log" 2>&1 &
done
wait
for name in "${!variants[@]}"; do
  echo "== $name: $(grep -c '"epoch"' "$runs/$name/metrics.jsonl" 2>/dev/null) epochs"
  tail -n 2 "$runs/$name/metrics.jsonl" 2>/dev/null | cut -c1-400
  grep -v "it/s\|s/it" "$runs/$name.log" | tail -n 3
done
tar -C "$runs" -czf "$OUT/runs.tar.gz" --exclude='*.pt' --exclude='events.out.*' .
echo "done after $(( $(date +%s) - start )) s"
