#!/bin/bash
# One device call: `loraplane bench` S2 at saturation for each adapter count given (0: no LoRA),
# in order, then a short LoRA kernel re-check at batch 64. Busy times include Triton compiles
# and graph captures on the first use of each variant: run a small count (e.g. 5) first to warm
# the cache when comparing steady throughput; the cache's entry count is printed after each run.
# Usage: bench/gpu_throughput.sh OUT_DIR [requests] [adapter counts...]   (default: 0 1000)
out=${1:?out dir}; n=${2:-200}; shift $(($# < 2 ? $# : 2))
if [ $# -gt 0 ]; then counts=("$@"); else counts=(0 1000); fi
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
cache=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
for adapters in "${counts[@]}"; do
  timeout 80 loraplane bench --device cuda --dtype bfloat16 --out "$out" --log-level warning \
    --setting S2 --num-adapters "$adapters" --num-requests "$n" --saturate 2>&1 | grep -v -i warn
  echo "triton cache entries after n=$adapters: $(ls "$cache" 2>/dev/null | wc -l)"
done
timeout 30 python3 bench/kernels/lora_bench.py --batch 64 --ranks 16 64 --out "$out" 2>&1 \
  | grep -v -i warn | tail -12
