# Issue 17 on this 2-core VM: TCP segments a request on loopback, to see whether delayed or
# separate ACKs leave kernel work loadgen could avoid. Trivial server (1 thread) on core 1;
# loadgen (one pacer, epoll loop) on core 0 at 20k, 40k and 200k req/s constant, then oha 1.16
# as a closed loop of 256 for 5 s on core 0. Segments: /proc/net/snmp Tcp OutSegs (on loopback
# each segment is sent once and received once); connects: Tcp ActiveOpens.
# Usage: LOADGEN=bin SERVER=bin OHA=bin bash vm-segments.sh > vm-segments.txt
set -u
snmp() { awk '/^Tcp:/{if(h){print $6, $12}else h=1}' /proc/net/snmp; }   # ActiveOpens OutSegs
taskset -c 1 $SERVER 127.0.0.1:9100 1 > /dev/null & srv=$!
sleep 1
url=http://127.0.0.1:9100/v1/embeddings
for rate in 20000 40000 200000; do
  read a0 s0 < <(snmp)
  taskset -c 0 $LOADGEN --url $url --rps $rate --threads 1 --duration 5s --warmup 1s --send-loop epoll --quiet --json /tmp/segs.json > /dev/null 2>&1
  read a1 s1 < <(snmp)
  python3 -c "import json; r=json.load(open('/tmp/segs.json')); n=r['achieved_rps']*6; print('loadgen asked %6d achieved %7.0f valid %-5s send-lag p99 %9.0f us  segments/request %.3f  connects %d' % ($rate, r['achieved_rps'], r['valid'], r['send_lag']['p99']*1e6, ($s1-$s0)/n, $a1-$a0))"
  sleep 3
done
read a0 s0 < <(snmp)
taskset -c 0 $OHA -c 256 -z 5s --no-tui --output-format json -m POST -H 'content-type: application/json' -d '{"input":"hello"}' $url > /tmp/oha.json 2>/dev/null
read a1 s1 < <(snmp)
python3 -c "import json; r=json.load(open('/tmp/oha.json')); n=sum(r['statusCodeDistribution'].values()); print('oha closed loop of 256: %7.0f req/s  segments/request %.3f  connects %d' % (r['summary']['requestsPerSec'], ($s1-$s0)/n, $a1-$a0))"
kill $srv
