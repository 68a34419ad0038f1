#!/bin/bash
# The GPU runs behind docs/BENCHMARKS.md's tier, policy and tensor-parallel tables, one part per
# device call (each part fits the device tool's 10-minute limit and its 8 returned files).
# Usage: bench/gpu_issue_runs.sh PART OUT_DIR
#   tiers  (one H200): S2, 2,000 adapters from disk through a 16 GiB host tier and a 40 GiB pool,
#                      popularity alpha 1 and 0.3, prefetch on and off, at 6 req/s (4 runs)
#   policy (one H200): early abort vs FCFS under overload, cv 1/2/4/8 (one process), then S2 at
#                      saturation with 0 and 1,000 adapters
#   tp     (two H200): llama-2-13b S4, 100 adapters, TP 1 vs 2, and TP 2 without LoRA, eager;
#                      `python bench/tp_bench.py --from-runs <their JSON>` summarizes them
#   tpg    (two H200): TP graphs check (bench/tp_graph_check.py), then llama-2-13b S4, 100
#                      adapters with CUDA graphs: TP 1, TP 2, TP 2 without LoRA, and TP 2 with
#                      the LoRA op's collectives skipped (wrong outputs; measures their cost)
#   x2     (two H200): tp, then the tier runs at saturation (GPU 0) beside the policy sweep
#                      (GPU 1)
#   tiers2 (one H200, < 4.5 min): x2's tier runs alone: S2, 2,000 adapters from disk, 120
#                      requests queued at once, alpha 1 and 0.3, prefetch on and off
#   policy2 (one H200, < 4.5 min): early abort vs FCFS, cv 1/2/4/8, S2, 100 adapters, 240
#                      requests at 30 req/s (about 3.5x the ~8.5 req/s S2 serves at
#                      saturation: the queue grows by ~20 req/s while arrivals last, so later
#                      requests wait past the 6 s SLO under FCFS); each replay starts with no
#                      adapter on the GPU or in host RAM; the JSON is rewritten after each replay
#                      (cv by cv, both policies), so a cut-short run keeps the pairs it finished
#   x2b    (two H200): tiers2 then bench/fused_check.py on GPU 0; policy2 then S2 at
#                      saturation with 0 and 1,000 adapters on GPU 1
#   s2prof (two H200): S2 saturation ratios (0/1,000, 5/2,000 adapters), a profiled S2 run,
#                      tier runs at alpha 1 and the LoRA kernel bench
#   c3 (two H200): TP graphs check; LoRA kernel bench, S2 ratios, 32 rows vs PEFT, tier runs,
#                  fused-layer check
#   c6 (two H200): c3 without the TP check
#   c8 (two H200): the rotary-store launch checked (TP graphs, fused logits, batch 1), 32-row
#                  PEFT ratio, S2 0 / 1,000 and a profile of the 1,000-adapter run's early steps
#   e8 (two H200): TP graphs check, fused logits and batch 1, S2 0 / 1,000 / 5 / 2,000 with the
#                  decode steps' adapter bytes, profiles of S2's decode steps, LoRA launch
#                  variants on the S2 rank mix
#   r25 (two H200): S2 5 vs 2,000 adapters side by side
#   w1 (one H200): the TP engine at world size 1 against one GPU, without and with the overlap
#   ovl (two H200): LoRA collectives overlapped with the base GEMMs: S4 / S6 TP 2
#   adm (two H200): batched admissions: S4 TP 2 (100 / skip / none / admit 1), TP 1, S2 0 / 1,000
#   hp (two H200): cProfile of rank 0's host thread, S4 TP 2 / TP 1 with 100 adapters, TP 1
#                  without LoRA
#   d7 (two H200): kernels checked after the b8f9a07 refactor, 32-row PEFT ratio, S4 TP 2
#                  profiled on both ranks
#   x4a (four H200): TP 4 graphs check, fused logits and batch 1, S4 at TP 1 / 2 / 4 (issue #6)
#   x4b (four H200): S6 (llama-2-70b, rank 64) at TP 4, 0 / 10 / 100 adapters (issue #6)
#   s6 (S6_TP H200, default two): the same at TP S6_TP
#   p9 (two H200): p8, then a profile of the same steps of S4 at TP 2 with 100 adapters
#   tpfix (two H200): S4 / S6 at TP 2 after the workers' packed adapter shards
#   p8 (two H200): profiles of S2's early (prefill and mixed) steps, 1,000 adapters vs none
#   c7 (two H200): TP check; S4 TP 2 with and without LoRA collectives; kernel bench; S2 ratios
#   k1 (one H200): LoRA kernel launch variants at batch 64; profiled batch-1 decode
#   c5 (two H200): policy sweep cv 1/2/4/8; tier runs at alpha 0.3; S2 0 / 1,000 again
#   verify (two H200): TP graphs check, then tier runs (GPU 0) beside a short policy sweep and
#                      S2 at saturation with 0 and 1,000 adapters (GPU 1): the first call of a
#                      session after the changes of 2026-11-30 16:50-17:30 UTC
# Every run's output also goes to OUT_DIR/runs-gpuN.log (a run cut short by the device's time
# limit still leaves its log; the summary lines alone reach the terminal).
part=${1:?part}; out=${2:?out dir}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
mkdir -p "$out"
bench() {
  local log="$out/runs-gpu${CUDA_VISIBLE_DEVICES:-all}.log"
  echo "== $(date -u +%T) bench ${*:2}" >> "$log"
  timeout "$1" python3 -m loraplane.cli bench --device cuda --dtype bfloat16 \
    --log-level warning --out "$out" "${@:2}" 2>&1 | tr '\r' '\n' \
    | grep --line-buffered -v -e '%|' -e '^ *$' | tee -a "$log" | grep -v -i warn
  echo "== $(date -u +%T) exit ${PIPESTATUS[0]}" >> "$log"
}
# The four tier runs at saturation (each about 40 s: adapter folders, 2,000 registrations,
# engine build, 120 requests).
tiers_sat() {  # time limit per run, then extra bench arguments
  for alpha in 1 0.3; do
    for pf in "" --no-prefetch; do
      bench "$1" --setting S2 --num-adapters 2000 --alpha $alpha --adapter-source disk \
        --host-cache-memory 16 --pool-memory 40 --saturate --num-requests 120 $pf "${@:2}"
    done
  done
}
# The TP summary table of a setting's runs in OUT (bench/tp_bench.py), then those runs' JSON
# packed into one archive and the logs moved out, so no more than 8 files come back.
tp_table() {  # setting, out dir
  python3 bench/tp_bench.py --setting "$1" --from-runs "$2"/bench-*-"$1"-*.json --out "$2"
  tar czf "$2/runs-$1.tgz" -C "$2" $(cd "$2" && ls bench-*.json) && rm "$2"/bench-*.json
  mkdir -p /tmp/logs && mv "$2"/*.log /tmp/logs/ 2>/dev/null; ls "$2"
}
# One line per bench JSON: its name after the date and machine, throughput and step times.
run_lines() {
  python3 -c 'import json, sys
for f in sys.argv[1:]:
    r = json.load(open(f))["results"]["loraplane"]
    print(f.split("/")[-1][27:], *(f"{k}={r.get(k)}" for k in ("req_per_s",
          "decode_step_ms_p50", "decode_steps_s", "other_steps_s", "steps_total")))' "$@"
}
# The two GPUs' logs without their headers: the last lines of each run.
summary() {
  grep -h -v -e '^ *$' /tmp/gpu0.log /tmp/gpu1.log | grep -v -e "^date" -e "^engine:" \
    -e "^versions" -e "^machine" | tail -40
}
case $part in
e14)  # one H200, ~4 min: launch variants on S2's rank mix (64 and 5 adapters), then part e12
     # (run at 648b940 for an experiment since removed: 16-row tiles multiplying 128 columns
     # at a time inside the 256-column block; the S2 runs right after the sweep ran hot)
  timeout 150 python3 bench/kernels/lora_variants.py --ranks 0 --adapters 0 5 --static \
    --out "$out" 2>&1 | grep -v -i warn | grep -v "^{'rank'" | tail -6
  bash "$0" e12 "$out" ;;
e13)  # one H200, ~2.5 min: the LoRA kernels' bandwidth at decode batch 64 with the expand's new
     # launch rule: the kernel bench (q, gate, down alone, ranks 16 and 64), then the engine's
     # q,k,v and o_proj launches at rank 64 and 16, one adapter a row, graph metadata
  timeout 90 python3 bench/kernels/lora_bench.py --batch 64 --ranks 16 64 --out "$out" 2>&1 \
    | grep -v -i warn | tail -9
  timeout 200 python3 bench/kernels/lora_variants.py --ranks 64 16 --static --out "$out" 2>&1 \
    | grep -v -i warn | grep -v "^{'rank'" | tail -8 ;;
e12)  # one H200, ~3.5 min: #3's S2 ratios on one GPU, one run after another, the expand's new
     # launch rule: 0, 1,000, 5 and 2,000 adapters, 200 requests queued at once
  for n in 0 1000 5 2000; do
    bench 95 --setting S2 --num-adapters $n --num-requests 200 --saturate | tail -1
  done
  run_lines "$out"/bench-*.json; mkdir -p /tmp/logs; mv "$out"/*.log /tmp/logs/ ;;
e11)  # two H200, ~3 min: the expand's launch rule A/B in the engine, side by side: S2 with
     # 1,000 and 5 adapters, the rule before (32 rank rows x 128 columns, GPU 0) and the new one
     # (16 x 256, GPU 1), then S2 without LoRA on each GPU
  (export CUDA_VISIBLE_DEVICES=0 LORAPLANE_LORA_EXPAND_TILE=32x128
   for n in 1000 5; do
     bench 95 --setting S2 --num-adapters $n --num-requests 200 --saturate \
       --out "$out/old" | tail -1
   done
   bench 95 --setting S2 --num-adapters 0 --num-requests 200 --saturate --out "$out/old" | tail -1
  ) > /tmp/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   for n in 1000 5 0; do
     bench 95 --setting S2 --num-adapters $n --num-requests 200 --saturate | tail -1
   done
  ) > /tmp/gpu1.log 2>&1 &
  wait
  for d in "$out/old" "$out"; do echo "== $d"; run_lines "$d"/bench-*.json; done
  mkdir -p /tmp/logs; mv "$out"/*.log /tmp/logs/; ls -R "$out" ;;
e10)  # two H200, ~6 min: the expand's new launch rule (16 rank rows x 256 columns a program):
     # launch variants on S2's rank mix at batch 64 on 64 and on 5 adapters, then the 32-row
     # PEFT ratio (GPU 0); #3's S2 ratios, 0 / 1,000 / 5 / 2,000 adapters (GPU 1)
  (export CUDA_VISIBLE_DEVICES=0
   timeout 200 python3 bench/kernels/lora_variants.py --ranks 0 --adapters 0 5 --static \
     --out "$out" 2>&1 | grep -v -i warn | grep -v "^{'rank'" | tail -7
   bench 200 --setting S2 --ranks 16 --num-adapters 32 --num-requests 32 --round-robin-adapters \
     --input-range 256 256 --output-range 64 64 --max-num-seqs 32 --saturate --baseline peft
  ) > /tmp/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   for n in 0 1000 5 2000; do
     bench 95 --setting S2 --num-adapters $n --num-requests 200 --saturate | tail -2
   done
  ) > /tmp/gpu1.log 2>&1 &
  wait
  summary
  run_lines "$out"/bench-*.json
  python3 -c 'import json, sys
for f in sys.argv[1:]:
    r = json.load(open(f))["results"]["loraplane"]
    print(f.split("/")[-1][27:], *(f"{k}={r.get(k)}" for k in ("decode_adapters_p50",
          "decode_lora_mb_p50", "decode_lora_floor_ms_p50")))' "$out"/bench-*.json
  python3 - "$out" <<'PY'
import json, glob, sys
for f in glob.glob(sys.argv[1] + "/lora-variants-*.json"):
    for r in json.load(open(f))["rows"]:
        ex = sorted(r["all"]["expand"], key=lambda c: c["us"])[:4]
        print(r["rank"], r["adapters"], r["group"], "default", r["default_us"], "best sum",
              r["best_sum_us"], "shrink", r["best"]["shrink"]["us"])
        for c in ex: print("  E", c)
PY
  mkdir -p /tmp/logs; mv "$out"/*.log /tmp/logs/; ls "$out" ;;
e9)  # two H200, ~4 min: the expand's launch variants with rank tiles of 16 (at e94f260 also
    # column blocks grouped per program, since removed): S2's rank mix at batch 64 as a decode
    # graph holds it (GPU 0); one adapter a row at rank 16 and 64, then the kernel bench (GPU 1)
  (export CUDA_VISIBLE_DEVICES=0
   timeout 280 python3 bench/kernels/lora_variants.py --ranks 0 --static --out "$out/mix" 2>&1 \
     | grep -v -i warn | tail -6
  ) > /tmp/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   timeout 200 python3 bench/kernels/lora_variants.py --ranks 16 64 --static --out "$out/one" \
     2>&1 | grep -v -i warn | tail -8
   timeout 90 python3 bench/kernels/lora_bench.py --batch 64 --ranks 16 64 --out "$out" 2>&1 \
     | grep -v -i warn | tail -9
  ) > /tmp/gpu1.log 2>&1 &
  wait
  cat /tmp/gpu0.log /tmp/gpu1.log | grep -v "^{'rank'" | cut -c1-200; ls "$out" ;;
e8)  # two H200, ~7.5 min, session 8's first call: the TP graphs check on tiny-kv8 (first GPU
    # run of 0523910's shared fused-group expand); then on GPU 0 fused vs unfused logits and
    # the batch-1 step, and profiles of S2's decode steps 300-339 with 1,000 adapters and
    # with none; beside them on GPU 1 #3's S2 ratios (0 / 1,000 and 5 / 2,000 adapters, 200
    # requests queued at once; each run now records the adapter bytes its decode steps read)
    # and the LoRA kernels' launch variants on S2's rank mix at batch 64 (graph metadata)
  timeout 150 python3 bench/tp_graph_check.py --tp 2 --model random:tiny-kv8 --out "$out" 2>&1 \
    | grep -e "^ *[0-9]" -e tp= -e Error -e error | tail -8
  mkdir -p "$out/profiled"
  (export CUDA_VISIBLE_DEVICES=0
   timeout 150 python3 bench/fused_check.py --out "$out" 2>&1 | grep -v -i warn | tail -8
   for n in 1000 0; do
     bench 100 --setting S2 --num-adapters $n --num-requests 200 --saturate \
       --profile-steps 300 40 --out "$out/profiled" | tail -2
   done
  ) > /tmp/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   for n in 0 1000 5 2000; do
     bench 95 --setting S2 --num-adapters $n --num-requests 200 --saturate | tail -2
   done
   timeout 150 python3 bench/kernels/lora_variants.py --ranks 0 --static --out "$out" 2>&1 \
     | grep -v -i warn | tail -12
  ) > /tmp/gpu1.log 2>&1 &
  wait
  summary
  run_lines "$out"/bench-*.json "$out"/profiled/bench-*.json
  for f in "$out"/profiled/profile-*.txt; do echo "== $f"; head -30 "$f" | cut -c1-72,143-170,199-212; done
  mv "$out"/profiled/profile-*.txt "$out"/
  tar czf "$out/runs-e8.tgz" -C "$out" $(cd "$out" && ls bench-*.json profiled/bench-*.json)
  rm -rf "$out"/bench-*.json "$out"/profiled; mkdir -p /tmp/logs; mv "$out"/*.log /tmp/logs/
  ls "$out" ;;
r25)  # two H200, ~1.5 min: #3's 2,000 vs 5 adapters ratio with batched admissions (S2, 200
     # requests queued at once; 5 adapters on GPU 0 beside 2,000 on GPU 1)
  (export CUDA_VISIBLE_DEVICES=0
   bench 95 --setting S2 --num-adapters 5 --num-requests 200 --saturate) > /tmp/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   bench 95 --setting S2 --num-adapters 2000 --num-requests 200 --saturate) > /tmp/gpu1.log 2>&1 &
  wait
  grep -h -e '^loraplane' -e '^->' /tmp/gpu0.log /tmp/gpu1.log; rm -f "$out"/*.log ;;
w1)  # one H200, ~3 min: the TP engine at world size 1 (NCCL collectives of one rank) against the
    # one-GPU engine, eager and with graphs: the TP LoRA op's group expand on fused layers, then
    # the same with its collectives started asynchronously (LORAPLANE_TP_LORA_OVERLAP=1)
  for ov in 0 1; do
    LORAPLANE_TP_LORA_OVERLAP=$ov timeout 150 python3 bench/tp_graph_check.py --tp 1 \
      --model random:tiny-kv8 --out "$out/overlap$ov" 2>&1 \
      | grep -e "^ *[0-9]" -e tp= -e Error -e error | tail -8
  done ;;
ovl)  # two H200, ~5.5 min (~8.5 with OVL_S6=1): the LoRA collectives started before the base
     # GEMMs (async, on NCCL's stream): the TP graphs check (collectives captured async),
     # S4 TP 2 with 100 adapters with the overlap, without it, and with the collectives
     # skipped; then (OVL_S6) S6 TP 2 with 100 adapters and with its collectives skipped; a
     # line per run
  LORAPLANE_TP_LORA_OVERLAP=1 timeout 150 python3 bench/tp_graph_check.py --tp 2 \
    --model random:tiny-kv8 --out "$out/overlap" 2>&1 | grep -e "^ *[0-9]" -e tp= -e Error \
    -e error | tail -8
  TPG_RUNS="2:100 2:100:nooverlap 2:100:skip" bash "$0" tpg-runs "$out"
  [ -n "${OVL_S6:-}" ] && TPG_SETTING=S6 TPG_LIMIT=110 TPG_REQUESTS=100 \
    TPG_ARGS="--host-cache-memory 24" TPG_RUNS="2:100 2:100:skip" bash "$0" tpg-runs "$out"
  mkdir -p /tmp/logs && mv "$out"/*.log /tmp/logs/ 2>/dev/null
  run_lines "$out"/bench-*.json ;;
adm)  # two H200, ~8 min: admissions batched into nearly full graph batches (the default,
     # --admission-batch 8): S4 TP 2 with 100 adapters, with the LoRA collectives skipped,
     # without LoRA, and with --admission-batch 1 (every free slot filled at once, as before);
     # then S4 TP 1 with 100 adapters and S2 without LoRA (GPU 0) beside S2 with 1,000 (GPU 1)
  TPG_RUNS="2:100 2:100:skip 2:0" bash "$0" tpg-runs "$out"
  TPG_RUNS="2:100" TPG_ARGS="--admission-batch 1" bash "$0" tpg-runs "$out"
  (export CUDA_VISIBLE_DEVICES=0
   TPG_RUNS="1:100" bash "$0" tpg-runs "$out"
   bench 95 --setting S2 --num-adapters 0 --num-requests 200 --saturate) > /tmp/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   bench 95 --setting S2 --num-adapters 1000 --num-requests 200 --saturate
   bench 95 --setting S2 --num-adapters 1000 --num-requests 200 --saturate --admission-batch 1
  ) > /tmp/gpu1.log 2>&1 &
  wait
  mkdir -p /tmp/logs && mv "$out"/*.log /tmp/logs/ 2>/dev/null
  run_lines "$out"/bench-*.json ;;
hp)  # two H200, ~5 min: where rank 0's host time goes (cProfile of steps 5-154): S4 TP 2 with
    # 100 adapters; then S4 TP 1 with 100 adapters (GPU 0) beside S4 TP 1 without LoRA
    # (GPU 1); the top of each profile
  mkdir -p "$out/tp2" "$out/tp1" "$out/tp1n0"
  bench 170 --setting S4 --num-adapters 100 --tensor-parallel-size 2 --saturate \
    --num-requests 150 --sets-per-rank 4 --profile-steps 5 150 --profile-python \
    --out "$out/tp2" | tail -1
  (export CUDA_VISIBLE_DEVICES=0
   bench 170 --setting S4 --num-adapters 100 --saturate --num-requests 150 --sets-per-rank 4 \
     --profile-steps 5 150 --profile-python --out "$out/tp1") > /tmp/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   bench 170 --setting S4 --num-adapters 0 --saturate --num-requests 150 \
     --profile-steps 5 150 --profile-python --out "$out/tp1n0") > /tmp/gpu1.log 2>&1 &
  wait
  grep -h -e '^loraplane' /tmp/gpu0.log /tmp/gpu1.log
  mkdir -p /tmp/logs && find "$out" -name '*.log' -exec mv {} /tmp/logs/ \;
  for f in "$out"/*/profile-*.txt; do echo "== $f"; head -40 "$f" | cut -c1-150; done ;;
d7)  # two H200, ~9 min, session 7's first call: the compiled kernels after b8f9a07's refactor
    # (TP graphs check on tiny-kv8, fused vs unfused logits and batch 1, the kernel bench), the
    # 32-row PEFT ratio beside them; then S4 TP 2 with 100 adapters profiled on both ranks
    # (steps 5-64: admissions and prefills), then the same run unprofiled
  timeout 150 python3 bench/tp_graph_check.py --tp 2 --model random:tiny-kv8 --out "$out" 2>&1 \
    | grep -e "^ *[0-9]" -e tp= -e Error -e error | tail -8
  (export CUDA_VISIBLE_DEVICES=0
   timeout 150 python3 bench/fused_check.py --out "$out" 2>&1 | grep -v -i warn | tail -8
   timeout 90 python3 bench/kernels/lora_bench.py --batch 16 64 --ranks 16 64 --out "$out" 2>&1 \
     | grep -v -i warn | tail -9
  ) > /tmp/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   bench 200 --setting S2 --ranks 16 --num-adapters 32 --num-requests 32 --round-robin-adapters \
     --input-range 256 256 --output-range 64 64 --max-num-seqs 32 --saturate --baseline peft
  ) > /tmp/gpu1.log 2>&1 &
  wait
  summary
  mkdir -p "$out/profiled"
  bench 150 --setting S4 --num-adapters 100 --tensor-parallel-size 2 --saturate \
    --num-requests 150 --sets-per-rank 4 --profile-steps 5 60 --out "$out/profiled" | tail -2
  TPG_RUNS="2:100" bash "$0" tpg-runs "$out"
  mkdir -p /tmp/logs && mv "$out"/*.log "$out"/profiled/*.log /tmp/logs/ 2>/dev/null
  for f in "$out"/profiled/profile-*.txt; do echo "== $f"; head -30 "$f" | cut -c1-72,143-170,199-212; done
  ls -R "$out" ;;
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
tp)  # each run writes its JSON at once
  for spec in "1 100" "2 100" "2 0"; do
    set -- $spec
    bench 100 --setting S4 --ranks 16 32 64 --num-adapters "$2" --tensor-parallel-size "$1" \
      --saturate --num-requests 150 --sets-per-rank 4 --no-cuda-graphs | tail -4
  done ;;
tpg|tpg-runs)  # tpg-runs: the S4 runs alone
  [ "$part" = tpg ] && timeout 150 python3 bench/tp_graph_check.py --tp 2 --out "$out" 2>&1 \
    | grep -e "^ *[0-9]" -e tp= -e Error -e error | tail -8
  # TPG_SETTING (default S4), TPG_REQUESTS, TPG_LIMIT (seconds a run) and TPG_ARGS (extra
  # bench arguments) serve the S6 runs too
  # TP size:adapters[:skip|:nooverlap]
  for spec in ${TPG_RUNS:-1:100 2:100 2:0 2:100:skip}; do
    IFS=: read -r -a f <<< "$spec"; set -- "${f[@]}"
    # shellcheck disable=SC2086  # TPG_ARGS is a list of words
    LORAPLANE_TP_SKIP_LORA_COLLECTIVES=$([ "$3" = skip ] && echo 1 || echo 0) \
      LORAPLANE_TP_LORA_OVERLAP=$([ "$3" = nooverlap ] && echo 0 || echo 1) \
      bench "${TPG_LIMIT:-140}" --setting "${TPG_SETTING:-S4}" --num-adapters "$2" \
      --tensor-parallel-size "$1" --saturate --num-requests "${TPG_REQUESTS:-150}" \
      --sets-per-rank 4 \
      ${TPG_ARGS:-} | tail -3
  done ;;
x4a)  # four H200, ~8 min, the first call on four GPUs: the TP 4 graphs check (also the first
      # GPU run of the rotary launch that stores k and v, 6056f06); fused vs unfused logits and
      # the batch-1 step (GPU 0) beside S4 TP 1 (GPU 1) and TP 2 (GPUs 2, 3); then S4 at TP 4
      # with 100 adapters, none, and 100 with the LoRA collectives skipped; the S4 scaling table
  timeout 150 python3 bench/tp_graph_check.py --tp 4 --model random:tiny-kv8 --out "$out" 2>&1 \
    | grep -e "^ *[0-9]" -e tp= -e Error -e error | tail -8
  (export CUDA_VISIBLE_DEVICES=0
   timeout 150 python3 bench/fused_check.py --out "$out" 2>&1 | grep -v -i warn | tail -8
  ) > /tmp/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1; TPG_RUNS="1:100" bash "$0" tpg-runs "$out") > /tmp/gpu1.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=2,3; TPG_RUNS="2:100 2:0" bash "$0" tpg-runs "$out"
  ) > /tmp/gpu23.log 2>&1 &
  wait
  cat /tmp/gpu0.log; grep -h -e '^loraplane' -e '^->' /tmp/gpu1.log /tmp/gpu23.log
  TPG_RUNS="4:100 4:0 4:100:skip" bash "$0" tpg-runs "$out"
  tp_table S4 "$out" ;;
x4b|s6)  # four H200 (x4b), or S6_TP GPUs (s6), ~9.5 min: S6 (llama-2-70b shapes, rank 64) at
        # TP 4 (or S6_TP): no LoRA, 10 and 100 adapters, and 100 with the LoRA collectives
        # skipped (100 requests each); the S6 table; then the TP graphs check at that size
        # (tiny-kv8 now has 16-wide heads and chunks)
  tp=$([ "$part" = s6 ] && echo "${S6_TP:-2}" || echo 4)
  TPG_SETTING=S6 TPG_LIMIT=120 TPG_REQUESTS=100 TPG_ARGS="--host-cache-memory 24" \
    TPG_RUNS="$tp:0 $tp:10 $tp:100 $tp:100:skip" bash "$0" tpg-runs "$out"
  tp_table S6 "$out"
  timeout 90 python3 bench/tp_graph_check.py --tp "$tp" --model random:tiny-kv8 --out "$out" \
    2>&1 | grep -e "^ *[0-9]" -e tp= -e Error -e error | tail -8 ;;
x2b)  # two H200 at once: tier runs then the fused-layer check on GPU 0; the policy sweep then
      # S2 at saturation with 0 and 1,000 adapters on GPU 1. Tier and policy runs keep the
      # unfused layers (set before the fused ones had run on a GPU).
  (export CUDA_VISIBLE_DEVICES=0
   tiers_sat 90 --no-fused-layers
   timeout 200 python3 bench/fused_check.py --out "$out" 2>&1 | grep -v -i warn | tail -12
  ) > /tmp/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   bench 265 --setting S2 --num-adapters 100 --num-requests 240 --rate 30 \
     --scheduling-policy fcfs abort --cv-sweep 1 2 4 8 --no-fused-layers
   for n in 0 1000; do bench 100 --setting S2 --num-adapters $n --num-requests 200 --saturate; done
  ) > /tmp/gpu1.log 2>&1 &
  wait
  grep -h -v -e '^ *$' /tmp/gpu0.log /tmp/gpu1.log | grep -v -e "^date" -e "^engine:" | tail -60 ;;
verify)  # two H200, ~9.5 min: what this code changed since the last GPU runs, first thing
  # TP graphs with the fused layers (never run together on a GPU yet)
  timeout 150 python3 bench/tp_graph_check.py --tp 2 --out "$out" 2>&1 \
    | tee "$out/tp-graph-check.log" | grep -e "^ *[0-9]" -e tp= -e Error -e error | tail -8
  (export CUDA_VISIBLE_DEVICES=0; tiers_sat 95) &  # host tier pinned up front, new loader
  (export CUDA_VISIBLE_DEVICES=1
   bench 230 --setting S2 --num-adapters 100 --num-requests 240 --rate 30 \
     --scheduling-policy fcfs abort --cv-sweep 1 4   # the abort estimate's measured rate
   for n in 0 1000; do bench 75 --setting S2 --num-adapters $n --num-requests 200 --saturate; done
  ) &
  wait ;;
s2prof)  # two H200, ~6 min: S2 ratios with loads off the engine thread (GPU 0); a profiled
         # S2 1,000-adapter run, prefetch on/off at alpha 1 and the LoRA kernel bench (GPU 1)
  (export CUDA_VISIBLE_DEVICES=0
   for n in 0 1000 5 2000; do
     bench 95 --setting S2 --num-adapters $n --num-requests 200 --saturate
   done) &
  (export CUDA_VISIBLE_DEVICES=1
   bench 100 --setting S2 --num-adapters 1000 --num-requests 200 --saturate --profile-steps 150 60 \
     --out "$out/profiled"
   for pf in "" --no-prefetch; do
     bench 95 --setting S2 --num-adapters 2000 --alpha 1 --adapter-source disk \
       --host-cache-memory 16 --pool-memory 40 --saturate --num-requests 120 $pf
   done
   timeout 90 python3 bench/kernels/lora_bench.py --batch 16 64 --ranks 16 64 --out "$out" 2>&1 \
     | grep -v -i warn | tail -12
  ) &
  wait ;;
c3)  # two H200, ~7 min: after the LoRA launch cuts (module masks, group expand, page lookups
    # hoisted, no per-step specializations): TP graphs check, then c6's runs
  timeout 150 python3 bench/tp_graph_check.py --tp 2 --out "$out" 2>&1 \
    | tee "$out/tp-graph-check.log" | grep -e "^ *[0-9]" -e tp= -e Error -e error | tail -8
  bash "$0" c6 "$out" ;;
c8)  # two H200, ~6 min, the next session's first call: the rotary launch that stores k and v
    # (6056f06, CPU-tested only) checked on the GPU (TP graphs check; fused vs unfused logits
    # and the batch-1 step), then the 32-row PEFT ratio and S2 0 / 1,000 with a profile of the
    # early steps
  timeout 150 python3 bench/tp_graph_check.py --tp 2 --out "$out" 2>&1 \
    | grep -e "^ *[0-9]" -e tp= -e Error -e error | tail -8
  (export CUDA_VISIBLE_DEVICES=0
   timeout 150 python3 bench/fused_check.py --out "$out" 2>&1 | grep -v -i warn | tail -8
   for n in 0 1000; do bench 95 --setting S2 --num-adapters $n --num-requests 200 --saturate; done
  ) > /tmp/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   bench 200 --setting S2 --ranks 16 --num-adapters 32 --num-requests 32 --round-robin-adapters \
     --input-range 256 256 --output-range 64 64 --max-num-seqs 32 --saturate --baseline peft
   out="$out/profiled"; mkdir -p "$out"  # its JSON would take the unprofiled run's name
   bench 95 --setting S2 --num-adapters 1000 --num-requests 200 --saturate --profile-steps 5 60
  ) > /tmp/gpu1.log 2>&1 &
  wait
  summary
  mkdir -p /tmp/logs && mv "$out"/*.log "$out"/profiled/*.log /tmp/logs/ 2>/dev/null
  ls -R "$out" ;;
p8)  # two H200, ~2 min: where S2's prefill and mixed steps go with 1,000 adapters (GPU 0)
    # and without LoRA (GPU 1): profiles of steps 5..64 (admissions and prefills happen there)
  (export CUDA_VISIBLE_DEVICES=0
   bench 95 --setting S2 --num-adapters 1000 --num-requests 200 --saturate --profile-steps 5 60
  ) > /tmp/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   bench 95 --setting S2 --num-adapters 0 --num-requests 200 --saturate --profile-steps 5 60
  ) > /tmp/gpu1.log 2>&1 &
  wait
  grep -h -A2 '^system' /tmp/gpu0.log /tmp/gpu1.log
  for f in "$out"/profile-*.txt; do echo "== $f"; head -c 5000 "$f"; done ;;
p9)  # two H200, ~4 min: p8, then the same early steps of S4 at TP 2 with 100 adapters (rank
    # 0's profile): where LoRA's prefill and mixed steps go, at one GPU and at two
  bash "$0" p8 "$out" > /tmp/p8.log 2>&1
  grep -h -A2 '^system' /tmp/gpu0.log /tmp/gpu1.log
  bench 150 --setting S4 --num-adapters 100 --tensor-parallel-size 2 --saturate \
    --num-requests 150 --sets-per-rank 4 --profile-steps 5 60 | tail -3
  mkdir -p /tmp/logs && mv "$out"/*.log /tmp/logs/ 2>/dev/null
  for f in "$out"/profile-*.txt; do echo "== $f"; head -24 "$f" | cut -c1-72,143-170,199-212; done ;;
tpfix)  # two H200, ~6 min: after TP workers pack their adapter shards (pinned, so a load in a
       # step is one asynchronous copy): S4 TP 2 with 100 adapters, with and without the LoRA
       # collectives; S6 TP 2 with 100 and 10 adapters; a line per run with its step times
  TPG_RUNS="2:100 2:100:skip" bash "$0" tpg-runs "$out"
  TPG_SETTING=S6 TPG_LIMIT=120 TPG_REQUESTS=100 TPG_ARGS="--host-cache-memory 24" \
    TPG_RUNS="2:100 2:10" bash "$0" tpg-runs "$out"
  mkdir -p /tmp/logs && mv "$out"/*.log /tmp/logs/ 2>/dev/null
  run_lines "$out"/bench-*.json ;;
c7)  # two H200, ~6.5 min: after the meta alignment and the start-up kernel compiles: TP graphs
    # check, S4 TP 2 with and without the LoRA collectives, then the LoRA kernel bench and S2
    # 0 / 1,000 (GPU 0) beside S2 5 / 2,000 (GPU 1); logs leave $out (8 files come back)
  timeout 150 python3 bench/tp_graph_check.py --tp 2 --out "$out" 2>&1 \
    | grep -e "^ *[0-9]" -e tp= -e Error -e error | tail -8
  TPG_RUNS="2:100 2:100:skip" bash "$0" tpg-runs "$out"
  (export CUDA_VISIBLE_DEVICES=0
   timeout 90 python3 bench/kernels/lora_bench.py --batch 16 64 --ranks 16 64 --out "$out" 2>&1 \
     | grep -v -i warn | tail -9
   for n in 0 1000; do bench 95 --setting S2 --num-adapters $n --num-requests 200 --saturate; done
  ) > /tmp/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   for n in 5 2000; do bench 95 --setting S2 --num-adapters $n --num-requests 200 --saturate; done
  ) > /tmp/gpu1.log 2>&1 &
  wait
  summary
  mkdir -p /tmp/logs && mv "$out"/*.log /tmp/logs/ 2>/dev/null; ls "$out" ;;
c6)  # two H200, ~5.5 min: c3 without the TP check (after the one-row tile path in the LoRA
    # kernels): the #3 targets side by side, tier runs at alpha 1
  (export CUDA_VISIBLE_DEVICES=0
   timeout 90 python3 bench/kernels/lora_bench.py --batch 16 64 --ranks 16 64 --out "$out" 2>&1 \
     | grep -v -i warn | tail -12
   for n in 0 1000 5 2000; do
     bench 95 --setting S2 --num-adapters $n --num-requests 200 --saturate
   done) &
  (export CUDA_VISIBLE_DEVICES=1
   bench 200 --setting S2 --ranks 16 --num-adapters 32 --num-requests 32 --round-robin-adapters \
     --input-range 256 256 --output-range 64 64 --max-num-seqs 32 --saturate --baseline peft
   for pf in "" --no-prefetch; do
     bench 95 --setting S2 --num-adapters 2000 --alpha 1 --adapter-source disk \
       --host-cache-memory 16 --pool-memory 40 --saturate --num-requests 120 $pf
   done
   timeout 150 python3 bench/fused_check.py --out "$out" 2>&1 | grep -v -i warn | tail -12
  ) &
  wait ;;
k1)  # one H200, ~5 min: the LoRA kernels' launch variants at decode batch 64 (one adapter per
    # row, and 5 adapters), then a profiled batch-1 decode without LoRA (where the step goes)
  timeout 330 python3 bench/kernels/lora_variants.py --adapters 0 5 --out "$out" 2>&1 \
    | grep -v -i warn | tail -16
  bench 120 --setting S1 --num-adapters 0 --max-num-seqs 1 --num-requests 2 --saturate \
    --input-range 32 32 --output-range 300 300 --profile-steps 100 100
  head -c 6000 "$out"/profile-*.txt ;;
c5)  # two H200, ~5 min: the policy sweep at overload with the measured-rate abort estimate
    # (GPU 0); tier runs at alpha 0.3 and a second S2 0 / 1,000-adapter pair (GPU 1)
  (export CUDA_VISIBLE_DEVICES=0
   bench 330 --setting S2 --num-adapters 100 --num-requests 240 --rate 30 \
     --scheduling-policy fcfs abort --cv-sweep 1 2 4 8) &
  (export CUDA_VISIBLE_DEVICES=1
   for pf in "" --no-prefetch; do
     bench 95 --setting S2 --num-adapters 2000 --alpha 0.3 --adapter-source disk \
       --host-cache-memory 16 --pool-memory 40 --saturate --num-requests 120 $pf
   done
   for n in 0 1000; do bench 95 --setting S2 --num-adapters $n --num-requests 200 --saturate; done
  ) &
  wait ;;
x2)
  bash "$0" tp "$out"
  (export CUDA_VISIBLE_DEVICES=0; tiers_sat 60 > /tmp/tiers.log 2>&1) &
  (export CUDA_VISIBLE_DEVICES=1
   bench 230 --setting S2 --num-adapters 100 --num-requests 120 --rate 20 \
     --scheduling-policy fcfs abort --cv-sweep 1 2 4 8 > /tmp/policy.log 2>&1) &
  wait
  grep -h -A9 '^system' /tmp/tiers.log /tmp/policy.log ;;
tiers2) tiers_sat 90 ;;
policy2)
  bench 265 --setting S2 --num-adapters 100 --num-requests 240 --rate 30 \
    --scheduling-policy fcfs abort --cv-sweep 1 2 4 8 ;;
*) echo "unknown part $part"; exit 2 ;;
esac
