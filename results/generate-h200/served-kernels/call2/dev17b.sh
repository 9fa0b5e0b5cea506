# Issue 15, thirteenth session, call 2: served steps are bursty (a closed loop of fixed-length
# outputs arrives in waves; ncu saw steps of 256, 1159 and 2157 rows where the bench has 440).
# Does a smaller prefill budget per step, or open-loop arrivals, close the gap to the bench?
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W/p
base() {
sed -n '/^\[provenance\]/q;p' profiles/llm-default.toml | grep -v -E '^(model|devices|dtype|rate_limit|kv_cache_tokens|request_timeout|queue_timeout|max_batch_size|max_batch_tokens) *='
printf 'model = "synthetic:qwen2.5-0.5b"\ndevices = ["cuda:0"]\ndtype = "bf16"\nrate_limit = 0.0\nkv_cache_tokens = 262144\nrequest_timeout = "120s"\nqueue_timeout = "120s"\nmax_batch_size = 256\n'
}
fin() { tar czf $OUT/all.tgz -C $W . ; }
S0=$(date +%s)
el() { echo "[$(( $(date +%s) - S0 )) s] $*"; }
timeout 60 taskset -c 0-11 $B/runtime bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 \
  --sizes 256 --steps 48 --context-tokens 110 --temperature 1 > $W/bench-p0.jsonl 2>>$W/log.txt
el "bench p0: $(cat $W/bench-p0.jsonl)"
served() { # tag budget loadgen-args...
  local tag=$1 budget=$2; shift 2
  { base | grep -v '^max_input_tokens'; echo "max_batch_tokens = $budget"; echo "max_input_tokens = $budget"; } > $W/p/$tag.toml
  taskset -c 0-11 $B/runtime serve --profile $W/p/$tag.toml --addr 127.0.0.1:9400 > $W/server-$tag.log 2>&1 &
  local srv=$!
  local up=no
  for _ in $(seq 1 300); do kill -0 $srv 2>/dev/null || break; python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/health', timeout=1)" 2>/dev/null && { up=yes; break; }; sleep 0.2; done
  if [ $up = yes ]; then
    timeout 60 taskset -c 12-15 $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
      "$@" --duration 20s --warmup 5s --timeout 60s --quiet --json $W/served-$tag.json > $W/served-$tag.txt 2>&1
    python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics').read().decode())" \
      | grep -E '^batchtune_(engine_steps|step_sequences_(sum|count)|output_tokens|prefill_tokens|step_phase_seconds_(sum|count))' > $W/served-$tag-metrics.txt
    el "served $tag: $(grep -E 'output tokens' $W/served-$tag.txt) | $(grep -E 'achieved|latency .intended|time to first|inter-token' $W/served-$tag.txt | tr -s ' ' | tr '\n' ';')"
  fi
  kill $srv 2>/dev/null; wait $srv 2>/dev/null
  fin
}
served c2048 2048 --concurrency 256
served c256 256 --concurrency 256
served o2048-480 2048 --rps 480
served o256-480 256 --rps 480
served c2048b 2048 --concurrency 256
served c256b 256 --concurrency 256
fin
