# Issue 17: one pacer core, open loop asked 140k, against a trivial server on 8 cores: HEAD's pacer
# (a task spawned per request, lg_old) against one that polls its requests in flight itself
# (FuturesUnordered, lg_new), alternated three times.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W
taskset -c 8-15 $B/trivial_server 127.0.0.1:9100 8 > /dev/null & srv=$!
sleep 1
url=http://127.0.0.1:9100/v1/embeddings
for r in 1 2 3; do for v in old new; do
  taskset -c 0 $B/lg_$v --url $url --rps 140000 --duration 5s --warmup 1s --quiet --json $W/$v-$r.json > /dev/null 2>&1
  python3 -c "import json; r=json.load(open('$W/$v-$r.json')); print('$v $r achieved %.0f valid %s send-lag p99 %.0f us' % (r['achieved_rps'], r['valid'], 1e6*r['send_lag']['p99']))" | tee -a $W/run.log
done; done
kill $srv
tar czf $OUT/all.tgz -C $W .
