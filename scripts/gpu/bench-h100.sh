#!/usr/bin/env bash
# Second GPU call (run on the lent H100 through the device tool, after tune-h100.sh): served
# throughput of batchtune at the tuned profile and of the Python asyncio batcher
# (py_batcher_server.py, seed 004's design) with the same knobs, open-loop rate sweeps under
# p95<50ms and closed-loop saturation with /metrics snapshots. Everything lands in "$OUT/bench.tar.gz" (the device tool
# brings back only a few files) plus a summary printed last.
# Usage (on the device): bash scripts/gpu/bench-h100.sh "$OUT"
set -uo pipefail
OUT="${1:?output folder}"
source scripts/gpu/common.sh
W=/tmp/bench && rm -rf $W && mkdir -p $W
S=$W/summary.txt
PROFILE=${PROFILE:-profiles/h100-minilm.toml}

probe() { # name url rate seconds → prints "achieved p95 errors"
  $B/loadgen --url "$2" --rps "$3" --arrival poisson --duration "$4" --warmup 1s --quiet --timeout 5s \
    --json "$W/$1-$3.json" > /dev/null 2>&1
  python3 -c "import json;r=json.load(open('$W/$1-$3.json'));print(r['achieved_rps'],r['latency']['p95'],r['error_rate'])" 2>/dev/null || echo "0 9 1"
}
sweep() { # name url rates... : stops at the first rate that misses p95<50ms / 1% errors / 95% of offered
  local name=$1 url=$2 best=0; shift 2
  for rate in "$@"; do
    read -r ach p95 err < <(probe "$name" "$url" "$rate" 4s)
    echo "$name rate=$rate achieved=$ach p95=$p95 errors=$err" | tee -a $S
    if python3 -c "import sys; sys.exit(0 if $p95 < 0.05 and $err < 0.01 and $ach > 0.95*$rate else 1)"; then best=$rate; else break; fi
  done
  echo "$name best_rate_p95_under_50ms=$best" | tee -a $S
}
closed() { # name url clients
  $B/loadgen --url "$2" --concurrency "$3" --duration 6s --warmup 2s --quiet --json "$W/closed-$1.json" > /dev/null 2>&1
  python3 -c "import json;r=json.load(open('$W/closed-$1.json'));print('$1 closed c=$3 achieved',r['achieved_rps'],'p50',r['latency']['p50'],'p95',r['latency']['p95'],'errors',r['error_rate'])" | tee -a $S
  curl -s "$2/metrics" > "$W/metrics-$1.txt" 2>/dev/null || python3 -c "import urllib.request,sys;print(urllib.request.urlopen(sys.argv[1]+'/metrics').read().decode())" "$2" > "$W/metrics-$1.txt"
  python3 - "$W/metrics-$1.txt" <<'PY' | tee -a $S
import sys,re
t=open(sys.argv[1]).read()
def v(name):
    return sum(float(m) for m in re.findall(r'^'+name+r'(?:\{[^}]*\})? ([0-9.e+-]+)$', t, re.M))
b=v('batchtune_batch_size_inputs_count'); 
if b: print('  batches',int(b),'mean batch',round(v('batchtune_batch_size_inputs_sum')/b,1),'mean forward ms',round(1000*v('batchtune_inference_time_seconds_sum')/max(1,v('batchtune_inference_time_seconds_count')),2),'mean queue ms',round(1000*v('batchtune_queue_time_seconds_sum')/max(1,v('batchtune_queue_time_seconds_count')),2))
PY
}
serve() { # profile port → pid in $srv
  $B/runtime serve --profile "$1" --addr 127.0.0.1:$2 > /dev/null 2>> $W/log.txt & srv=$!
  wait_up http://127.0.0.1:$2
}
stop() { kill $srv; wait $srv 2>/dev/null; }

# Ceiling of the HTTP + tokenize + batch path alone: the tiny synthetic model on the CPU.
printf 'model = "synthetic:tiny"\nmax_batch_size = 256\nbatch_wait_timeout = "1ms"\nmax_concurrent_batches = 4\nmax_queue_size = 16384\n' > $W/tiny.toml
serve $W/tiny.toml 8100 && closed tiny-cpu http://127.0.0.1:8100 512; stop

# batchtune at the tuned profile (rate limit off so the sweep sees the server, not the limiter).
gpu_profile "$PROFILE" $W/tuned.toml
cp $W/tuned.toml $W/tuned-knobs.toml
grep -v '^#' $W/tuned-knobs.toml | grep -E '^(max_batch_size|batch_wait_timeout|max_concurrent_batches|max_queue_size)' | tee -a $S
serve $W/tuned-knobs.toml 8200
closed batchtune-tuned http://127.0.0.1:8200 512
sweep batchtune http://127.0.0.1:8200 2000 4000 5000 6000 7000 8000 9000 10000 12000 14000 16000 20000 24000 28000 32000
stop
# Large batches, closed loop: how close served gets to raw.
sed -e 's/^max_batch_size = .*/max_batch_size = 256/' -e 's/^max_concurrent_batches = .*/max_concurrent_batches = 2/' -e 's/^max_queue_size = .*/max_queue_size = 16384/' -e 's/^max_batch_tokens = .*/max_batch_tokens = 262144/' $W/tuned-knobs.toml > $W/b256.toml
serve $W/b256.toml 8201 && closed batchtune-b256 http://127.0.0.1:8201 1024; stop

# The Python batcher with the tuned knobs.
eval "$(python3 - $W/tuned-knobs.toml <<'PY'
import sys,tomllib
k=tomllib.load(open(sys.argv[1],'rb'))
w=k['batch_wait_timeout']; ms=float(w[:-2])/1000 if w.endswith('us') else float(w[:-2]) if w.endswith('ms') else float(w[:-1])*1000
print(f"export BATCH_SIZE={k['max_batch_size']} BATCH_WAIT_TIME_MS={max(1,round(ms))} MAX_CONCURRENT_BATCHES={k['max_concurrent_batches']} MAX_QUEUE_SIZE=16384")
PY
)"
(cd scripts/gpu && python3 py_batcher_server.py --model ../../$M --port 8300 --fp16 > /dev/null 2>> $W/log.txt) & py=$!
wait_up http://127.0.0.1:8300 && { closed python-tuned http://127.0.0.1:8300 512; sweep python http://127.0.0.1:8300 500 1000 2000 3000 4000 5000 6000 7000 8000 9000 10000 12000; }
pkill -f py_batcher_server.py; wait $py 2>/dev/null

# The seed profiles are swept by compare-h100.sh.
cp $W/tuned.toml $W/tuned-serve.toml
tar -czf "$OUT/bench.tar.gz" -C /tmp bench
cp $S "$OUT/summary.txt"
