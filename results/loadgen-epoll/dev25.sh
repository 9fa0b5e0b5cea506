# Issue 17 on the lent host's 16 cores: one generator core (core 0) against the trivial server on
# cores 8-15 (8 threads). Three alternated rounds of oha (closed loop of 256, its default way to
# find a peak), loadgen --send-loop epoll and --send-loop tokio (one binary) asked 160,000 req/s;
# then epoll at 80k-120k on one core and 200k-240k on two; the syscall floor once.
# Every line goes to $OUT/run.log as it is measured, so a call cut short keeps what it had.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W
L=$OUT/run.log
nproc | sed 's/^/cores /' >> $L; grep -m1 'model name' /proc/cpuinfo >> $L
taskset -c 8-15 $B/trivial_server 127.0.0.1:9100 8 > /dev/null & srv=$!
sleep 1
url=http://127.0.0.1:9100/v1/embeddings
echo '{"input":"the model serves requests with dynamic batching"}' > $W/body.json
lg() { # tag cores rate send-loop
  local f=$W/lg.json; rm -f $f
  local c0; c0=$(python3 -c "import resource;r=resource.getrusage(resource.RUSAGE_CHILDREN);print(r.ru_utime+r.ru_stime)")
  /usr/bin/time -f "%U %S" -o $W/t taskset -c $2 $B/loadgen --url $url --rps $3 --threads $(( $(echo $2 | tr ',' '\n' | wc -l) )) --duration 5s --warmup 1s --quiet --send-loop $4 --json $f > /dev/null 2>&1
  python3 -c "import json; r=json.load(open('$f')); u,s=open('$W/t').read().split()[-2:]; print('$1 cores $2 loadgen $4 asked $3 achieved %.0f valid %s send-lag p99 %.0f us receive-lag p99 %.0f us p50 %.3f ms p99 %.3f ms cpu %.2f s' % (r['achieved_rps'], r['valid'], 1e6*r['send_lag']['p99'], 1e6*(r.get('receive_lag') or {}).get('p99', float('nan')), 1e3*r['latency']['p50'], 1e3*r['latency']['p99'], float(u)+float(s)))" >> $L
}
for r in 1 2 3; do
  taskset -c 0 $B/oha -z 6s -c 256 --no-tui --output-format json -m POST -H 'content-type: application/json' -D $W/body.json $url > $W/oha.json 2>/dev/null
  python3 -c "import json; s=json.load(open('$W/oha.json'))['summary']; print('round $r oha c=256 rps %.0f success %.4f' % (s['requestsPerSec'], s['successRate']))" >> $L
  lg "round $r" 0 160000 epoll
  lg "round $r" 0 160000 tokio
done
for rate in 80000 100000 120000; do lg valid 0 $rate epoll; done
for rate in 200000 240000; do lg valid 0,1 $rate epoll; done
taskset -c 0 $B/syscall_floor 127.0.0.1:9100 256 5 >> $L 2>&1
kill $srv
