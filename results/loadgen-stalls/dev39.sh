# Issue 17: which part of dev38's change cost send lag at 130k? The build before it (loadgen,
# the send path of f20d72d), spares and the pending cap without the connect wait
# (loadgen_spares), the connect wait and the pending cap without spares (loadgen_wait),
# alternated on core 4 at 120k and 130k constant, three sweeps, each beside oha. Trivial server
# on cores 8-15 with 8 threads.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W
L=$OUT/run.log
{ nproc | sed 's/^/cores /'; grep -m1 'model name' /proc/cpuinfo; } >> $L
taskset -c 8-15 $B/trivial_server 127.0.0.1:9100 8 > /dev/null & srv=$!
sleep 1
url=http://127.0.0.1:9100/v1/embeddings
echo '{"input":"the model serves requests with dynamic batching"}' > $W/body.json
core=4
lg() { # tag binary rate
  local f=$W/lg.json; rm -f $f
  taskset -c $core $B/$2 --url $url --rps $3 --threads 1 --duration 5s --warmup 1s --quiet --send-loop epoll --json $f > /dev/null 2>&1
  python3 -c "import json; r=json.load(open('$f')); sl=r['send_lag']; print('$1 %-11s asked %6d achieved %7.0f valid %-5s send-lag p99 %6.0f p999 %6.0f max %6.0f us latency p50 %.0f us max %.0f us' % ('$2', $3, r['achieved_rps'], r['valid'], 1e6*sl['p99'], 1e6*sl['p999'], 1e6*sl['max'], 1e6*r['latency']['p50'], 1e6*r['latency']['max']))" >> $L
}
for rep in 1 2 3; do
  taskset -c $core $B/oha -z 6s -c 256 --no-tui --output-format json -m POST -H 'content-type: application/json' -D $W/body.json $url > $W/oha.json 2>/dev/null
  python3 -c "import json; s=json.load(open('$W/oha.json'))['summary']; print('sweep $rep oha c=256 rps %.0f success %.4f' % (s['requestsPerSec'], s['successRate']))" >> $L
  for rate in 120000 130000; do
    for b in loadgen loadgen_spares loadgen_wait; do lg "sweep $rep" $b $rate; done
  done
done
kill $srv
