#!/bin/bash
# The GPU runs behind docs/BENCHMARKS.md's tier, policy and tensor-parallel tables, one part per
# device call (each part fits the device tool's 10-minute limit and its 8 returned files).
# Usage: bench/gpu_issue_runs.sh PART OUT_DIR
#   tiers  (nvidia-h200):    S2, 2,000 adapters from disk through a 16 GiB host tier and a 40 GiB
#                            pool, popularity alpha 1 and 0.3, prefetch on and off (4 runs)
#   policy (nvidia-h200):    early abort vs FCFS under overload, cv 1/2/4/8 (one process), then
#                            S2 at saturation with 0 and 1,000 adapters
#   tp     (nvidia-h200-x2): llama-2-13b S4, 100 adapters, TP 1 vs 2, and TP 2 without LoRA
part=${1:?part}; out=${2:?out dir}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
bench() { timeout "$1" python3 -m loraplane.cli bench --device cuda --dtype bfloat16 \
  --log-level warning --out "$out" "${@:2}" 2>&1 | grep -v -i -e warn -e '%|'; }
case $part in
tiers)
  for alpha in 1 0.3; do
    for pf in "" --no-prefetch; do
      bench 150 --setting S2 --num-adapters 2000 --alpha $alpha --adapter-source disk \
        --host-cache-memory 16 --pool-memory 40 --rate 6 --num-requests 150 $pf
    done
  done ;;
policy)
  bench 260 --setting S2 --num-adapters 100 --num-requests 64 --rate 12 \
    --scheduling-policy fcfs abort --cv-sweep 1 2 4 8
  for n in 0 1000; do bench 120 --setting S2 --num-adapters $n --num-requests 200 --saturate; done ;;
tp)
  timeout 560 python3 bench/tp_bench.py --shape llama-2-13b --ranks 16 32 64 --num-adapters 100 \
    --tp 1 2 --num-requests 200 --device cuda --out "$out" -- --dtype bfloat16 \
    --log-level warning 2>&1 | grep -v -i -e warn -e '%|' ;;
*) echo "unknown part $part"; exit 2 ;;
esac
