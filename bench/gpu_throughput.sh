#!/bin/bash
# One device call: `loraplane bench` S2 at saturation without LoRA and with 1,000 adapters
# (the issue's >= 0.90 target), then a short LoRA kernel re-check at batch 64.
# Usage: bench/gpu_throughput.sh OUT_DIR [requests]
out=${1:?out dir}; n=${2:-200}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
for adapters in 0 1000; do
  timeout 80 loraplane bench --device cuda --dtype bfloat16 --out "$out" --log-level warning \
    --setting S2 --num-adapters "$adapters" --num-requests "$n" --saturate 2>&1 | grep -v -i warn
done
timeout 30 python3 bench/kernels/lora_bench.py --batch 64 --ranks 16 64 --out "$out" 2>&1 \
  | grep -v -i warn | tail -12
