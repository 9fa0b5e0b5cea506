#!/usr/bin/env bash
# loadgen's own benchmark: the highest rate one loadgen core sustains against a trivial local
# server, side by side with oha on the same server and core, and loadgen's send lag at 800 and
# 20,000 requests/s. Server pinned to core 1, generators to core 0 (taskset).
# Needs: cargo build --release -p loadgen --examples; oha on PATH (cargo install oha).
# Usage: scripts/bench-loadgen.sh [seconds per point]  → results/loadgen-bench.{json,md}
# On a bigger host give the server more cores so that it is not the ceiling, e.g.
#   BIN=/tmp/bin SERVER_CPUS=2-9 SERVER_THREADS=8 OUT=/tmp/lg RATES="... " scripts/bench-loadgen.sh 10
# (BIN: a folder with prebuilt loadgen and trivial_server, nothing is built; OUT: output prefix.)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
server_cpus="${SERVER_CPUS:-1}"
server_threads="${SERVER_THREADS:-1}"
rates="${RATES:-800 5000 20000 40000 60000 80000 100000 130000 160000}"
out="${OUT:-results/loadgen-bench}"
if [ -n "${BIN:-}" ]; then
  lg_bin="$BIN/loadgen"; srv_bin="$BIN/trivial_server"; oha_bin="${OHA:-$BIN/oha}"
else
  cargo build --release -q -p loadgen --bin loadgen --example trivial_server
  lg_bin=target/release/loadgen; srv_bin=target/release/examples/trivial_server; oha_bin="${OHA:-oha}"
fi
port=9100
taskset -c "$server_cpus" "$srv_bin" 127.0.0.1:$port "$server_threads" > /dev/null &
srv=$!
trap 'kill $srv 2>/dev/null' EXIT
sleep 0.5
url="http://127.0.0.1:$port/v1/embeddings"
tmp=$(mktemp -d)
body='{"input":"the model serves requests with dynamic batching"}'
echo "$body" > "$tmp/body.json"
rows=()
for rate in $rates; do
  taskset -c 0 "$lg_bin" --url "$url" --rps $rate --duration ${secs}s --warmup 2s \
    --threads 1 --quiet --json "$tmp/lg-$rate.json" > /dev/null || true
  lg=$(python3 -c "import json;r=json.load(open('$tmp/lg-$rate.json'));print(f\"{r['achieved_rps']:.1f} {r['send_lag']['p99']*1e6:.0f} {r['valid']} {r['latency']['p99']*1e3:.2f}\")")
  taskset -c 0 "$oha_bin" -z ${secs}s -q $rate -c 256 --no-tui --output-format json -m POST \
    -H 'content-type: application/json' -D "$tmp/body.json" "$url" > "$tmp/oha-$rate.json" 2>/dev/null || true
  oh=$(python3 -c "import json;r=json.load(open('$tmp/oha-$rate.json'));s=r['summary'];print(f\"{s['requestsPerSec']:.1f} {s['successRate']:.4f} {r['latencyPercentiles']['p99']*1e3:.2f}\")")
  echo "rate $rate: loadgen achieved/lag_p99_us/valid/p99_ms = $lg ; oha achieved/success/p99_ms = $oh"
  rows+=("$rate $lg $oh")
done
python3 - "$out" "$secs" "$server_cpus" "$server_threads" "${rows[@]}" <<'PY'
import json, sys, platform
out, secs, scpus, sthreads, rows = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
recs = []
for r in rows:
    rate, la, lag, lv, lp99, oa, osr, op99 = r.split()
    recs.append(dict(rate=int(rate), loadgen_achieved=float(la), loadgen_lag_p99_us=float(lag), loadgen_valid=lv == "True",
                     loadgen_p99_ms=float(lp99), oha_achieved=float(oa), oha_success=float(osr), oha_p99_ms=float(op99)))
def best(key, ok):
    good = [x for x in recs if ok(x) and x[key] >= 0.99 * x["rate"]]
    return max((x["rate"] for x in good), default=0)
lg_best = best("loadgen_achieved", lambda x: x["loadgen_valid"])
lg_best_any = best("loadgen_achieved", lambda x: True)
oha_best = best("oha_achieved", lambda x: x["oha_success"] >= 0.999)
cpu = next((l.split(":")[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
ncpu = sum(1 for l in open("/proc/cpuinfo") if l.startswith("processor"))
summary = dict(seconds_per_point=int(secs), host=cpu, host_cpus=ncpu, server_cpus=scpus, server_threads=int(sthreads), rows=recs, loadgen_max_sustained_rps=lg_best, loadgen_max_achieved_rps_ignoring_self_check=lg_best_any, oha_max_sustained_rps=oha_best,
               ratio=(lg_best / oha_best) if oha_best else None,
               lag_p99_us_at_800=next((x["loadgen_lag_p99_us"] for x in recs if x["rate"] == 800), None),
               lag_p99_us_at_20000=next((x["loadgen_lag_p99_us"] for x in recs if x["rate"] == 20000), None))
json.dump(summary, open(out + ".json", "w"), indent=2)
with open(out + ".md", "w") as f:
    f.write(f"# loadgen vs oha, one core each (taskset -c 0), trivial local server on cores {scpus} ({sthreads} threads)\n\nHost: {cpu}, {ncpu} CPUs. {secs}s per point. Command: `SERVER_CPUS={scpus} SERVER_THREADS={sthreads} scripts/bench-loadgen.sh {secs}`.\n")
    f.write("Sustained = achieved ≥ 99% of the asked rate (loadgen: and a valid run; oha: ≥ 99.9% successes).\n\n")
    f.write("| asked rps | loadgen achieved | loadgen send-lag p99 | loadgen valid | loadgen p99 | oha achieved | oha success | oha p99 |\n|---:|---:|---:|:--:|---:|---:|---:|---:|\n")
    for x in recs:
        f.write(f"| {x['rate']} | {x['loadgen_achieved']:.0f} | {x['loadgen_lag_p99_us']:.0f} µs | {'yes' if x['loadgen_valid'] else 'no'} | {x['loadgen_p99_ms']:.2f} ms | {x['oha_achieved']:.0f} | {x['oha_success']*100:.2f}% | {x['oha_p99_ms']:.2f} ms |\n")
    f.write(f"\nHighest sustained: loadgen {lg_best} rps with a valid self-check ({lg_best_any} rps on achieved rate alone), oha {oha_best} rps, ratio {summary['ratio'] if summary['ratio'] is None else round(summary['ratio'], 2)} (goal ≥ 1.5).\n")
    f.write(f"Send-lag p99: {summary['lag_p99_us_at_800']} µs at 800 rps, {summary['lag_p99_us_at_20000']} µs at 20,000 rps (goal < 200 µs; None where RATES left the rate out).\n")
print(open(out + ".md").read())
PY
