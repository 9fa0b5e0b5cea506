# Issue 17: would io_uring raise the one-core floor? On the 16-core host, the trivial server on
# cores 8-15 (8 threads); on core 0, alternated three times: oha (closed loop of 256), and the
# bare closed loop of loadgen/examples/syscall_floor.rs over 256 connections in its three modes
# (epoll: a read and a write a request; uring: one io_uring_enter a turn; uring-defer: the same
# ring set up SINGLE_ISSUER + DEFER_TASKRUN + COOP_TASKRUN). Lines go to $OUT/run.log.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W
L=$OUT/run.log
{ nproc | sed 's/^/cores /'; grep -m1 'model name' /proc/cpuinfo; uname -r; cat /proc/sys/kernel/io_uring_disabled 2>/dev/null | sed 's/^/io_uring_disabled /'; } >> $L
taskset -c 8-15 $B/trivial_server 127.0.0.1:9100 8 > /dev/null & srv=$!
sleep 1
url=http://127.0.0.1:9100/v1/embeddings
echo '{"input":"the model serves requests with dynamic batching"}' > $W/body.json
for rep in 1 2 3; do
  taskset -c 0 $B/oha -z 6s -c 256 --no-tui --output-format json -m POST -H 'content-type: application/json' -D $W/body.json $url > $W/oha.json 2>/dev/null
  python3 -c "import json; s=json.load(open('$W/oha.json'))['summary']; print('round $rep oha c=256 rps %.0f success %.4f' % (s['requestsPerSec'], s['successRate']))" >> $L
  for m in epoll uring uring-defer; do
    echo "round $rep $(taskset -c 0 $B/syscall_floor 127.0.0.1:9100 256 5 $m 2>&1 | tail -1)" >> $L
  done
done
kill $srv
