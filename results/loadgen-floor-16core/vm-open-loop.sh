# 2-core VM: loadgen open loop asked 140k on core 0, trivial server on core 1, two runs; $1 = the loadgen binary.
# The FuturesUnordered A/B ran it alternately with HEAD's build and the polling build, three times each.
S=127.0.0.1:9199; U=http://$S/v1/embeddings
taskset -c 1 target/release/examples/trivial_server $S 1 > /dev/null & srv=$!; sleep 1
for r in 1 2; do
python3 - <<PY
import resource, subprocess, json
subprocess.run(["taskset","-c","0","$1","--url","$U","--rps","140000","--duration","5s","--warmup","1s","--quiet","--json","/tmp/lgo.json"],capture_output=True)
ru=resource.getrusage(resource.RUSAGE_CHILDREN); cpu=ru.ru_utime+ru.ru_stime
r=json.load(open('/tmp/lgo.json')); n=r['achieved_rps']*6
print("open 140k: achieved %.0f cpu %.2f s  %.2f us/request" % (r['achieved_rps'], cpu, cpu/n*1e6))
PY
done
kill $srv
