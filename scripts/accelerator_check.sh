#!/usr/bin/env bash
# One check of whatever accelerator this machine has: the BYOL update of ResNet-50 at 224 px
# timed in float32 and in bfloat16 (`byol-jax bench step`), and the update's per-device
# memory with the largest per-device batch that fits (`byol-jax bench memory`). Prints one
# JSON object (one line) on stdout: the device's name, images/s of each precision, the bytes,
# and every figure of the three benchmarks. Synthetic data: ImageNet need not be prepared.
#
#   bash scripts/accelerator_check.sh > accelerator.json
#
# Uses .venv/bin when it exists (scripts/setup.sh, or `pip install -e '.[cuda]'` / '.[tpu]'
# into .venv), else python3 and byol-jax from PATH. Settings (environment variables):
#   RECIPE            configs/byol_imagenet.py:r50 (ResNet-50, the paper's recipe)
#   IMAGE_SIZE        224
#   PER_DEVICE_BATCH  64; BATCH (global) defaults to PER_DEVICE_BATCH x local devices
#   BENCH_STEPS       5 timed steps per round; BENCH_ROUNDS 3 rounds (medians reported)
#   MEMORY_PRECISION  bfloat16, the precision of the memory benchmark
#   MEMORY_BUDGET_GB  per-device budget of the memory search; default what jax's allocator
#                     may use on the device (memory_stats' bytes_limit: on GPUs a fraction of
#                     the memory, XLA_PYTHON_CLIENT_MEM_FRACTION), else (a CPU) available
#                     host memory / local devices
# A shrunken run that exercises every step on a CPU (a tiny ResNet-18; the memory search's
# compiles take most of the time, fewer with a smaller budget):
#   RECIPE=configs/byol_imagenet.py:smoke IMAGE_SIZE=32 BATCH=4 BENCH_STEPS=1 BENCH_ROUNDS=1 \
#     MEMORY_BUDGET_GB=0.01 bash scripts/accelerator_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/byol-jax ]; then
  PATH="$PWD/.venv/bin:$PATH"
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}

RECIPE=${RECIPE:-configs/byol_imagenet.py:r50}
IMAGE_SIZE=${IMAGE_SIZE:-224}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-64}
BENCH_STEPS=${BENCH_STEPS:-5}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
MEMORY_PRECISION=${MEMORY_PRECISION:-bfloat16}

# The device (line 1, JSON), then its local device count and memory in GiB (line 2).
PROBE=$(python3 -c '
import json, jax
from byol_jax.tools import bench_memory
devices = jax.local_devices()
limit = (devices[0].memory_stats() or {}).get("bytes_limit")
print(json.dumps(dict(device=devices[0].device_kind, platform=devices[0].platform,
                      local_devices=len(devices), memory_limit_bytes=limit)))
print(len(devices), round((limit or bench_memory.available_host_memory_bytes() // len(devices)) / 2**30, 2))')
DEVICE=$(head -n 1 <<< "$PROBE")
read -r DEVICES DEVICE_GB <<< "$(tail -n 1 <<< "$PROBE")"
if [ -z "${BATCH:-}" ]; then
  BATCH=$((PER_DEVICE_BATCH * DEVICES))
fi
MEMORY_BUDGET_GB=${MEMORY_BUDGET_GB:-$DEVICE_GB}
echo "accelerator_check: $DEVICE; $RECIPE at $IMAGE_SIZE px, global batch $BATCH" >&2

# ImageNet's sizes, given since the data set need not be prepared.
STEP_F32=$(byol-jax bench step --config="$RECIPE" --config.image_size="$IMAGE_SIZE" --config.batch_size="$BATCH" --config.precision=float32 --config.dataset.num_classes=1000 --config.dataset.num_train_examples=1281167 --bench_steps="$BENCH_STEPS" --bench_rounds="$BENCH_ROUNDS" | tail -n 1)
echo "accelerator_check: float32 step done" >&2
STEP_BF16=$(byol-jax bench step --config="$RECIPE" --config.image_size="$IMAGE_SIZE" --config.batch_size="$BATCH" --config.precision=bfloat16 --config.dataset.num_classes=1000 --config.dataset.num_train_examples=1281167 --bench_steps="$BENCH_STEPS" --bench_rounds="$BENCH_ROUNDS" | tail -n 1)
echo "accelerator_check: bfloat16 step done" >&2
MEMORY=$(byol-jax bench memory --config="$RECIPE" --config.image_size="$IMAGE_SIZE" --config.batch_size="$BATCH" --config.precision="$MEMORY_PRECISION" --config.dataset.num_classes=1000 --config.dataset.num_train_examples=1281167 --memory_budget_gb="$MEMORY_BUDGET_GB" | tail -n 1)
echo "accelerator_check: memory done" >&2

python3 - "$DEVICE" "$STEP_F32" "$STEP_BF16" "$MEMORY" <<'EOF'
import json
import sys

device, f32, bf16, memory = (json.loads(arg) for arg in sys.argv[1:])
print(json.dumps(dict(
    **device,
    encoder=f32["encoder"], width=f32["width"], image_size=f32["image_size"],
    batch_size=f32["batch_size"],
    images_per_sec_float32=f32["images_per_sec"],
    images_per_sec_bfloat16=bf16["images_per_sec"],
    step_ms_float32=f32["step_ms"], step_ms_bfloat16=bf16["step_ms"],
    memory_precision=memory["precision"],
    memory_per_device_batch=memory["per_device_batch"],
    memory_total_bytes=memory["total_bytes"],
    memory_budget_gb=memory["budget_gb"],
    largest_per_device_batch=memory["largest_per_device_batch"],
    step_float32=f32, step_bfloat16=bf16, memory=memory)))
EOF
