# Issue 15, fifteenth session, call 1: the output stage off the engine thread (`new`) against
# the build before it (`old`), served at 512 and 256 clients, alternated; then one bench and one
# ncu window over served steps at 512 clients (GPU busy per served step).
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W/p
sed -n '/^\[provenance\]/q;p' profiles/llm-default.toml | grep -v -E '^(model|devices|dtype|rate_limit|kv_cache_tokens|request_timeout|queue_timeout|max_batch_size) *=' > $W/p/served.toml
printf 'model = "synthetic:qwen2.5-0.5b"\ndevices = ["cuda:0"]\ndtype = "bf16"\nrate_limit = 0.0\nkv_cache_tokens = 262144\nrequest_timeout = "120s"\nqueue_timeout = "120s"\nmax_batch_size = 256\n' >> $W/p/served.toml
sed 's/^max_batch_size = 256/max_batch_size = 512/' $W/p/served.toml > $W/p/served512.toml
NCU="ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --print-units base"
fin() { tar czf $OUT/all.tgz -C $W . ; }
S0=$(date +%s)
el() { echo "[$(( $(date +%s) - S0 )) s] $*" | tee -a $W/run.log; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $W/gpu.txt 2>&1
served() { # tag bin profile clients [wrapper...]
  local tag=$1 bin=$2 prof=$3 n=$4; shift 4
  taskset -c 0-11 "$@" $bin serve --profile $W/p/$prof.toml --addr 127.0.0.1:9400 > $W/server-$tag.log 2>&1 &
  local srv=$!
  if wait_up http://127.0.0.1:9400 $srv; then
    timeout 90 taskset -c 12-15 $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
      --concurrency $n --duration 20s --warmup 5s --timeout 60s --quiet --json $W/served-$tag.json > $W/served-$tag.txt 2>&1
    python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics').read().decode())" \
      | grep -E '^batchtune_(engine_steps|step_sequences_(sum|count)|output_tokens|prefill_tokens|step_phase_seconds_(sum|count))' > $W/served-$tag-metrics.txt
    el "served $tag: $(grep -E 'output tokens|ok ' $W/served-$tag.txt | tr -s ' ' | tr '\n' ';') $(python3 -c "
import sys
m={}
for l in open(sys.argv[1]):
    k,v=l.rsplit(' ',1); m[k]=float(v)
n=m.get('batchtune_engine_steps_total{device=\"cuda:0\"}',1)
print('steps',int(n),' '.join('%s %.2fms'%(p,1e3*m.get('batchtune_step_phase_seconds_sum{device=\"cuda:0\",phase=\"%s\"}'%p,0)/n) for p in ['schedule','forward','sample','engine']))
" $W/served-$tag-metrics.txt)"
  else el "served $tag did not start: $(tail -2 $W/server-$tag.log)"; fi
  kill $srv 2>/dev/null; wait $srv 2>/dev/null
  fin
}
served new512 $B/runtime served512 512
served old512 $B/runtimeold served512 512
served new256 $B/runtime served 256
served old256 $B/runtimeold served 256
served new512b $B/runtime served512 512
served old512b $B/runtimeold served512 512
timeout 90 taskset -c 0-11 $B/runtime bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 \
  --sizes 256,512 --steps 32 --context-tokens 110 --prefill-chunks 0 --temperature 1 > $W/bench-new-p0.jsonl 2>>$W/log-bench.txt
el "bench p0 rc $?"; cat $W/bench-new-p0.jsonl | tee -a $W/run.log; fin
# ncu over 2 served steps at 512 clients, once the load has settled (step 600).
taskset -c 0-11 $NCU --log-file $W/ncu-served512.csv $B/runtime serve --profile $W/p/served512.toml --addr 127.0.0.1:9400 \
  --cuda-profile-steps 600:2 > $W/server-ncu.log 2>&1 &
srv=$!
if wait_up http://127.0.0.1:9400 $srv; then
  timeout 100 taskset -c 12-15 $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
    --concurrency 512 --duration 30s --warmup 5s --timeout 80s --quiet > $W/served-ncu.txt 2>&1
  el "ncu served: $(grep -c gpu__time_duration $W/ncu-served512.csv) kernels"
else el "ncu server did not start: $(tail -2 $W/server-ncu.log)"; fi
kill $srv 2>/dev/null; wait $srv 2>/dev/null
fin
python3 - $W/ncu-served512.csv <<'PY' | tee -a $W/run.log
import csv, sys, collections
lines = open(sys.argv[1], errors="replace").readlines()
start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
if start is None: print("no kernels"); sys.exit()
t = collections.defaultdict(float); c = collections.Counter()
for r in csv.DictReader(lines[start:]):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        n = r["Kernel Name"].split("(")[0][:60]; t[n] += float(r["Metric Value"].replace(",", "")); c[n] += 1
tot = sum(t.values())
print("served step (2 steps): kernels %d, GPU busy %.2f ms a step" % (sum(c.values()) / 2, tot / 2e6))
for n, v in sorted(t.items(), key=lambda x: -x[1])[:14]: print("%-60s %5.1f %7.3f ms" % (n, c[n] / 2, v / 2e6))
PY
fin
