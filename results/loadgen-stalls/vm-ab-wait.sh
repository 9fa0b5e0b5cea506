# Issue 17 on this 2-core VM: the connect policy before (OLD: connect up to 8 a turn whenever a
# turn freed nothing) and after (NEW, the connect wait of spares-wait.patch without its spares
# or pending cap: a waiting request connects once it has waited what a
# connect costs) the change, alternated, three rounds, at 20k, 30k and 40k req/s (constant),
# 5 s after 1 s; trivial server (1 thread) on core 1, generator on core 0. "connections" counts
# the TIME_WAIT sockets the run added (it closes each connection it opened at its end).
# Usage: OLD=bin NEW=bin SERVER=bin bash vm-ab.sh > out.txt
set -u
taskset -c 1 $SERVER 127.0.0.1:9100 1 > /dev/null & srv=$!
sleep 1
tw() { ss -tan state time-wait | tail -n +2 | wc -l; }
for round in 1 2 3; do for rate in 20000 30000 40000; do for b in OLD NEW; do
  sleep 5
  before=$(tw)
  taskset -c 0 ${!b} --url http://127.0.0.1:9100/v1/embeddings --rps $rate --threads 1 --duration 5s --warmup 1s --send-loop epoll --json /tmp/vm-ab.json > /dev/null 2>&1
  after=$(tw)
  python3 -c "import json; r=json.load(open('/tmp/vm-ab.json')); s=r['send_lag']; print('round $round %-3s asked %6d achieved %7.0f valid %-5s send-lag p99 %6.0f p999 %6.0f max %6.0f us  connections %5d' % ('$b', $rate, r['achieved_rps'], r['valid'], 1e6*s['p99'], 1e6*s['p999'], 1e6*s['max'], $after - $before))"
done; done; done
kill $srv
