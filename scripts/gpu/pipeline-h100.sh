#!/usr/bin/env bash
# Checks the one-thread pipelined GPU worker (runtime/src/workers.rs): raw pipelined forwards
# (`runtime bench --texts loadgen`) against served closed-loop throughput at the tuned knobs, and
# the seed profiles that were hurt by several threads sharing one CUDA stream.
# Output: "$OUT/pipeline.tar.gz" and a summary printed last.
set -uo pipefail
OUT="${1:?output folder}"
source scripts/gpu/common.sh
W=/tmp/pipeline && rm -rf $W && mkdir -p $W; S=$W/summary.txt
source <(sed -n '/^probe()/,/^stop()/p' scripts/gpu/bench-h100.sh)
source <(sed -n '/^metrics_line()/,/^}$/p' scripts/gpu/diagnose-small-batch.sh)
$B/loadgen --dump-texts $W/texts.txt 2>> $W/log.txt
$B/runtime bench --model $M --device cuda:0 --dtype f16 --texts $W/texts.txt --sizes 32,64,96,128,192,256 --seconds 3 \
  > $W/raw-f16.jsonl 2>> $W/log.txt
python3 -c "
import json
for l in open('$W/raw-f16.jsonl'):
    r=json.loads(l); print('raw f16 b=%d %.0f inputs/s median %.2f ms' % (r['batch_size'], r['inputs_per_s'], 1000*r['median_forward_s']))" | tee -a $S
gpu_profile profiles/h100-minilm.toml $W/tuned.toml
for c in 2 3; do
  sed "s/^max_concurrent_batches.*/max_concurrent_batches = $c/" $W/tuned.toml > $W/tuned-c$c.toml
  serve $W/tuned-c$c.toml 8600 && { closed tuned-c$c http://127.0.0.1:8600 512; metrics_line tuned-c$c; }; stop
done
for p in conservative high-throughput; do
  gpu_profile profiles/$p.toml $W/$p.toml
  serve $W/$p.toml 8600 && { closed $p http://127.0.0.1:8600 64; metrics_line $p; }; stop
done
serve $W/tuned-c2.toml 8600 && for rate in 6000 8000 10000 11000; do
  read -r ach p95 err < <(probe open-tuned http://127.0.0.1:8600 $rate 4s)
  echo "open tuned-c2 rate=$rate achieved=$ach p95=$p95 errors=$err" | tee -a $S
done; stop
grep -h overhead_tokens $W/log.txt | grep -o 'overhead_tokens=[0-9.e+]*' | tee -a $S
tar -czf "$OUT/pipeline.tar.gz" -C /tmp pipeline
cat $S
