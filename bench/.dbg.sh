export PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0 TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
(sleep 110; pkill -ABRT -f tp_graph_check; pkill -ABRT -f distributed.worker) &
timeout 130 python3 bench/tp_graph_check.py --tp 2 --out $OUT > $OUT/check.log 2>&1; echo rc=$?
grep -v -i -e warn -e "^ *warnings.warn" $OUT/check.log | grep -v "captured a decode" | tail -60
grep -c "captured a decode" $OUT/check.log
