# Issue 17: the highest valid one-core rate of loadgen with the connect policy (Run::place), in
# 10k steps, three sweeps, each beside oha (closed loop of 256) on the same core; HEAD
# (loadgen_head, 7fbd3ab) at 130k and 140k in each sweep for comparison. Trivial server on
# cores 8-15, generators on core 0, constant arrivals. Lines go to $OUT/run.log as measured.
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
lg() { # tag binary rate
  local f=$W/lg.json; rm -f $f
  /usr/bin/time -f "%U %S" -o $W/t taskset -c 0 $B/$2 --url $url --rps $3 --threads 1 --duration 5s --warmup 1s --quiet --send-loop epoll --json $f > /dev/null 2>&1
  python3 -c "import json; r=json.load(open('$f')); u,s=open('$W/t').read().split()[-2:]; sl=r['send_lag']; print('$1 %-12s asked %6d achieved %7.0f valid %-5s send-lag p99 %6.0f p999 %6.0f max %6.0f us receive-lag p99 %4.0f us p50 %.3f ms cpu %.2f s %s' % ('$2', $3, r['achieved_rps'], r['valid'], 1e6*sl['p99'], 1e6*sl['p999'], 1e6*sl['max'], 1e6*(r.get('receive_lag') or {}).get('p99', float('nan')), 1e3*r['latency']['p50'], float(u)+float(s), r['errors']))" >> $L
}
for rep in 1 2 3; do
  taskset -c 0 $B/oha -z 6s -c 256 --no-tui --output-format json -m POST -H 'content-type: application/json' -D $W/body.json $url > $W/oha.json 2>/dev/null
  python3 -c "import json; s=json.load(open('$W/oha.json'))['summary']; print('sweep $rep oha c=256 rps %.0f success %.4f' % (s['requestsPerSec'], s['successRate']))" >> $L
  for rate in 110000 120000 130000 140000 150000; do lg "sweep $rep" loadgen $rate; done
  for rate in 130000 140000; do lg "sweep $rep" loadgen_head $rate; done
done
kill $srv
