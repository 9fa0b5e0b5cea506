# Issue 17: on loopback the kernel runs the receiving socket's TCP work on the sending core, so a
# generator pays for the server's receive path too (20-37% of its core in softirq in dev36).
# Receive packet steering on lo (rps_cpus) moves that work to the server's cores, as a
# separate server host would. Alternated with it off and on (cores 8-15), three sweeps: oha
# (closed loop of 256), the epoll floor (syscall_floor, 256 connections) and loadgen at
# 120k-180k constant, all on core 4; trivial server on cores 8-15 with 8 threads.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W
L=$OUT/run.log
R=/sys/class/net/lo/queues/rx-0/rps_cpus
{ nproc | sed 's/^/cores /'; grep -m1 'model name' /proc/cpuinfo; echo "rps_cpus was $(cat $R)"; } >> $L
taskset -c 8-15 $B/trivial_server 127.0.0.1:9100 8 > /dev/null & srv=$!
sleep 1
url=http://127.0.0.1:9100/v1/embeddings
echo '{"input":"the model serves requests with dynamic batching"}' > $W/body.json
core=4
cpu() { grep "^cpu$core " /proc/stat; }
ticks() { python3 -c "import sys; a=list(map(int,sys.argv[1].split()[1:])); b=list(map(int,sys.argv[2].split()[1:])); d=[y-x for x,y in zip(a,b)]; print('core ticks user %d sys %d softirq %d idle %d' % (d[0],d[2],d[6],d[3]))" "$1" "$2"; }
lg() { # tag rate
  local f=$W/lg.json; rm -f $f; local b=$(cpu)
  taskset -c $core $B/loadgen --url $url --rps $2 --threads 1 --duration 5s --warmup 1s --quiet --send-loop epoll --json $f > /dev/null 2>&1
  local a=$(cpu)
  python3 -c "import json; r=json.load(open('$f')); sl=r['send_lag']; print('$1 loadgen asked %6d achieved %7.0f valid %-5s send-lag p99 %6.0f p999 %6.0f max %6.0f us latency p50 %.0f us' % ($2, r['achieved_rps'], r['valid'], 1e6*sl['p99'], 1e6*sl['p999'], 1e6*sl['max'], 1e6*r['latency']['p50']), end='  ')" >> $L
  ticks "$b" "$a" >> $L
}
for rep in 1 2 3; do
  for rps in 0 ff00; do
    echo $rps > $R || echo "cannot set rps_cpus" >> $L
    t="sweep $rep rps=$(cat $R)"
    b=$(cpu)
    taskset -c $core $B/oha -z 6s -c 256 --no-tui --output-format json -m POST -H 'content-type: application/json' -D $W/body.json $url > $W/oha.json 2>/dev/null
    a=$(cpu)
    python3 -c "import json; s=json.load(open('$W/oha.json'))['summary']; print('$t oha c=256 rps %.0f success %.4f' % (s['requestsPerSec'], s['successRate']), end='  ')" >> $L
    ticks "$b" "$a" >> $L
    echo "$t floor $(taskset -c $core $B/syscall_floor 127.0.0.1:9100 256 5)" >> $L
    for rate in 120000 140000 160000 180000; do lg "$t" $rate; done
  done
done
echo 0 > $R
kill $srv
