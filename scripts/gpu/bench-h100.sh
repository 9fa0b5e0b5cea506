#!/usr/bin/env bash
# GPU benchmark, run on the lent H100 through the device tool (no Rust there: binaries are built
# here and carried in .gpu/bin; the model, converted to f16 safetensors, in .gpu/minilm).
#   raw forward (batchtune, real + synthetic MiniLM, f32/f16) → raw-*.jsonl
#   sentence-transformers encode (fp32/fp16)                  → st-*.jsonl
#   served throughput, batchtune vs the Python asyncio batcher, open-loop rate sweep → sweep-*.json
# Usage (on the device): bash scripts/gpu/bench-h100.sh "$OUT"
set -uo pipefail
OUT="${1:?output folder}"
B=/tmp/bt-bin
# Binaries travel gzip-compressed to fit the 64 MiB transfer limit.
mkdir -p $B && for f in .gpu/bin/*.gz; do gunzip -c "$f" > $B/$(basename "$f" .gz); chmod +x $B/$(basename "$f" .gz); done
M=.gpu/minilm
SIZES=1,8,32,64,128,256,512
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
nproc >> "$OUT/gpu.txt"
for dt in f32 f16; do
  $B/runtime bench --model $M --device cuda:0 --dtype $dt --sizes $SIZES --seconds 1.5 > "$OUT/raw-real-$dt.jsonl" 2>> "$OUT/log.txt"
done
$B/runtime bench --model synthetic:minilm --device cuda:0 --dtype f16 --sizes $SIZES --seconds 1.5 > "$OUT/raw-synth-f16.jsonl" 2>> "$OUT/log.txt"
for dt in fp32 fp16; do
  (cd scripts/gpu && python3 st_bench.py --model ../../$M --dtype $dt --sizes $SIZES --seconds 1.5) > "$OUT/st-$dt.jsonl" 2>> "$OUT/log.txt"
done
tail -n 3 "$OUT"/raw-real-f16.jsonl "$OUT"/st-fp16.jsonl

wait_up() { for _ in $(seq 1 600); do python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=1)" "$1" 2>/dev/null && return 0; sleep 0.2; done; return 1; }
sweep() { # name url
  local name=$1 url=$2 best=0
  for rate in 500 1000 2000 4000 6000 8000 12000 16000 24000; do
    $B/loadgen --url "$url" --rps $rate --arrival poisson --duration 5s --warmup 2s --quiet --timeout 5s \
      --json "$OUT/sweep-$name-$rate.json" > /dev/null 2>&1
    read -r ach p95 err < <(python3 -c "import json;r=json.load(open('$OUT/sweep-$name-$rate.json'));print(r['achieved_rps'],r['latency']['p95'],r['error_rate'])")
    echo "$name rate=$rate achieved=$ach p95=$p95 errors=$err"
    if python3 -c "import sys; sys.exit(0 if $p95 < 0.05 and $err < 0.01 and $ach > 0.95*$rate else 1)"; then best=$rate; else break; fi
  done
  echo "$name best_rate_p95_under_50ms=$best" | tee -a "$OUT/sweep-summary.txt"
}

# batchtune served (f16; knobs from the tuned GPU profile when present, else a reasonable start)
PROFILE=${PROFILE:-profiles/h100-minilm.toml}
[ -f "$PROFILE" ] || { printf 'model = "%s"\ndevices = ["cuda:0"]\ndtype = "f16"\nmax_batch_size = 128\nbatch_wait_timeout = "2ms"\nmax_concurrent_batches = 2\nmax_queue_size = 8192\n' "$M" > /tmp/bt.toml; PROFILE=/tmp/bt.toml; }
sed -e 's/^rate_limit = .*/rate_limit = 0.0/' -e "s|^model = .*|model = \"$M\"|" "$PROFILE" > /tmp/bt-serve.toml
$B/runtime serve --profile /tmp/bt-serve.toml --addr 127.0.0.1:8200 > /dev/null 2>> "$OUT/log.txt" &
bt=$!
wait_up http://127.0.0.1:8200 && sweep batchtune http://127.0.0.1:8200
# served at a full batch: closed loop, 512 clients
$B/loadgen --url http://127.0.0.1:8200 --concurrency 512 --duration 8s --warmup 2s --quiet --json "$OUT/closed-batchtune.json" | head -3
kill $bt; wait $bt 2>/dev/null

(cd scripts/gpu && BATCH_SIZE=128 BATCH_WAIT_TIME_MS=2 MAX_CONCURRENT_BATCHES=2 MAX_QUEUE_SIZE=8192 python3 py_batcher_server.py --model ../../$M --port 8300 --fp16 > /dev/null 2>> "$OUT/log.txt") &
py=$!
wait_up http://127.0.0.1:8300 && sweep python http://127.0.0.1:8300
$B/loadgen --url http://127.0.0.1:8300 --concurrency 512 --duration 8s --warmup 2s --quiet --json "$OUT/closed-python.json" | head -3
kill $py; wait $py 2>/dev/null
cat "$OUT/sweep-summary.txt"
