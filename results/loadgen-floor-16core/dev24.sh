# Issue 17: one generator core against a trivial server on 8 cores, loadgen's open loop and oha
# alternated in one call, three rounds: oha's highest rate (closed loop of 256, no rate limit,
# as oha runs by default) and loadgen asked 100k, 120k and 160k.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W
taskset -c 8-15 $B/trivial_server 127.0.0.1:9100 8 > /dev/null & srv=$!
sleep 1
url=http://127.0.0.1:9100/v1/embeddings
echo '{"input":"the model serves requests with dynamic batching"}' > $W/body.json
for r in 1 2 3; do
  taskset -c 0 $B/oha -z 6s -c 256 --no-tui --output-format json -m POST -H 'content-type: application/json' -D $W/body.json $url > $W/oha-$r.json 2>/dev/null
  python3 -c "import json; s=json.load(open('$W/oha-$r.json'))['summary']; print('round $r oha c=256 rps %.0f success %.4f' % (s['requestsPerSec'], s['successRate']))" | tee -a $W/run.log
  for rate in 100000 120000 160000; do
    taskset -c 0 $B/loadgen --url $url --rps $rate --duration 5s --warmup 1s --quiet --json $W/lg-$rate-$r.json > /dev/null 2>&1
    python3 -c "import json; r=json.load(open('$W/lg-$rate-$r.json')); print('round $r loadgen asked $rate achieved %.0f valid %s send-lag p99 %.0f us receive-lag p99 %.0f us p50 %.3f ms' % (r['achieved_rps'], r['valid'], 1e6*r['send_lag']['p99'], 1e6*(r.get('receive_lag') or {}).get('p99', float('nan')), 1e3*r['latency']['p50']))" | tee -a $W/run.log
  done
done
kill $srv
tar czf $OUT/all.tgz -C $W .
