# Issue 17: are the generator's stalls its virtual CPU being taken by the hypervisor? Around each
# run, the generator core's /proc/stat line (user, system, irq, softirq, steal, in 10 ms ticks)
# is read before and after, and so is the whole VM's steal. oha and loadgen (110k/130k/150k
# constant) on core 4, three sweeps; trivial server on cores 8-15 with 8 threads.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W
L=$OUT/run.log
{ nproc | sed 's/^/cores /'; grep -m1 'model name' /proc/cpuinfo; getconf CLK_TCK | sed 's/^/ticks per second /'; head -1 /proc/stat; } >> $L
taskset -c 8-15 $B/trivial_server 127.0.0.1:9100 8 > /dev/null & srv=$!
sleep 1
url=http://127.0.0.1:9100/v1/embeddings
echo '{"input":"the model serves requests with dynamic batching"}' > $W/body.json
cpu() { grep "^cpu$1 " /proc/stat; }
delta() { # before after -> user sys irq softirq steal
  python3 -c "import sys; a=list(map(int,sys.argv[1].split()[1:])); b=list(map(int,sys.argv[2].split()[1:])); d=[y-x for x,y in zip(a,b)]; print('ticks user %d sys %d idle %d irq %d softirq %d steal %d' % (d[0],d[2],d[3],d[5],d[6],d[7]))" "$1" "$2"
}
lg() { # tag core rate
  local f=$W/lg.json; rm -f $f
  local b=$(cpu $2) ba=$(cpu "")
  taskset -c $2 $B/loadgen --url $url --rps $3 --threads 1 --duration 5s --warmup 1s --quiet --send-loop epoll --json $f > /dev/null 2>&1
  local a=$(cpu $2) aa=$(cpu "")
  python3 -c "import json; r=json.load(open('$f')); sl=r['send_lag']; print('$1 core %2d asked %6d achieved %7.0f valid %-5s send-lag p99 %6.0f p999 %6.0f max %6.0f us' % ($2, $3, r['achieved_rps'], r['valid'], 1e6*sl['p99'], 1e6*sl['p999'], 1e6*sl['max']), end='  ')" >> $L
  echo "core $(delta "$b" "$a") | all cores steal $(delta "$ba" "$aa" | sed 's/.*steal //')" >> $L
}
for rep in 1 2 3; do
  core=4
  b=$(cpu $core)
  taskset -c $core $B/oha -z 6s -c 256 --no-tui --output-format json -m POST -H 'content-type: application/json' -D $W/body.json $url > $W/oha.json 2>/dev/null
  a=$(cpu $core)
  python3 -c "import json; s=json.load(open('$W/oha.json'))['summary']; print('sweep $rep core $core oha c=256 rps %.0f success %.4f' % (s['requestsPerSec'], s['successRate']), end='  ')" >> $L
  echo "core $(delta "$b" "$a")" >> $L
  for rate in 110000 130000 150000; do lg "sweep $rep" $core $rate; done
done
kill $srv
