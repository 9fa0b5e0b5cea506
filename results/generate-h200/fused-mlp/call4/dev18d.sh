# Issue 15, fourteenth session, call 4: the add-norm build (`an`) served at 512 clients, cap 512,
# between two benches.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W/p
sed -n '/^\[provenance\]/q;p' profiles/llm-default.toml | grep -v -E '^(model|devices|dtype|rate_limit|kv_cache_tokens|request_timeout|queue_timeout|max_batch_size) *=' > $W/p/served.toml
printf 'model = "synthetic:qwen2.5-0.5b"\ndevices = ["cuda:0"]\ndtype = "bf16"\nrate_limit = 0.0\nkv_cache_tokens = 262144\nrequest_timeout = "120s"\nqueue_timeout = "120s"\nmax_batch_size = 256\n' >> $W/p/served.toml
NCU="ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --print-units base"
fin() { tar czf $OUT/all.tgz -C $W . ; }
S0=$(date +%s)
el() { echo "[$(( $(date +%s) - S0 )) s] $*" | tee -a $W/run.log; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $W/gpu.txt 2>&1
bench() { # tag bin
  for p in 0 4; do
    timeout 90 taskset -c 0-11 $2 bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 \
      --sizes 256,512 --steps 32 --context-tokens 110 --prefill-chunks $p --temperature 1 > $W/bench-$1-p$p.jsonl 2>>$W/log-$1.txt
    el "bench $1 p$p rc $?"; cat $W/bench-$1-p$p.jsonl | tee -a $W/run.log
  done
  fin
}
served() { # tag bin
  taskset -c 0-11 $2 serve --profile $W/p/served.toml --addr 127.0.0.1:9400 > $W/server-$1.log 2>&1 &
  local srv=$!
  if wait_up http://127.0.0.1:9400 $srv; then
    timeout 60 taskset -c 12-15 $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
      --concurrency 256 --duration 20s --warmup 5s --timeout 60s --quiet --json $W/served-$1.json > $W/served-$1.txt 2>&1
    python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics').read().decode())" \
      | grep -E '^batchtune_(engine_steps|step_sequences_(sum|count)|output_tokens|prefill_tokens|step_phase_seconds_(sum|count))' > $W/served-$1-metrics.txt
    el "served $1: $(grep -E 'output tokens|ok ' $W/served-$1.txt | tr -s ' ' | tr '\n' ';')"
  else el "served $1 did not start: $(tail -2 $W/server-$1.log)"; fi
  kill $srv 2>/dev/null; wait $srv 2>/dev/null
  fin
}
served512() { # tag
  taskset -c 0-11 $B/runtime serve --profile $W/p/served512.toml --addr 127.0.0.1:9400 > $W/server-$1.log 2>&1 &
  local srv=$!
  if wait_up http://127.0.0.1:9400 $srv; then
    timeout 60 taskset -c 12-15 $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
      --concurrency 512 --duration 20s --warmup 5s --timeout 60s --quiet --json $W/served-$1.json > $W/served-$1.txt 2>&1
    python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics').read().decode())" \
      | grep -E '^batchtune_(engine_steps|step_sequences_(sum|count)|output_tokens|prefill_tokens|step_phase_seconds_(sum|count))' > $W/served-$1-metrics.txt
    el "served $1: $(grep -E 'output tokens|ok ' $W/served-$1.txt | tr -s ' ' | tr '\n' ';')"
  else el "served $1 did not start: $(tail -2 $W/server-$1.log)"; fi
  kill $srv 2>/dev/null; wait $srv 2>/dev/null
  fin
}
sed 's/^max_batch_size = 256/max_batch_size = 512/' $W/p/served.toml > $W/p/served512.toml
bench an $B/runtime
served512 an512
bench an2 $B/runtime
served512 an512b
