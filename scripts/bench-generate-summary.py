#!/usr/bin/env python3
"""Summarises a scripts/bench-generate.sh folder into summary.md (re-runnable on the files).

Usage: scripts/bench-generate-summary.py OUT_DIR BEST MAX_TOKENS P95_S "RATES"
"""
import json
import sys

out, best, n, p95_s, rates = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5].split()
raw = [json.loads(line) for line in open(f"{out}/raw.jsonl")]
ceiling = {p["batch_size"]: p["tokens_per_s"] for p in raw}
s = json.load(open(f"{out}/served.json"))
lines = ["| batch | raw decode tokens/s | median step (ms) |", "|---:|---:|---:|"]
lines += [f"| {p['batch_size']} | {p['tokens_per_s']:.1f} | {p['median_step_s'] * 1e3:.1f} |" for p in raw]
# A closed loop of equal requests completes in waves (all clients start together), so counting
# completions inside a window quantises the rate; Little's law (clients / mean latency) does not.
counted = s["achieved_rps"] * n
little = best / s["latency"]["mean"] * n
c = ceiling.get(best, float("nan"))
lines += [
    "",
    f"Served at max_batch_size {best}, closed loop of {best} clients, {n} output tokens each: "
    f"{best} / mean latency {s['latency']['mean']:.2f} s x {n} = **{little:.1f} output tokens/s** "
    f"(completions counted in the 60 s window: {counted:.1f}); raw ceiling at {best}: {c:.1f}; "
    f"**served / raw = {little / c:.2f}** ({counted / c:.2f} by the windowed count).",
    "",
    f"| scheduling | offered req/s (Poisson, realised) | achieved req/s | requests | p50 (s) | p95 (s) | latency drift (s/s) | sustains p95 < {p95_s:g} s |",
    "|---|---:|---:|---:|---:|---:|---:|---|",
]
best_rate = {}
for mode in ["continuous", "static"]:
    for r in rates:
        try:
            j = json.load(open(f"{out}/{mode}-{r}.json"))
        except FileNotFoundError:
            continue
        # The tuner's rule: targets met and the queue not growing (latency drift over 0.05 s per
        # second of schedule and two standard errors above 0 means it grew).
        d = j.get("latency_drift") or {"slope": 0.0, "stderr": 0.0}
        growing = d["slope"] > 0.05 and d["slope"] > 2 * d["stderr"]
        ok = j["latency"]["p95"] < p95_s and j["error_rate"] == 0 and j["ok"] > 0 and not growing
        if ok:
            best_rate[mode] = max(best_rate.get(mode, 0), j["achieved_rps"])
        lines.append(
            f"| {mode} | {j['offered_rps']:.3f} | {j['achieved_rps']:.3f} | {j['ok']} | {j['latency']['p50']:.2f} | "
            f"{j['latency']['p95']:.2f} | {d['slope']:+.3f} | {'yes' if ok else 'no'} |"
        )
cr, sr = best_rate.get("continuous", 0), best_rate.get("static", 0)
lines += [
    "",
    f"Highest achieved rate sustaining p95 < {p95_s:g} s: continuous {cr:.3f} req/s, static {sr:.3f} req/s"
    + (f": **{cr / sr:.2f}x**" if sr else "")
    + " (on the rate ladder; the true ratio lies between neighbouring rungs).",
]
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
