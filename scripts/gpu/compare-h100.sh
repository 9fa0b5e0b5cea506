#!/usr/bin/env bash
# Third GPU call: the Python asyncio batcher (seed 004's design) at two knob sets, closed loop and
# an open-loop sweep under p95<50ms; then the seed profiles and the tuned one over one rate grid
# (comparison plot). Output: "$OUT/compare.tar.gz" and a summary printed last.
set -uo pipefail
OUT="${1:?output folder}"
source scripts/gpu/common.sh
source <(sed -n '/^probe()/,/^stop()/p' scripts/gpu/bench-h100.sh)
W=/tmp/compare && rm -rf $W && mkdir -p $W; S=$W/summary.txt
for knobs in "111 5 2" "64 2 4"; do
  read -r bs wt cb <<< "$knobs"; n=python-b$bs-w$wt-c$cb
  (cd scripts/gpu && BATCH_SIZE=$bs BATCH_WAIT_TIME_MS=$wt MAX_CONCURRENT_BATCHES=$cb MAX_QUEUE_SIZE=16384 \
    python3 py_batcher_server.py --model ../../$M --port 8300 --fp16 > /dev/null 2>> $W/log.txt) & py=$!
  wait_up http://127.0.0.1:8300 && { closed $n http://127.0.0.1:8300 512; sweep $n http://127.0.0.1:8300 250 500 1000 1500 2000 3000 4000; }
  # Kill python itself: killing the subshell would leave it holding the port.
  pkill -f py_batcher_server.py; wait $py 2>/dev/null
done
for p in conservative medium aggressive high-throughput default h100-minilm; do
  gpu_profile profiles/$p.toml $W/p-$p.toml
  serve $W/p-$p.toml 8400 || continue
  for rate in 1000 2000 4000 6000 8000 10000 12000; do
    read -r ach p95 err < <(probe "cmp-$p" http://127.0.0.1:8400 $rate 3s)
    echo "cmp $p rate=$rate achieved=$ach p95=$p95 errors=$err" | tee -a $S
    python3 -c "import sys; sys.exit(0 if $p95 < 2 else 1)" || break
  done
  stop
done
tar -czf "$OUT/compare.tar.gz" -C /tmp compare
cat $S
