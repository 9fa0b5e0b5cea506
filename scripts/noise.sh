#!/usr/bin/env bash
# Issue 18, item 1: how noisy is one configuration's sustainable-rate search on this host?
# Repeats the same one-point search (the default profile's knobs pinned, min = max) N times with
# the default probe settings and target, then tabulates each run's probes (rate, verdict, p95,
# achieved rate), its sustainable rate, bracket and confirmed rate.
# Usage: BIN=target/release scripts/noise.sh OUT [N=10] [TARGET='p95<4s']
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?output folder}"; n="${2:-10}"; target="${3:-p95<4s}"
BIN="${BIN:-target/release}"
mkdir -p "$out"
cat > "$out/pinned.toml" <<'T'
# profiles/default.toml's knobs, one point.
[max_batch_size]
type = "int"
min = 32
max = 32
[batch_wait_timeout]
type = "duration"
min = "5ms"
max = "5ms"
[max_concurrent_batches]
type = "int"
min = 2
max = 2
[max_queue_size]
type = "int"
min = 1024
max = 1024
[max_batch_tokens]
type = "int"
min = 16384
max = 16384
T
for k in $(seq "$n"); do
  "$BIN/tuner" search --target "$target" --space "$out/pinned.toml" --budget 1 --quiet \
    --out "$out/run-$k.toml" --journal-dir "$out/searches" > "$out/run-$k.log" 2>&1
  grep -E 'sustainable rate' "$out/run-$k.log" | sed "s/^/run $k: /"
done
python3 - "$out" "$n" "$target" <<'PY'
import glob, json, statistics as st, sys, tomllib
out, n, target = sys.argv[1], int(sys.argv[2]), sys.argv[3]
runs = []
for k in range(1, n + 1):
    try:
        prov = tomllib.load(open(f"{out}/run-{k}.toml", "rb"))["provenance"]
    except Exception:
        continue
    j = f"{out}/searches/{prov['search_id']}/journal.jsonl"
    trial = [json.loads(l) for l in open(j) if '"type":"trial"' in l][0]
    runs.append((k, prov, trial["result"]))
def spread(xs):
    m = st.median(xs)
    return f"median {m:.1f}, min {min(xs):.1f} ({100*(min(xs)/m-1):+.0f}%), max {max(xs):.1f} ({100*(max(xs)/m-1):+.0f}%), CV {100*st.pstdev(xs)/st.mean(xs):.1f}%"
lines = [f"# Noise of one configuration's sustainable-rate search ({len(runs)} runs)\n",
         f"`BIN=target/release scripts/noise.sh {out} {n} '{target}'`: profiles/default.toml's knobs pinned, default probe and confirmation settings of the revision that ran (`tuner search --help`), on this 2-core VM (server and load generator share it).\n",
         "| run | probes: rate → verdict (p95, achieved) | sustainable | bracket | confirmed (passes per step) |", "|---:|---|---:|---|---|"]
for k, prov, res in runs:
    probes = "; ".join(f"{p['rate']:.1f} {'✓' if p['pass'] else '✗'} ({p['p95']:.2f} s, {p['achieved_rps']:.1f})" for p in res["probes"])
    # Journals before the race wrote [rate, passed of 3]; since, one table per verdict.
    steps = ", ".join(
        f"{s['rate_rps']:.1f}: {s['passed']}/{s['probes']} {s['verdict']}" if isinstance(s, dict)
        else f"{s[0]:.1f}: {s[1]}/3"
        for s in prov["confirmation_steps"])
    lines.append(f"| {k} | {probes} | {res['sustainable_rps']:.1f} | {res['sustainable_rps']:.1f}–{res.get('failed_rps') or 0:.1f} | {prov['sustainable_rps']:.1f} ({steps}) |")
sus = [r["sustainable_rps"] for _, _, r in runs]
conf = [p["sustainable_rps"] for _, p, _ in runs]
lines += ["", f"- Trial's sustainable rate: {spread(sus)}.", f"- Confirmed rate: {spread(conf)}."]
# Probes near the same rate across runs: how often does the verdict agree?
allp = [(p["rate"], p["pass"], p["p95"], p["achieved_rps"]) for _, _, r in runs for p in r["probes"]]
allp.sort()
groups, cur = [], []
for p in allp:
    if cur and p[0] > cur[0][0] * 1.03:
        groups.append(cur); cur = []
    cur.append(p)
if cur: groups.append(cur)
lines += ["", "| probed rate (±3%) | probes | passed | p95 range | achieved range |", "|---:|---:|---:|---|---|"]
for g in groups:
    if len(g) < 2: continue
    lines.append(f"| {st.median([x[0] for x in g]):.1f} | {len(g)} | {sum(x[1] for x in g)} | {min(x[2] for x in g):.2f}–{max(x[2] for x in g):.2f} s | {min(x[3] for x in g):.1f}–{max(x[3] for x in g):.1f} |")
open(f"{out}/README.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
