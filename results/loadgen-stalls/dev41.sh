# Issue 17 follow-up: the progress bar's check cloned pacer 0's whole collector (~2 MB) under its
# lock every 200 ms. loadgen (f20d72d: the clone) against loadgen_prog (merge_progress: four
# histograms added under each lock), both drawing the bar on a pseudo-terminal (`script`), and
# loadgen with --quiet (no bar) as the baseline; one pacer on core 4 at 20k and 60k req/s
# constant, three alternated rounds. Trivial server on cores 8-15 with 8 threads. `dev42`
# (run-dev42.log) is this script run again with loadgen_prog built from the committed change:
# one progress collector kept for the run (clear_progress), no 2 MB clone a check.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W
L=$OUT/run.log
{ nproc | sed 's/^/cores /'; grep -m1 'model name' /proc/cpuinfo; command -v script; } >> $L
taskset -c 8-15 $B/trivial_server 127.0.0.1:9100 8 > /dev/null & srv=$!
sleep 1
url=http://127.0.0.1:9100/v1/embeddings
lg() { # tag binary rate extra
  local f=$W/lg.json; rm -f $f
  local cmd="taskset -c 4 $B/$2 --url $url --rps $3 --threads 1 --duration 5s --warmup 1s --send-loop epoll --json $f $4"
  if [ -z "$4" ]; then script -qfc "$cmd" /dev/null > /dev/null 2>&1; else $cmd > /dev/null 2>&1; fi
  python3 -c "import json; r=json.load(open('$f')); sl=r['send_lag']; print('$1 %-12s %-7s asked %6d valid %-5s send-lag p99 %5.0f p999 %6.0f max %6.0f us' % ('$2', '${4:-bar}', $3, r['valid'], 1e6*sl['p99'], 1e6*sl['p999'], 1e6*sl['max']))" >> $L
}
for rep in 1 2 3; do for rate in 20000 60000; do
  lg "round $rep" loadgen $rate ""
  lg "round $rep" loadgen_prog $rate ""
  lg "round $rep" loadgen $rate --quiet
done; done
kill $srv
