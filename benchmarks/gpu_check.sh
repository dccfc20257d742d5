#!/usr/bin/env bash
# GPU check of every adapter kind at real size, for when a GPU machine is lent (NOT RUN YET: no GPU so far).
#
# 1. benchmarks/kinds.py: random-weight SD 1.5 at 512 px and SDXL base at 1024 px, frozen modules bf16 (fp16 where
#    the GPU lacks bf16), adapters fp32, batch 1; every kind (sur, paper, reference-with-defects, connector) with
#    gradient checkpointing on and off: seconds per training step (3 warm-up + 20 timed) and peak GPU memory
#    (max_memory_allocated, reset per kind and setting); seconds per 1024/512 px image (20 steps, guidance on);
#    the connector's LLM pass per prompt (a random 2048-wide, 16-layer LLM).
# 2. benchmarks/train_step.py: the sur kind on SD 1.5 at 512 px, cached latents/text vs recomputing the VAE and
#    text encoder every step, checkpointing on and off, 50 timed steps each.
# Expected: about 4-6 minutes on one H100/H200-class GPU; each part is capped (timeout) so the whole stays under
# 9.5 minutes. Writes OUT/kinds.{md,json} and OUT/train_step_gpu.{md,json}.
#
#   benchmarks/gpu_check.sh [OUT_DIR]           on the GPU machine (default bench-out/gpu_check)
#   benchmarks/gpu_check.sh --dry [OUT_DIR]     the same script on CPU with the tiny models (checks it runs)
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; shift; fi
OUT="${1:-bench-out/gpu_check}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS

if [ "$DRY" = 1 ]; then
    KINDS_ARGS=(--tiny --device cpu --threads 1 --steps 2 --warmup 1 --image-steps 2)
    STEP_ARGS=(--device cpu --dtype fp32 --stacks tiny --checkpointing both --steps 2 --tiny-steps 2 --warmup 1 --threads 1)
else
    "$PY" - <<'PYCHECK'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device visible (use --dry for a CPU run of the script)")
p = torch.cuda.get_device_properties(0)
print("GPU:", torch.cuda.get_device_name(), f"{p.total_memory / 2**30:.0f} GiB, bf16:", torch.cuda.is_bf16_supported())
PYCHECK
    KINDS_ARGS=(--device cuda --steps 20 --warmup 3 --image-steps 20)
    STEP_ARGS=(--device cuda --dtype fp16 --resolution 512 --stacks sd15 --checkpointing both --steps 50 --warmup 5)
fi

timeout 390 "$PY" benchmarks/kinds.py "${KINDS_ARGS[@]}" --work "$OUT/work-kinds" \
    --json "$OUT/kinds.json" --markdown "$OUT/kinds.md"
LEFT=$((560 - (SECONDS - START)))
if [ "$LEFT" -gt 60 ]; then
    timeout "$LEFT" "$PY" benchmarks/train_step.py "${STEP_ARGS[@]}" --batch-size 1 --modes recompute,cached \
        --work "$OUT/work-step" --json "$OUT/train_step_gpu.json" --markdown "$OUT/train_step_gpu.md"
else
    echo "gpu_check.sh: skipped train_step.py ($LEFT s left)"
fi
rm -rf "$OUT/work-kinds" "$OUT/work-step"
cat "$OUT/kinds.md" "$OUT"/train_step_gpu.md 2>/dev/null
echo "gpu_check.sh: done in $((SECONDS - START)) s"
