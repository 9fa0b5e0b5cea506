# Issue 17 on this 2-core VM: HEAD (7fbd3ab, a connect for every due request with no idle
# connection) against the connect policy (Run::place), alternated, three rounds, at 30k, 40k and
# 50k req/s (constant), 5 s after 1 s; trivial server (1 thread) on core 1, generator on core 0.
# TIME_WAIT sockets counted after each run (a new connection each; the run's own, after 65 s of
# quiet so the count starts near 0). Usage: HEAD=bin NEW=bin SERVER=bin bash vm-ab.sh > out.txt
set -u
taskset -c 1 $SERVER 127.0.0.1:9100 1 > /dev/null & srv=$!
sleep 1
for round in 1 2 3; do for rate in 30000 40000 50000; do for b in HEAD NEW; do
  sleep 65
  taskset -c 0 ${!b} --url http://127.0.0.1:9100/v1/embeddings --rps $rate --threads 1 --duration 5s --warmup 1s --send-loop epoll --json /tmp/vm-ab.json > /dev/null 2>&1
  tw=$(ss -tan state time-wait | tail -n +2 | wc -l)
  python3 -c "import json; r=json.load(open('/tmp/vm-ab.json')); print('round $round %-4s asked %6d achieved %7.0f valid %-5s send-lag p99 %8.0f us connections %6d %s' % ('$b', $rate, r['achieved_rps'], r['valid'], 1e6*r['send_lag']['p99'], $tw, r['errors']))"
done; done; done
kill $srv
