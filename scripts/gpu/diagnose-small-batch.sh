#!/usr/bin/env bash
# Bisects the small-batch slowdown seen on the H100 after the padding-aware split
# (results/gpu-h100.md): the same seed profile served with the warm-up and the split switched on
# and off through the runtime's diagnostic variables, closed loop, forwards per batch from /metrics.
# Output: "$OUT/diagnose.tar.gz" and a summary printed last.
set -uo pipefail
OUT="${1:?output folder}"
source scripts/gpu/common.sh
W=/tmp/diagnose && rm -rf $W && mkdir -p $W; S=$W/summary.txt
source <(sed -n '/^closed()/,/^stop()/p' scripts/gpu/bench-h100.sh)
metrics_line() { python3 - "$W/metrics-$1.txt" <<'PY' | tee -a $S
import sys,re
t=open(sys.argv[1]).read()
def v(name):
    return sum(float(m) for m in re.findall(r'^'+name+r'(?:\{[^}]*\})? ([0-9.e+-]+)$', t, re.M))
b=v('batchtune_batch_size_inputs_count')
print('  forwards per batch', round(v('batchtune_forwards_total')/max(b,1),2))
PY
}
run() { # name profile clients [env...]
  local name=$1 prof=$2 clients=$3; shift 3
  env "$@" $B/runtime serve --profile "$prof" --addr 127.0.0.1:8500 > /dev/null 2> $W/log-$name.txt & srv=$!
  wait_up http://127.0.0.1:8500 || { echo "$name: server did not start" | tee -a $S; tail -5 $W/log-$name.txt; return; }
  grep -o 'overhead_tokens=[0-9.e+]*' $W/log-$name.txt | sed "s/^/  $name /" | tee -a $S
  closed "$name" http://127.0.0.1:8500 "$clients"; metrics_line "$name"
  stop
}
gpu_profile profiles/conservative.toml $W/cons.toml
gpu_profile profiles/h100-minilm.toml $W/tuned.toml
sed 's/^max_concurrent_batches.*/max_concurrent_batches = 1/' $W/cons.toml > $W/cons-c1.toml
sed 's/^max_concurrent_batches.*/max_concurrent_batches = 1/' $W/tuned.toml > $W/tuned-c1.toml
run cons-default   $W/cons.toml 64
run cons-nosplit   $W/cons.toml 64 BATCHTUNE_SPLIT_OVERHEAD_TOKENS=1e9
run cons-nowarm    $W/cons.toml 64 BATCHTUNE_SKIP_WARMUP=1 BATCHTUNE_SPLIT_OVERHEAD_TOKENS=1e9
run cons-c1        $W/cons-c1.toml 64
run tuned-default  $W/tuned.toml 512
run tuned-c1       $W/tuned-c1.toml 512
run tuned-nowarm   $W/tuned.toml 512 BATCHTUNE_SKIP_WARMUP=1
tar -czf "$OUT/diagnose.tar.gz" -C /tmp diagnose
cat $S
