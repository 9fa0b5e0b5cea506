# 2-core VM: CPU of loadgen's open loop below saturation, --send-loop epoll and tokio, one binary;
# generator on core 0, trivial server (1 thread) on core 1; 3 s measured after 1 s.
S=127.0.0.1:9199; U=http://$S/v1/embeddings
taskset -c 1 target/release/examples/trivial_server $S 1 > /dev/null & srv=$!; sleep 1
for how in epoll tokio; do for r in 5000 10000 20000 40000; do
  /usr/bin/time -f "%U %S" -o /tmp/t taskset -c 0 target/release/loadgen --url $U --rps $r --duration 3s --warmup 1s --quiet --send-loop $how --json /tmp/x.json > /dev/null 2>&1
  python3 -c "import json; j=json.load(open('/tmp/x.json')); u,s=open('/tmp/t').read().split()[-2:]; print('%-5s asked %5d achieved %8.0f valid %-5s send-lag p99 %6.0f us receive-lag p99 %4.0f us p50 %4.0f us cpu %.2f s of 4 (%.0f%% of a core)' % ('$how', $r, j['achieved_rps'], j['valid'], 1e6*j['send_lag']['p99'], 1e6*j['receive_lag']['p99'], 1e6*j['latency']['p50'], float(u)+float(s), 25*(float(u)+float(s))))"
done; done
kill $srv
