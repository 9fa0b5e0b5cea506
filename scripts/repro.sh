#!/usr/bin/env bash
# Issue 18, item 4: does the main job agree with itself? Runs README command 1 on N fresh clones
# of this repository's HEAD, one after another, then a 30 s ground-truth capacity run per distinct
# winner (its tuned profile with the rate limit off, lattice rates around its confirmed rate),
# and tabulates both in OUT/README.md.
# Usage: scripts/repro.sh OUT [N=5]
# WARM_TARGET=DIR moves a target folder into the first clone (and on from clone to clone), so
# dependencies compile once; every workspace crate is still rebuilt for the new path.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m "${1:?output folder}")"; n="${2:-5}"
work="${WORK:-/tmp/repro-clones}"
warm="${WARM_TARGET:-}"
mkdir -p "$out/searches" "$work"
rev="$(git -C "$root" rev-parse --short HEAD)"
echo "$rev" > "$out/revision"
: > "$out/times.txt"
for k in $(seq "$n"); do
  dir="$work/c$k/batchtune"
  rm -rf "$work/c$k"
  git clone -q "$root" "$dir"
  if [ -n "$warm" ] && [ -d "$warm" ]; then mv "$warm" "$dir/target"; fi
  (
    cd "$dir"
    t0=$(date +%s)
    cargo build --release --workspace > build.log 2>&1 || { echo "run $k: build failed"; exit 1; }
    t1=$(date +%s)
    target/release/tuner search --target 'p95<4s' > search.log 2>&1
    t2=$(date +%s)
    echo "$k $((t1 - t0)) $((t2 - t1))" >> "$out/times.txt"
  )
  cp "$dir/profiles/tuned.toml" "$out/run-$k.toml" 2>/dev/null
  cp "$dir/search.log" "$out/run-$k.log"
  # This run's journals only (the clone also holds the committed ones).
  for j in "$dir"/results/searches/*; do
    [ -e "$root/results/searches/$(basename "$j")" ] || cp -r "$j" "$out/searches/"
  done
  grep -E 'sustainable rate|interval' "$dir/search.log" | sed "s/^/run $k: /"
  warm="$dir/target"
done
bin="$warm/release"

# Ground truth: 30 s runs (2 s warm-up) at the confirmed rate and 4.4% and 8.9% either side of it
# (every second point of the tuner's 32-point lattice) for each distinct winner, on a fresh runtime with the winner's profile and no rate limit.
python3 - "$out" "$n" > "$out/winners.txt" <<'PY'
import sys, tomllib
out, n = sys.argv[1], int(sys.argv[2])
seen = {}
for k in range(1, n + 1):
    try:
        p = tomllib.load(open(f"{out}/run-{k}.toml", "rb"))
    except Exception:
        continue
    knobs = tuple(str(p.get(x)) for x in ("max_batch_size", "batch_wait_timeout", "max_concurrent_batches", "max_queue_size", "max_batch_tokens"))
    seen.setdefault(knobs, (k, p["provenance"]["sustainable_rps"]))
for knobs, (k, rate) in seen.items():
    print(k, rate)
PY
while read -r k rate; do
  port=$((20000 + RANDOM % 20000))
  BATCHTUNE_RATE_LIMIT=0 "$bin/runtime" serve --profile "$out/run-$k.toml" --addr "127.0.0.1:$port" > "$out/gt-$k-server.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 0.2; done
  for step in -2 -1 0 1 2; do
    r=$(python3 -c "import math; i=round(math.log2($rate)*32)+2*($step); print(f'{2**(i/32):.4f}')")
    "$bin/loadgen" --url "http://127.0.0.1:$port" --rps "$r" --duration 30s --warmup 2s \
      --json "$out/gt-$k-$step.json" > /dev/null 2>&1
  done
  kill "$pid"; wait "$pid" 2>/dev/null
done < "$out/winners.txt"

python3 - "$out" "$n" <<'PY'
import glob, json, os, statistics as st, sys, tomllib
out, n = sys.argv[1], int(sys.argv[2])
rev = open(f"{out}/revision").read().strip()
times = {int(l.split()[0]): (int(l.split()[1]), int(l.split()[2])) for l in open(f"{out}/times.txt") if l.strip()}
rows, rates = [], []
for k in range(1, n + 1):
    try:
        p = tomllib.load(open(f"{out}/run-{k}.toml", "rb"))
    except Exception:
        rows.append(f"| {k} | no profile written | | | | | |"); continue
    v = p["provenance"]; rates.append(v["sustainable_rps"])
    knobs = f"batch {p.get('max_batch_size')}, wait {p.get('batch_wait_timeout')}, {p.get('max_concurrent_batches')} concurrent, queue {p.get('max_queue_size')}, tokens {p.get('max_batch_tokens')}"
    lo, hi = v["sustainable_rps_interval"]
    b, s = times.get(k, (0, 0))
    rows.append(f"| {k} | {knobs} | {v['trials']} | {v['search_best_rps']:.1f} | **{v['sustainable_rps']:.1f}** ({lo:.1f}–{hi if isinstance(hi, str) else f'{hi:.1f}'}) | {s // 60} min {s % 60} s | {b} s |")
med = st.median(rates) if rates else 0
lines = [f"# Reproducibility of the main job (README command 1) on {len(rates)} fresh clones of {rev}\n",
         f"`scripts/repro.sh {os.path.relpath(out)} {n}`: each clone built with `cargo build --release --workspace` (a target folder moved in from the previous clone: dependencies compiled once, the workspace rebuilt) and ran `target/release/tuner search --target 'p95<4s'`, one after another on this 2-core VM.\n",
         "| run | winner's knobs | trials | search best | confirmed (interval) | search time | build |", "|---:|---|---:|---:|---|---:|---:|"] + rows
if rates:
    lines += ["", f"Confirmed rates: median {med:.1f} req/s, min {min(rates):.1f} ({100*(min(rates)/med-1):+.1f}%), max {max(rates):.1f} ({100*(max(rates)/med-1):+.1f}%)."]
lines += ["", "Ground truth: the winner's profile on a fresh runtime with the rate limit off, `loadgen --rps R --duration 30s --warmup 2s` at lattice rates around its confirmed rate. Sustained = drift ≤ 0.05 s/s and p95 < 4 s over 30 s.", "",
          "| winner of run | offered | achieved | p50 | p95 | drift (s/s) | sustained |", "|---:|---:|---:|---:|---:|---:|:---:|"]
for w in sorted(glob.glob(f"{out}/gt-*-0.json")):
    k = w.split("gt-")[1].split("-")[0]
    best = None
    for step in (-2, -1, 0, 1, 2):
        try:
            r = json.load(open(f"{out}/gt-{k}-{step}.json"))
        except Exception:
            continue
        d = (r.get("latency_drift") or {}).get("slope", float("nan"))
        ok = d <= 0.05 and r["latency"]["p95"] < 4.0 and r["error_rate"] < 0.01
        if ok: best = r["offered_rps"]
        lines.append(f"| {k} | {r['offered_rps']:.1f} | {r['achieved_rps']:.1f} | {r['latency']['p50']:.3f} s | {r['latency']['p95']:.3f} s | {d:+.4f} | {'✓' if ok else '✗'} |")
    if best:
        lines.append(f"| {k} | **capacity ≈ {best:.1f}** (highest sustained) | | | | | |")
open(f"{out}/README.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
