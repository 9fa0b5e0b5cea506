# Issue 17, sixteenth session: one generator core against a trivial server on 8 cores. The kernel's
# floor (loadgen/examples/syscall_floor: a bare epoll loop, one write and one read per request)
# beside oha and loadgen, each at its highest rate (closed loops of 64 and 256 connections, and
# loadgen's open loop asked 140k), CPU seconds of each; two rounds, alternated.
# (The call recorded in results/loadgen-floor-16core/ ran a first version whose CPU wrapper sent the
# tools' own output into cpu.txt too: raw-output.txt there; this one keeps them apart.)
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=/tmp/w; rm -rf $W; mkdir -p $W
S0=$(date +%s)
el() { echo "[$(( $(date +%s) - S0 )) s] $*" | tee -a $W/run.log; }
fin() { tar czf $OUT/all.tgz -C $W . ; }
nproc; lscpu | grep -E 'Model name|MHz' | head -3 | tee -a $W/run.log
taskset -c 8-15 $B/trivial_server 127.0.0.1:9100 8 > /dev/null & srv=$!
sleep 1
url=http://127.0.0.1:9100/v1/embeddings
echo '{"input":"the model serves requests with dynamic batching"}' > $W/body.json
# cpu TAG CMD...: runs CMD on core 0, appends "TAG cpu_s" from the child's rusage
cpu() { local tag=$1; shift
  python3 - "$W/cpu.txt" "$tag" "$@" <<'PY'
import resource, subprocess, sys
out, tag, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
subprocess.run(["taskset", "-c", "0"] + cmd)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
open(out, "a").write("%s %.2f\n" % (tag, ru.ru_utime + ru.ru_stime))
PY
}
sv() { awk '{print $14 + $15}' /proc/$srv/stat; }
for round in 1 2; do
  for c in 64 256; do
    s0=$(sv); cpu floor-$c-$round $B/syscall_floor 127.0.0.1:9100 $c 5 > $W/floor-$c-$round.json
    el "round $round floor c=$c: $(cat $W/floor-$c-$round.json) server ticks $(( $(sv) - s0 ))"
    s0=$(sv); cpu oha-$c-$round $B/oha -z 6s -c $c --no-tui --output-format json -m POST -H 'content-type: application/json' -D $W/body.json $url > $W/oha-$c-$round.json 2>/dev/null
    el "round $round oha c=$c: $(python3 -c "import json; s=json.load(open('$W/oha-$c-$round.json'))['summary']; print('rps %.0f success %.4f' % (s['requestsPerSec'], s['successRate']))") server ticks $(( $(sv) - s0 ))"
    s0=$(sv); cpu loadgen-$c-$round $B/loadgen --url $url --concurrency $c --duration 5s --warmup 1s --quiet --json $W/loadgen-$c-$round.json > /dev/null 2>&1
    el "round $round loadgen closed c=$c: $(python3 -c "import json; r=json.load(open('$W/loadgen-$c-$round.json')); print('rps %.0f valid %s p50 %.3f ms' % (r['achieved_rps'], r['valid'], 1e3*r['latency']['p50']))") server ticks $(( $(sv) - s0 ))"
  done
  s0=$(sv); cpu loadgen-open-$round $B/loadgen --url $url --rps 140000 --duration 5s --warmup 1s --quiet --json $W/loadgen-open-$round.json > /dev/null 2>&1
  el "round $round loadgen open 140k: $(python3 -c "import json; r=json.load(open('$W/loadgen-open-$round.json')); print('achieved %.0f valid %s' % (r['achieved_rps'], r['valid']))") server ticks $(( $(sv) - s0 ))"
  fin
done
el "cpu seconds (cumulative per python wrapper, one child each): $(tr '\n' ';' < $W/cpu.txt)"
if command -v perf >/dev/null; then
  taskset -c 0 perf stat -e task-clock,context-switches -- $B/syscall_floor 127.0.0.1:9100 256 3 2>&1 | tail -8 | tee -a $W/run.log
else el "no perf"; fi
kill $srv
fin
