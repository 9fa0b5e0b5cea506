# Issue 17: where do the lent host's millisecond stalls come from, and does the generator's core
# matter? Prints the container's CPU quota and throttling, each CPU's interrupt count over the
# sweeps, then alternates sweeps with the generators (oha, then loadgen at 120k/140k/160k
# constant) pinned to core 0 and to core 4. Trivial server on cores 8-15 with 8 threads.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W
L=$OUT/run.log
{ nproc | sed 's/^/cores /'; grep -m1 'model name' /proc/cpuinfo; uptime;
  for f in /sys/fs/cgroup/cpu.max /sys/fs/cgroup/cpu.stat /proc/pressure/cpu; do echo "== $f"; cat $f 2>&1; done
  echo "== isolated: $(cat /sys/devices/system/cpu/isolated 2>&1) nohz_full: $(cat /sys/devices/system/cpu/nohz_full 2>&1)"
  echo "== cmdline: $(cat /proc/cmdline)"
  echo "== busiest processes"; ps -eo pcpu,psr,comm --sort=-pcpu | head -8; } >> $L
irq() { awk 'NR==1{n=NF; next} {for(i=2;i<=n+1;i++) if ($i ~ /^[0-9]+$/) s[i-2]+=$i} END{for(i=0;i<n;i++) printf "%d ", s[i]; print ""}' /proc/interrupts; }
softirq() { awk 'NR==1{n=NF; next} {for(i=2;i<=n+1;i++) s[i-2]+=$i} END{for(i=0;i<n;i++) printf "%d ", s[i]; print ""}' /proc/softirqs; }
taskset -c 8-15 $B/trivial_server 127.0.0.1:9100 8 > /dev/null & srv=$!
sleep 1
url=http://127.0.0.1:9100/v1/embeddings
echo '{"input":"the model serves requests with dynamic batching"}' > $W/body.json
lg() { # tag core rate
  local f=$W/lg.json; rm -f $f
  /usr/bin/time -f "%U %S" -o $W/t taskset -c $2 $B/loadgen --url $url --rps $3 --threads 1 --duration 5s --warmup 1s --quiet --send-loop epoll --json $f > /dev/null 2>&1
  python3 -c "import json; r=json.load(open('$f')); u,s=open('$W/t').read().split()[-2:]; sl=r['send_lag']; print('$1 core %2d asked %6d achieved %7.0f valid %-5s send-lag p99 %6.0f p999 %6.0f max %6.0f us receive-lag p99 %4.0f us p50 %.3f ms cpu %.2f s' % ($2, $3, r['achieved_rps'], r['valid'], 1e6*sl['p99'], 1e6*sl['p999'], 1e6*sl['max'], 1e6*(r.get('receive_lag') or {}).get('p99', float('nan')), 1e3*r['latency']['p50'], float(u)+float(s)))" >> $L
}
echo "irq0 $(irq)" >> $L; echo "softirq0 $(softirq)" >> $L
for rep in 1 2 3; do
  for core in 0 4; do
    taskset -c $core $B/oha -z 6s -c 256 --no-tui --output-format json -m POST -H 'content-type: application/json' -D $W/body.json $url > $W/oha.json 2>/dev/null
    python3 -c "import json; s=json.load(open('$W/oha.json'))['summary']; print('sweep $rep core $core oha c=256 rps %.0f success %.4f' % (s['requestsPerSec'], s['successRate']))" >> $L
    for rate in 120000 140000 160000; do lg "sweep $rep" $core $rate; done
  done
done
echo "irq1 $(irq)" >> $L; echo "softirq1 $(softirq)" >> $L
{ echo "== after"; cat /sys/fs/cgroup/cpu.stat 2>&1; cat /proc/pressure/cpu 2>&1; } >> $L
kill $srv
