# 2-core VM: loadgen's open loop with --send-loop epoll and tokio alternated (one binary), the
# syscall floor beside them; generator on core 0, trivial server (1 thread) on core 1.
# Per run: achieved rate, validity, lags, and CPU µs per request (getrusage of the child).
# Run from the repository root after
# `cargo build --release -p loadgen --bin loadgen --example syscall_floor --example trivial_server`.
# $1 = rounds (default 3); RATES (default "40000 140000").
S=127.0.0.1:9199; U=http://$S/v1/embeddings
taskset -c 1 target/release/examples/trivial_server $S 1 > /dev/null & srv=$!; sleep 1
python3 - "${1:-3}" "${RATES:-40000 140000}" "$S" "$U" <<'PY'
import json, os, resource, subprocess, sys
rounds, rates, S, U = int(sys.argv[1]), sys.argv[2].split(), sys.argv[3], sys.argv[4]
def cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN); return ru.ru_utime + ru.ru_stime
for r in range(1, rounds + 1):
    c0 = cpu()
    o = subprocess.run(["taskset", "-c", "0", "target/release/examples/syscall_floor", S, "64", "5"], capture_output=True, text=True).stdout
    n = json.loads(o)["requests"] * 6 / 5
    print("round %d floor c64        req/s %8.0f  cpu/request %.2f us" % (r, n / 6, (cpu() - c0) / n * 1e6), flush=True)
    for rate in rates:
        for how in ["epoll", "tokio"]:
            c0 = cpu()
            subprocess.run(["taskset", "-c", "0", "target/release/loadgen", "--url", U, "--rps", rate, "--duration", "5s", "--warmup", "1s", "--quiet", "--send-loop", how, "--json", "/tmp/lgab.json"], capture_output=True)
            c = cpu() - c0
            j = json.load(open("/tmp/lgab.json")); os.remove("/tmp/lgab.json")
            n = j["achieved_rps"] * 6
            print("round %d %-5s asked %6s achieved %8.0f valid %-5s send-lag p99 %8.0f us receive-lag p99 %6.0f us p50 %.3f ms cpu %.2f s  cpu/request %.2f us" % (
                r, how, rate, j["achieved_rps"], j["valid"], 1e6 * j["send_lag"]["p99"], 1e6 * (j.get("receive_lag") or {}).get("p99", float("nan")), 1e3 * j["latency"]["p50"], c, c / n * 1e6), flush=True)
PY
kill $srv
