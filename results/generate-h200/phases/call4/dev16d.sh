# Issue 15, twelfth session, call 4: does the new build (pool kept, one paged group) serve?
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=$OUT; mkdir -p $W/p
sed -n '/^\[provenance\]/q;p' profiles/llm-default.toml | grep -v -E '^(model|devices|dtype|rate_limit|kv_cache_tokens|request_timeout|queue_timeout|max_batch_size) *=' > $W/p/served.toml
printf 'model = "synthetic:qwen2.5-0.5b"\ndevices = ["cuda:0"]\ndtype = "bf16"\nrate_limit = 0.0\nkv_cache_tokens = 262144\nrequest_timeout = "120s"\nqueue_timeout = "120s"\nmax_batch_size = 256\n' >> $W/p/served.toml
taskset -c 0-11 $B/runtime serve --profile $W/p/served.toml --addr 127.0.0.1:9400 > $W/server.log 2>&1 &
srv=$!
for i in $(seq 1 120); do
  kill -0 $srv 2>/dev/null || { echo "server exited"; break; }
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/health', timeout=1)" 2>/dev/null && { echo "up after $i"; break; }
  sleep 0.5
done
tail -5 $W/server.log
timeout 40 taskset -c 12-15 $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
  --concurrency 256 --duration 12s --warmup 4s --timeout 20s --quiet --json $W/served.json > $W/served.txt 2>&1
echo "loadgen rc $?"; cat $W/served.txt
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics', timeout=5).read().decode())" \
  | grep -E '^batchtune_(engine_steps|output_tokens|step_phase_seconds_(sum|count))' > $W/metrics.txt; cat $W/metrics.txt
kill $srv; wait $srv
tail -5 $W/server.log
