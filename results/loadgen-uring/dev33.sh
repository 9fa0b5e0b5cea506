# Issue 17: HEAD (loadgen_head, 7fbd3ab: a new connection for every due request that finds none
# idle) against loadgen with the connect policy of Run::place (behind and freeing connections,
# it waits for them), alternated, on core 0; trivial server on cores 8-15; oha (closed loop of
# 256) once a sweep. Constant arrivals at 100k, 120k, 140k and 240k (saturated: the achieved
# rate), Poisson at 100k and 120k; two sweeps. Lines go to $OUT/run.log as measured.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W
L=$OUT/run.log
{ nproc | sed 's/^/cores /'; grep -m1 'model name' /proc/cpuinfo; cat /sys/devices/system/clocksource/clocksource0/current_clocksource; } >> $L
taskset -c 8-15 $B/trivial_server 127.0.0.1:9100 8 > /dev/null & srv=$!
sleep 1
url=http://127.0.0.1:9100/v1/embeddings
echo '{"input":"the model serves requests with dynamic batching"}' > $W/body.json
lg() { # tag binary arrival rate
  local f=$W/lg.json; rm -f $f
  local tw0=$(ss -tan state time-wait | wc -l)
  /usr/bin/time -f "%U %S" -o $W/t taskset -c 0 $B/$2 --url $url --rps $4 --arrival $3 --threads 1 --duration 5s --warmup 1s --quiet --send-loop epoll --json $f > /dev/null 2>&1
  local tw=$(( $(ss -tan state time-wait | wc -l) - tw0 ))
  python3 -c "import json; r=json.load(open('$f')); u,s=open('$W/t').read().split()[-2:]; sl=r['send_lag']; print('$1 %-12s %-8s asked %6d achieved %7.0f valid %-5s send-lag p99 %6.0f p999 %6.0f max %6.0f us p50 %.3f ms cpu %.2f s new-time-wait %6d %s' % ('$2', '$3', $4, r['achieved_rps'], r['valid'], 1e6*sl['p99'], 1e6*sl['p999'], 1e6*sl['max'], 1e3*r['latency']['p50'], float(u)+float(s), $tw, r['errors']))" >> $L
}
for rep in 1 2; do
  taskset -c 0 $B/oha -z 6s -c 256 --no-tui --output-format json -m POST -H 'content-type: application/json' -D $W/body.json $url > $W/oha.json 2>/dev/null
  python3 -c "import json; s=json.load(open('$W/oha.json'))['summary']; print('sweep $rep oha c=256 rps %.0f success %.4f' % (s['requestsPerSec'], s['successRate']))" >> $L
  for rate in 100000 120000 140000 240000; do for b in loadgen_head loadgen; do lg "sweep $rep" $b constant $rate; done; done
  for rate in 100000 120000; do for b in loadgen_head loadgen; do lg "sweep $rep" $b poisson $rate; done; done
done
kill $srv
