# Issue 15, sixteenth session, call 2: overlapped steps (HEAD+, one binary): `runtime bench --overlap`
# against the synchronous bench, and `serve --step-overlap on` against `off`, alternated; a greedy
# request alone checked equal both ways.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W/p
sed -n '/^\[provenance\]/q;p' profiles/llm-default.toml | grep -v -E '^(model|devices|dtype|rate_limit|kv_cache_tokens|request_timeout|queue_timeout|max_batch_size) *=' > $W/p/served.toml
printf 'model = "synthetic:qwen2.5-0.5b"\ndevices = ["cuda:0"]\ndtype = "bf16"\nrate_limit = 0.0\nkv_cache_tokens = 262144\nrequest_timeout = "120s"\nqueue_timeout = "120s"\nmax_batch_size = 256\n' >> $W/p/served.toml
sed 's/^max_batch_size = 256/max_batch_size = 512/' $W/p/served.toml > $W/p/served512.toml
fin() { tar czf $OUT/all.tgz -C $W . ; }
S0=$(date +%s)
el() { echo "[$(( $(date +%s) - S0 )) s] $*" | tee -a $W/run.log; }
bench() { # tag extra-flags
  timeout 70 taskset -c 0-11 $B/runtime bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 \
    --sizes 256,512 --steps 48 --context-tokens 110 --prefill-chunks 0 --temperature 1 $2 > $W/bench-$1-p0.jsonl 2>$W/bench-$1.txt
  timeout 70 taskset -c 0-11 $B/runtime bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 \
    --sizes 256,512 --steps 48 --context-tokens 110 --prefill-chunks 4 --temperature 1 $2 > $W/bench-$1-p4.jsonl 2>>$W/bench-$1.txt
  el "bench $1: $(grep -h 'self-check' $W/bench-$1.txt | wc -l) self-checks; $(python3 -c "
import json,sys
for f in sys.argv[1:]:
    for l in open(f):
        r=json.loads(l); print('p%d b%d %.1fk step %.2f fwd %.2f sample %.2f |' % (r['prefill_chunks'], r['batch_size'], r['tokens_per_s']/1e3, 1e3*r['median_step_s'], 1e3*r['median_forward_s'], 1e3*r['median_sample_s']), end=' ')
" $W/bench-$1-p0.jsonl $W/bench-$1-p4.jsonl)"
  fin
}
served() { # tag overlap profile clients
  local tag=$1 ov=$2 prof=$3 n=$4
  taskset -c 0-11 $B/runtime serve --profile $W/p/$prof.toml --addr 127.0.0.1:9400 --step-overlap $ov > $W/server-$tag.log 2>&1 &
  local srv=$!
  if wait_up http://127.0.0.1:9400 $srv; then
    python3 -c "
import json,urllib.request
r=urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:9400/v1/completions',data=json.dumps({'prompt':'the quick brown fox','max_tokens':32,'temperature':0}).encode(),headers={'content-type':'application/json'}))
print(json.load(r)['choices'][0]['text'])" > $W/greedy-$tag.txt 2>&1
    timeout 60 taskset -c 12-15 $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
      --concurrency $n --duration 20s --warmup 5s --timeout 60s --quiet --json $W/served-$tag.json > $W/served-$tag.txt 2>&1
    python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics').read().decode())" \
      | grep -E '^batchtune_(engine_steps|step_sequences_(sum|count)|output_tokens|prefill_tokens|step_phase_seconds_(sum|count)|generations_finished)' > $W/served-$tag-metrics.txt
    el "served $tag: $(grep -E 'output tokens|ok |TPOT|TTFT' $W/served-$tag.txt | tr -s ' ' | tr '\n' ';') $(python3 -c "
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
timeout 60 $B/runtime bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 --sizes 8 --steps 4 --context-tokens 16 --prefill-chunks 2 --temperature 1 --overlap > $W/smoke.jsonl 2> $W/smoke.txt
rc=$?; el "smoke rc $rc: $(cat $W/smoke.jsonl) $(grep -i error $W/smoke.txt | head -2)"
[ $rc = 0 ] || { fin; exit 1; }
bench sync ""
bench overlap --overlap
served off512 off served512 512
served on512 on served512 512
served on256 on served 256
served off256 off served 256
served on512b on served512 512
served off512b off served512 512
bench overlap2 --overlap
bench sync2 ""
el "greedy alone, equal across servers: $(md5sum $W/greedy-*.txt | awk '{print $1}' | sort | uniq -c | tr '\n' ' ')"
head -c 300 $W/greedy-on512.txt; echo
grep -iE 'error|panic' $W/server-*.log | head -5
fin
