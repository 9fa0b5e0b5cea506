# 2-core VM: CPU per request of the syscall floor, oha, loadgen closed (64) and open (40k) on core 0, trivial server on core 1, two rounds.
# Run from the repository root after `cargo build --release -p loadgen --bin loadgen --example syscall_floor --example trivial_server`; oha at /tmp/oha-bin.
# cpu µs per request on core 0, trivial server on core 1
S=127.0.0.1:9199; U=http://$S/v1/embeddings
taskset -c 1 target/release/examples/trivial_server $S 1 > /dev/null & srv=$!; sleep 1
echo '{"input":"the model serves requests with dynamic batching"}' > /tmp/body.json
run() { local tag=$1; shift; python3 - "$tag" "$@" <<'PY'
import resource, subprocess, sys, json, os
tag, cmd = sys.argv[1], sys.argv[2:]
p = subprocess.run(["taskset", "-c", "0"] + cmd, capture_output=True, text=True)
ru = resource.getrusage(resource.RUSAGE_CHILDREN); cpu = ru.ru_utime + ru.ru_stime
n = None
o = p.stdout
if 'syscall_floor' in o: n = json.loads(o)['requests'] * 6 / 5
elif '"summary"' in o: s = json.loads(o)['summary']; n = s['requestsPerSec'] * s['total']
elif os.path.exists('/tmp/lgc.json'):
    r = json.load(open('/tmp/lgc.json')); n = r['achieved_rps'] * 6; os.remove('/tmp/lgc.json')
print("%-22s cpu %.2fs  req/s %8.0f  cpu/request %.2f us" % (tag, cpu, n / 6, cpu / n * 1e6))
PY
}
for r in 1 2; do
run floor-c64 target/release/examples/syscall_floor $S 64 5
run oha-c64 /tmp/oha-bin -z 6s -c 64 --no-tui --output-format json -m POST -H 'content-type: application/json' -D /tmp/body.json $U
run loadgen-closed-c64 target/release/loadgen --url $U --concurrency 64 --duration 5s --warmup 1s --quiet --json /tmp/lgc.json
run loadgen-open-40k target/release/loadgen --url $U --rps 40000 --duration 5s --warmup 1s --quiet --json /tmp/lgc.json
done
kill $srv
