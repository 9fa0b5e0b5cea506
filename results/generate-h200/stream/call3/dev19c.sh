# Issue 15, fifteenth session, call 3: qkv-rope fused and one KV write a layer (`qkv`) against HEAD
# (`base`, b74fae4: vector paged attention): self-checks in f16/f32, bench and served A/B
# alternated, then ncu over two served steps at 512 clients and over a bench step.
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
for dt in f16 f32; do
  timeout 60 $B/runtime-qkv bench --model synthetic:smollm2-135m --device cuda:0 --dtype $dt --sizes 8 --steps 2 \
    --context-tokens 40 --prefill-chunks 1 > $W/check-$dt.jsonl 2> $W/check-$dt.txt
  el "attn $dt check rc $?: $(grep -h self-check $W/check-$dt.txt | tr '\n' ';')"
done
bench() { # tag bin
  timeout 70 taskset -c 0-11 $2 bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 \
    --sizes 256,512 --steps 32 --context-tokens 110 --prefill-chunks 0 --temperature 1 > $W/bench-$1-p0.jsonl 2>$W/bench-$1.txt
  timeout 70 taskset -c 0-11 $2 bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 \
    --sizes 256,512 --steps 32 --context-tokens 110 --prefill-chunks 4 --temperature 1 > $W/bench-$1-p4.jsonl 2>>$W/bench-$1.txt
  el "bench $1: $(grep -h self-check $W/bench-$1.txt | head -2 | tr '\n' ';') $(python3 -c "
import json,sys
for f in sys.argv[1:]:
    for l in open(f):
        r=json.loads(l); print('p%d b%d %.1fk fwd %.2f sample %.2f |' % (r['prefill_chunks'], r['batch_size'], r['tokens_per_s']/1e3, 1e3*r['median_forward_s'], 1e3*r['median_sample_s']), end=' ')
" $W/bench-$1-p0.jsonl $W/bench-$1-p4.jsonl)"
  fin
}
served() { # tag bin profile clients
  local tag=$1 bin=$2 prof=$3 n=$4
  taskset -c 0-11 $bin serve --profile $W/p/$prof.toml --addr 127.0.0.1:9400 > $W/server-$tag.log 2>&1 &
  local srv=$!
  if wait_up http://127.0.0.1:9400 $srv; then
    timeout 60 taskset -c 12-15 $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
      --concurrency $n --duration 20s --warmup 5s --timeout 60s --quiet --json $W/served-$tag.json > $W/served-$tag.txt 2>&1
    python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics').read().decode())" \
      | grep -E '^batchtune_(engine_steps|step_sequences_(sum|count)|output_tokens|prefill_tokens|step_phase_seconds_(sum|count))' > $W/served-$tag-metrics.txt
    el "served $tag: $(grep -E 'output tokens|ok ' $W/served-$tag.txt | tr -s ' ' | tr '\n' ';') $(python3 -c "
import sys
m={}
for l in open(sys.argv[1]):
    k,v=l.rsplit(' ',1); m[k]=float(v)
n=m.get('batchtune_engine_steps_total{device=\"cuda:0\"}',1)
print('steps',int(n),'seqs %.0f prompt %.0f'%(m.get('batchtune_step_sequences_sum{device=\"cuda:0\"}',0)/n, m.get('batchtune_prefill_tokens_total',0)/n),' '.join('%s %.2fms'%(p,1e3*m.get('batchtune_step_phase_seconds_sum{device=\"cuda:0\",phase=\"%s\"}'%p,0)/n) for p in ['schedule','forward','sample','engine']))
" $W/served-$tag-metrics.txt)"
  else el "served $tag did not start: $(tail -2 $W/server-$tag.log)"; fi
  kill $srv 2>/dev/null; wait $srv 2>/dev/null
  fin
}
bench qkv $B/runtime-qkv
bench base $B/runtime
bench qkv2 $B/runtime-qkv
bench base2 $B/runtime
served qkv512 $B/runtime-qkv served512 512
served base512 $B/runtime served512 512
served qkv512b $B/runtime-qkv served512 512
served base512b $B/runtime served512 512
served qkv256 $B/runtime-qkv served 256
served base256 $B/runtime served 256
# ncu over 2 served steps at 512 clients once the load has settled (step 600). SIGTERM goes to the
# server, not to ncu, so that ncu writes its report when the server exits.
taskset -c 0-11 $NCU --log-file $W/ncu-served512.csv $B/runtime-qkv serve --profile $W/p/served512.toml --addr 127.0.0.1:9400 \
  --cuda-profile-steps 150:2 > $W/server-ncu.log 2>&1 &
srv=$!
if wait_up http://127.0.0.1:9400 $srv; then
  timeout 60 taskset -c 12-15 $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
    --concurrency 512 --duration 25s --warmup 3s --timeout 50s --quiet > $W/served-ncu.txt 2>&1
fi
pkill -TERM -x runtime-qkv; wait $srv 2>/dev/null
el "ncu served: $(grep -c gpu__time_duration $W/ncu-served512.csv) kernels"
timeout 100 taskset -c 0-11 $NCU --log-file $W/ncu-bench-qkv.csv $B/runtime-qkv bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 \
  --sizes 256 --steps 3 --context-tokens 110 --prefill-chunks 4 --temperature 1 > /dev/null 2>>$W/log-ncu.txt
el "ncu bench rc $?"
fin
for f in $W/ncu-served512.csv $W/ncu-bench-qkv.csv; do
python3 - $f <<'PY' | tee -a $W/run.log
import csv, sys, collections
lines = open(sys.argv[1], errors="replace").readlines()
start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
if start is None: print(sys.argv[1], "no kernels"); sys.exit()
t = collections.defaultdict(float); c = collections.Counter()
for r in csv.DictReader(lines[start:]):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        n = r["Kernel Name"].split("(")[0][:60]; t[n] += float(r["Metric Value"].replace(",", "")); c[n] += 1
steps = 2 if "served" in sys.argv[1] else 3
print("%s: kernels %d a step, GPU busy %.2f ms a step" % (sys.argv[1], sum(c.values()) / steps, sum(t.values()) / steps / 1e6))
for n, v in sorted(t.items(), key=lambda x: -x[1])[:12]: print("%-60s %5.1f %7.3f ms" % (n, c[n] / steps, v / steps / 1e6))
PY
done
fin
