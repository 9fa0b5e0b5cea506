"""Tables for results/gpu-h100.md from the files the GPU scripts brought back.

Usage: python3 scripts/gpu/summarize.py results/gpu-h100
"""
import glob, json, os, re, sys

R = sys.argv[1]


def jsonl(p):
    return {r["batch_size"]: r for r in map(json.loads, open(p))}


def raw_table(folder, names):
    runs = {n: jsonl(f"{R}/{folder}/{n}.jsonl") for n in names if os.path.exists(f"{R}/{folder}/{n}.jsonl")}
    sizes = sorted(next(iter(runs.values())))
    print("| batch | " + " | ".join(runs) + " |")
    print("|---:|" + "---:|" * len(runs))
    for b in sizes:
        print(f"| {b} | " + " | ".join(f"{runs[n][b]['inputs_per_s']:,.0f}" for n in runs) + " |")
    print()


def report(p):
    r = json.load(open(p))
    return r["offered_rps"] if "offered_rps" in r else None, r["achieved_rps"], r["latency"]["p95"], r["error_rate"]


print("Raw forward, mixed lengths (loadgen's workload), inputs/s:\n")
raw_table("raw-mixed", ["raw-real-f16", "raw-real-f32", "raw-synth-f16", "st-fp16", "st-fp32"])
print("Raw forward, fixed 28-token inputs, inputs/s:\n")
raw_table("raw-fixed", ["raw-real-f16", "raw-real-f32", "raw-synth-f16", "st-fp16"])

print("Rate sweeps (open loop, Poisson), p95 in ms / achieved req/s / errors:\n")
rows = {}
for p in glob.glob(f"{R}/compare/cmp-*.json"):
    m = re.match(r"cmp-(.*)-(\d+)\.json", os.path.basename(p))
    _, ach, p95, err = report(p)
    rows.setdefault(m[1], {})[int(m[2])] = (ach, p95, err)
rates = sorted({r for v in rows.values() for r in v})
print("| profile | " + " | ".join(str(r) for r in rates) + " |")
print("|---|" + "---|" * len(rates))
for name in ["conservative", "medium", "aggressive", "high-throughput", "default", "h100-minilm"]:
    if name in rows:
        cells = []
        for r in rates:
            c = rows[name].get(r)
            cells.append("—" if c is None else f"{c[1]*1000:.0f} / {c[0]:,.0f}" + (f" / {c[2]:.0%}" if c[2] > 0 else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
