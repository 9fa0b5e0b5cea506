# Issue 15, thirteenth session: the kernels of served steps against the bench's (same shape:
# 256 sequences, 4 prompts prefilled a step, temperature 1), each GPU kernel timed by ncu.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W/p
sed -n '/^\[provenance\]/q;p' profiles/llm-default.toml | grep -v -E '^(model|devices|dtype|rate_limit|kv_cache_tokens|request_timeout|queue_timeout|max_batch_size) *=' > $W/p/served.toml
printf 'model = "synthetic:qwen2.5-0.5b"\ndevices = ["cuda:0"]\ndtype = "bf16"\nrate_limit = 0.0\nkv_cache_tokens = 262144\nrequest_timeout = "120s"\nqueue_timeout = "120s"\nmax_batch_size = 256\n' >> $W/p/served.toml
NCU="ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --print-units base"
fin() { tar czf $OUT/all.tgz -C $W . ; }
S0=$(date +%s)
el() { echo "[$(( $(date +%s) - S0 )) s] $*"; }
# 1. the bench, 3 timed steps under ncu; then 48 unprofiled for the wall time
timeout 150 taskset -c 0-11 $NCU --log-file $W/ncu-pbench-s3.csv $B/runtime bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 \
  --sizes 256 --steps 3 --context-tokens 110 --prefill-chunks 4 --temperature 1 > $W/bench-ncu.jsonl 2>>$W/log.txt
el "bench ncu rc $?: $(grep -c gpu__time_duration $W/ncu-pbench-s3.csv) kernels"
timeout 60 taskset -c 0-11 $B/runtime bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 \
  --sizes 256 --steps 48 --context-tokens 110 --prefill-chunks 4 --temperature 1 > $W/wall-pbench.jsonl 2>>$W/log.txt
el "bench wall: $(cat $W/wall-pbench.jsonl)"
fin
# 2. served, unprofiled reference (20 s)
taskset -c 0-11 $B/runtime serve --profile $W/p/served.toml --addr 127.0.0.1:9400 > $W/server-ref.log 2>&1 &
srv=$!
if wait_up http://127.0.0.1:9400; then
  timeout 60 taskset -c 12-15 $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
    --concurrency 256 --duration 20s --warmup 5s --timeout 60s --quiet --json $W/served-ref.json > $W/served-ref.txt 2>&1
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics').read().decode())" \
    | grep -E '^batchtune_(engine_steps|step_sequences_(sum|count)|output_tokens|prefill_tokens|step_phase_seconds_(sum|count))' > $W/served-ref-metrics.txt
  el "served ref: $(grep -E 'output tokens' $W/served-ref.txt)"
fi
kill $srv 2>/dev/null; wait $srv 2>/dev/null
fin
# 3. served under ncu: window around engine steps FIRST..FIRST+3
for first in ${FIRSTS:-1500}; do
  taskset -c 0-11 timeout 260 $NCU --log-file $W/ncu-pserved$first-s3.csv $B/runtime serve --profile $W/p/served.toml --addr 127.0.0.1:9400 \
    --cuda-profile-steps $first:3 > $W/server-ncu$first.log 2>&1 &
  if wait_up http://127.0.0.1:9400; then
    el "server under ncu up"
    timeout 230 taskset -c 12-15 $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
      --concurrency 256 --duration 220s --timeout 200s --quiet --json $W/served-ncu$first.json > $W/served-ncu$first.txt 2>&1 &
    lg=$!
    for _ in $(seq 1 220); do grep -q "profiler window closed" $W/server-ncu$first.log && break; sleep 1; done
    el "window: $(grep -c 'profiler window' $W/server-ncu$first.log)"
    python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics').read().decode())" \
      | grep -E '^batchtune_(engine_steps|step_sequences_(sum|count)|output_tokens|prefill_tokens|step_phase_seconds_(sum|count))' > $W/served-ncu$first-metrics.txt
    kill $lg 2>/dev/null; wait $lg 2>/dev/null
  fi
  # The server itself (not ncu, which writes its CSV once the server has exited).
  pkill -TERM -f "^$B/runtime serve" ; wait
  el "ncu served: $(grep -c gpu__time_duration $W/ncu-pserved$first-s3.csv) kernels"
  fin
done
cp scripts/gpu/ncu-steps.py $W/ 2>/dev/null
python3 scripts/gpu/ncu-steps.py $W > $W/steps.md 2>&1; cat $W/steps.md
fin
