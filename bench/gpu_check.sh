#!/usr/bin/env bash
# One short run on a GPU machine (issues 5 and 13): the CUDA equivalence checks (fp32, sessions that
# choose bf16/fp16 autocast or channels_last against local PyTorch on the same path; then again with
# the server's pinned host buffers), then the step-overhead benchmark at (32, 3, 224, 224) and
# (1, 3, 64, 64) with the server and local PyTorch on CUDA, side by side, every case (separate
# calls, TrainStep, the two-round-trip client loss), and the step and transfers once more with
# --pin-memory 1; then the rpc section, whose last rows go through shared memory (issue 21 item 4),
# and the ray section on CUDA (issue 21 item 5: each actor a share of the GPU). The equivalence check
# covers issue 21's uint8 images (ImageNet transform on the device) and the shared-memory region;
# the grads and upload sections measure against the standalone raw floor and carry the uint8 upload.
# Needs a Python with protos/, server/ and client/ installed and a CUDA build of torch (scripts/setup.sh, or
# PYTHON=/path/to/python). About 8-10 minutes on one H100 (estimated: not yet run with the issue 21 parts); writes its log to ${OUT:-.}/gpu_check.log.
#   bench/gpu_check.sh            # everything
#   STEP_REPS=5 bench/gpu_check.sh  # fewer repetitions
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
LOG="${OUT:-.}/gpu_check.log"
export PYTHONUNBUFFERED=1
{
  echo "== $(date -u '+%Y-%m-%d %H:%M UTC'); $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
  echo "== load average: $(cut -d' ' -f1-3 /proc/loadavg); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  "$PY" -c 'import torch, grpc; assert torch.cuda.is_available(), "no CUDA in this torch"; print("torch", torch.__version__, "grpc", grpc.__version__)'

  echo "== CUDA equivalence: server on cuda vs local cuda, same weights; per-session autocast and channels_last vs local on the same path"
  "$PY" -m bench.equivalence --device cuda --steps 3 --batch 8 --size 224

  echo "== the same with pinned host buffers and non-blocking copies (--pin-memory 1)"
  "$PY" -m bench.equivalence --device cuda --steps 2 --batch 8 --size 224 --pin-memory

  echo "== step overhead at 32x3x224x224 and 1x3x64x64 on cuda (plus grads and upload, for the transport figures)"
  "$PY" -m bench --device cuda --sections step,grads,upload --sizes 32x3x224x224,1x3x64x64 \
    --reps "${STEP_REPS:-20}" --min-reps 5 --seconds-per-case 40 --warmup 3 --transfer-reps 10 \
    --json "${OUT:-.}/gpu_bench.json"

  echo "== step and transfers at 32x3x224x224 on cuda with --pin-memory 1"
  "$PY" -m bench --device cuda --pin-memory --sections step,grads,upload --sizes 32x3x224x224 --cases full,train-step \
    --reps "${STEP_REPS:-20}" --min-reps 5 --seconds-per-case 20 --warmup 3 --transfer-reps 10 \
    --json "${OUT:-.}/gpu_bench_pinned.json"

  echo "== the co-located fast path on cuda (docs/shared-memory.md): gradients, parameters and a Forward's upload through"
  echo "== a session's shared-memory region (host memory: the server copies from the device into it) against torch.distributed.rpc"
  "$PY" -m bench --device cuda --sections rpc --sizes 1x3x64x64 --reps 5 --min-reps 3 --transfer-reps 10 --upload-reps 5 \
    --json "${OUT:-.}/gpu_bench_shared_memory.json"

  echo "== the Ray hop on cuda (issue 21 item 5): a session in an actor holding a share of the GPU against the local backend"
  "$PY" -m bench --device cuda --sections ray --ray-sizes 1x3x64x64,32x3x224x224 --reps 10 --min-reps 3 --seconds-per-case 20 \
    --json "${OUT:-.}/gpu_bench_ray.json"
} 2>&1 | tee "$LOG"
