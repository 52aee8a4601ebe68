#!/usr/bin/env bash
# GPU check: on a machine with one H100/H200 and no network, generate the full-size
# Z-Image pair (30 main blocks + every auxiliary module, bf16, 2 x 12.3 GB) in a temp
# folder and run the benchmark on CUDA: (a) our CLI, (b) the peers' full SVD, (c) the
# I/O floor, then the per-layer energy check. Designed to finish in under 5 minutes.
#
#   bash benchmarks/gpu_check.sh                # from the repository root
#
# Settings (environment): BLOCKS (30), PEER_MAX_S (90: the peer factors for that long,
# then its total time is extrapolated from the share of the work done; 0 = run it to
# the end), EVAL_MAX_S (45: the per-layer energy check stops after that long; 0 = every
# layer), RUNS (a,b,c), REPEATS (1), DEVICE (cuda; cpu only to smoke-test the script),
# PYTHON (python3), KEEP=1 keeps the temp folder, TMPROOT (/tmp).
# Needs torch with CUDA, safetensors, numpy, tqdm.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BLOCKS=${BLOCKS:-30}
PEER_MAX_S=${PEER_MAX_S:-90}
EVAL_MAX_S=${EVAL_MAX_S:-45}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-a,b,c}
REPEATS=${REPEATS:-1}
TMPROOT=${TMPROOT:-/tmp}
export PYTHONUNBUFFERED=1

start=$(date +%s)
work=$(mktemp -d "$TMPROOT/ckpt2lora_gpu.XXXXXX")
cleanup() { if [ "${KEEP:-0}" != 1 ]; then rm -rf "$work"; fi; }
trap cleanup EXIT

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import torch, safetensors; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "safetensors", safetensors.__version__)'
df -h "$TMPROOT" | tail -1
free -g | sed -n 2p

echo "== generate the full-size Z-Image pair ($BLOCKS blocks) on $DEVICE"
t0=$(date +%s)
"$PYTHON" benchmarks/make_pairs.py zimage --blocks "$BLOCKS" --device "$DEVICE" --out-dir "$work/pairs"
echo "generated in $(( $(date +%s) - t0 )) s"

echo "== benchmark (device $DEVICE)"
status=0
"$PYTHON" benchmarks/bench_extract.py \
    --base "$work/pairs/zimage_b${BLOCKS}_base.safetensors" \
    --variant "$work/pairs/zimage_b${BLOCKS}_variant.safetensors" \
    --device "$DEVICE" --runs "$RUNS" --repeats "$REPEATS" \
    --peer-max-seconds "$PEER_MAX_S" --eval-max-seconds "$EVAL_MAX_S" \
    --work-dir "$work/bench" --json-out "$work/bench/results.json" || status=$?
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$work/bench/results.json" "$work/bench/evaluation.json" "$OUT/" 2>/dev/null || true
fi
echo "== total $(( $(date +%s) - start )) s"
exit $status
