# Issue 17, this VM: segments, delayed-ACK timer firings (TcpExt DelayedACKs) and pure ACKs a request,
# and connects, for loadgen at 20k and 40k (trivial server, 1 thread, core 1; loadgen core 0). Run from the repo root.
# Output of one run: vm-delayed-acks.txt
ext() { grep -A1 '^TcpExt' /proc/net/netstat | awk 'NR==1{for(i=1;i<=NF;i++)n[i]=$i} NR==2{for(i=1;i<=NF;i++) if(n[i]=="DelayedACKs"||n[i]=="TCPPureAcks") printf "%s ", $i; print ""}'; }
segs() { awk '/^Tcp:/{if(h){print $6, $12}else h=1}' /proc/net/snmp; }
taskset -c 1 target/release/examples/trivial_server 127.0.0.1:9100 1 > /dev/null & srv=$!
sleep 1
for rate in 20000 40000; do
read d0 p0 < <(ext); read a0 s0 < <(segs)
taskset -c 0 target/release/loadgen --url http://127.0.0.1:9100/v1/embeddings --rps $rate --threads 1 --duration 5s --warmup 1s --quiet --json /tmp/d.json > /dev/null 2>&1
read d1 p1 < <(ext); read a1 s1 < <(segs)
python3 -c "import json; r=json.load(open('/tmp/d.json')); n=r['achieved_rps']*6; print('asked $rate achieved %.0f segs/req %.3f delayed-acks/req %.3f pure-acks/req %.3f connects %d' % (r['achieved_rps'], ($s1-$s0)/n, ($d1-$d0)/n, ($p1-$p0)/n, $a1-$a0))"
sleep 3; done
kill $srv
