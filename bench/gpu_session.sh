#!/bin/bash
# One device call (the `run` tool): engine smoke (parity, decode step and graph replay times,
# sampler GPU vs CPU) then the LoRA kernel benchmark with its launch-configuration sweep.
# Usage: bench/gpu_session.sh OUT_DIR TAG [smoke seconds] [kernel seconds]
out=${1:?out dir}; tag=${2:-}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
  --format=csv
timeout "${3:-240}" python3 bench/gpu_smoke.py --out "$out" --tag="$tag" 2>&1 \
  | grep -v -i warn | tee "$out/smoke.log"
timeout "${4:-200}" python3 bench/kernels/lora_bench.py ${KERNEL_ARGS:---sweep} --out "$out" 2>&1 \
  | grep -v -i warn | tee "$out/kernels.log"
