# Issue 15, twelfth session, call 1: where the served step's extra time goes.
# forward/sample split in bench and served; tokio workers and engine pinning A/B; host topology.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W/p
{ nproc; lscpu; nvidia-smi topo -m; which nsys perf ncu; cat /proc/cmdline; } > $W/host.txt 2>&1
sed -n '/^\[provenance\]/q;p' profiles/llm-default.toml | grep -v -E '^(model|devices|dtype|rate_limit|kv_cache_tokens|request_timeout|queue_timeout|max_batch_size) *=' > $W/p/served.toml
printf 'model = "synthetic:qwen2.5-0.5b"\ndevices = ["cuda:0"]\ndtype = "bf16"\nrate_limit = 0.0\nkv_cache_tokens = 262144\nrequest_timeout = "120s"\nqueue_timeout = "120s"\nmax_batch_size = 256\n' >> $W/p/served.toml
bench() { # tag cpus args...
  local tag=$1 cpus=$2; shift 2
  timeout 100 taskset -c $cpus $B/runtime bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 --sizes 256 \
    --steps 48 --context-tokens 110 --temperature 1 "$@" > $W/bench-$tag.jsonl 2>>$W/bench-log.txt
  echo "bench $tag: $(cat $W/bench-$tag.jsonl)"
}
snap() { for t in /proc/$1/task/*; do echo "${t##*/} $(cat $t/comm | tr ' ' _) $(cut -d' ' -f14,15,39 $t/stat 2>/dev/null)"; done; }
served() { # tag pin env...
  local tag=$1 pin=$2; shift 2
  env "$@" taskset -c 0-11 $B/runtime serve --profile $W/p/served.toml --addr 127.0.0.1:9400 > $W/server-$tag.log 2>&1 &
  local srv=$!
  wait_up http://127.0.0.1:9400 || { echo "server $tag did not start"; kill $srv; return; }
  if [ "$pin" = yes ]; then
    for t in /proc/$srv/task/*; do
      if [[ $(cat $t/comm) == engine-* ]]; then taskset -pc 0 ${t##*/} >/dev/null; else taskset -pc 1-11 ${t##*/} >/dev/null; fi
    done
  fi
  timeout 60 taskset -c 12-15 $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
    --concurrency 256 --duration 20s --warmup 5s --timeout 60s --quiet --json $W/served-$tag.json > $W/served-$tag.txt 2>&1 &
  local lg=$!
  sleep 9; snap $srv > $W/threads-$tag-a.txt; sleep 10; snap $srv > $W/threads-$tag-b.txt
  wait $lg
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics').read().decode())" \
    | grep -E '^batchtune_(engine_steps|step_sequences_(sum|count)|output_tokens|prefill_tokens|step_phase_seconds_(sum|count))' > $W/served-$tag-metrics.txt
  echo "== served $tag: $(grep -E 'output tokens' $W/served-$tag.txt)"
  grep -E "phase_seconds_sum|steps_total" $W/served-$tag-metrics.txt
  kill $srv 2>/dev/null; wait $srv 2>/dev/null
}
bench p0 0-11
bench p4 0-11 --prefill-chunks 4
bench p4-core0 0 --prefill-chunks 4
served base no
served tokio4 no TOKIO_WORKER_THREADS=4
served pin yes
served pin-tokio4 yes TOKIO_WORKER_THREADS=4
served base2 no
bench p4-b 0-11 --prefill-chunks 4
bench p4-core14 14 --prefill-chunks 4
tar czf $OUT/all.tgz -C $W .
