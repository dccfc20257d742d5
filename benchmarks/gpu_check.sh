#!/usr/bin/env bash
# GPU check of one SUR-adapter training step, for when a GPU machine is lent (it has not been run yet).
#
# Real-sized, randomly initialised Stable Diffusion 1.5 (UNet 860M, VAE, CLIP-L text encoder) at 512 px,
# batch 1, frozen modules in fp16 and the adapter in fp32, SDPA attention; gradient checkpointing on and
# off; latents/text cached vs recomputed every step (as the original does). 200 timed steps per
# configuration after 10 warm-up steps. Writes seconds/step and peak GPU memory (max_memory_allocated)
# to OUT/train_step_gpu.{md,json}. The original SUR-adapter reports about 5.2 GB at batch 1 fp16.
# Expected run time: 3-6 minutes on an A100/H100-class GPU; hard limit 9.5 minutes.
#
#   benchmarks/gpu_check.sh [OUT_DIR]        (default bench-out/gpu_check)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench-out/gpu_check}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'PYCHECK'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device visible")
print("GPU:", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PYCHECK
timeout 570 "$PY" benchmarks/train_step.py --device cuda --dtype fp16 --resolution 512 --batch-size 1 \
    --stacks sd15 --checkpointing both --modes recompute,cached --steps 200 --warmup 10 \
    --work "$OUT/work" --json "$OUT/train_step_gpu.json" --markdown "$OUT/train_step_gpu.md"
rm -rf "$OUT/work"
cat "$OUT/train_step_gpu.md"
