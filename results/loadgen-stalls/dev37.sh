# Issue 17: does the lent host stall a spinning thread by itself? The hiccup meter
# (loadgen/examples/hiccup) spins 10 s on an idle machine (cores 4 and 0), then beside loadgen
# runs at 110k req/s constant (10 s measured): the meter on core 4 while loadgen runs on core 0,
# and on core 5 while loadgen runs on core 4. Trivial server on cores 8-15 with 8 threads.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W
L=$OUT/run.log
{ nproc | sed 's/^/cores /'; grep -m1 'model name' /proc/cpuinfo; } >> $L
h() { echo "$1 $(taskset -c $2 $B/hiccup $3)" >> $L; }
h "idle core 4:" 4 10
h "idle core 0:" 0 10
taskset -c 8-15 $B/trivial_server 127.0.0.1:9100 8 > /dev/null & srv=$!
sleep 1
url=http://127.0.0.1:9100/v1/embeddings
lg() { # tag core rate
  local f=$W/lg.json; rm -f $f
  taskset -c $2 $B/loadgen --url $url --rps $3 --threads 1 --duration 10s --warmup 1s --quiet --send-loop epoll --json $f > /dev/null 2>&1
  python3 -c "import json; r=json.load(open('$f')); sl=r['send_lag']; print('$1 loadgen core %2d asked %6d achieved %7.0f valid %-5s send-lag p99 %6.0f p999 %6.0f max %6.0f us' % ($2, $3, r['achieved_rps'], r['valid'], 1e6*sl['p99'], 1e6*sl['p999'], 1e6*sl['max']))" >> $L
}
for rep in 1 2 3; do
  (sleep 1; h "round $rep meter core 4 beside loadgen core 0:" 4 10) & m=$!
  lg "round $rep" 0 110000; wait $m
  (sleep 1; h "round $rep meter core 5 beside loadgen core 4:" 5 10) & m=$!
  lg "round $rep" 4 110000; wait $m
done
h "server up, no load, core 4:" 4 5
kill $srv
h "idle again core 4:" 4 10
