# Issue 17, second call (machine still warm): loadgen --send-loop epoll on one core at 800..100k
# req/s (valid rate, CPU at 800), then 4 and 8 generator cores; trivial server on cores 8-15.
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
for rate in 800 20000 40000 60000 80000 100000; do lg valid 0 $rate epoll; done
lg scale 0,1,2,3 320000 epoll; lg scale 0,1,2,3,4,5,6,7 400000 epoll

kill $srv
