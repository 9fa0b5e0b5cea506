#!/usr/bin/env python3
"""Per-step kernel counts and GPU-busy time from the `kernels` phase of
generate-batched-h200.sh: each prefill count P has one ncu CSV (ncu-pP-sS.csv) of a bench run
whose profiler window holds only its S timed decode steps (ncu --profile-from-start off; the
bench opens the window around them), so every kernel in it belongs to a timed step. Compared
with the step's wall time (wall-pP.jsonl, no profiler), it says whether a step is bound by the
GPU's work or by launching it. Usage: ncu-steps.py DIR"""
import collections
import csv
import glob
import json
import os
import sys


def kernels(path):
    """(name, ns) of every kernel in an ncu --csv file (other lines skipped)."""
    with open(path, errors="replace") as f:
        lines = f.readlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        return []
    out = []
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") == "gpu__time_duration.sum":
            out.append((row["Kernel Name"], float(row["Metric Value"].replace(",", ""))))
    return out


def short(name):
    return name.split("(")[0].split("<")[0][:60]


def main(d):
    for path in sorted(glob.glob(f"{d}/ncu-p*-s*.csv")):
        _, p, steps = os.path.basename(path)[:-4].split("-")
        steps = int(steps[1:])
        ks = kernels(path)
        if not ks:
            print(f"{p}: missing or empty CSV")
            continue
        n = len(ks) / steps
        busy = sum(t for _, t in ks) / steps / 1e6
        wall = None
        try:
            with open(f"{d}/wall-{p}.jsonl") as f:
                rows = [json.loads(l) for l in f if l.startswith("{")]
            wall = 1e3 * rows[-1]["median_step_s"]
        except (OSError, ValueError, IndexError, KeyError):
            pass
        print(f"## {p}: {n:.0f} kernels a step, GPU busy {busy:.2f} ms a step"
              + (f", wall {wall:.2f} ms ({100 * busy / wall:.0f}% busy)" if wall else ""))
        by = collections.defaultdict(lambda: [0, 0.0])
        for name, t in ks:
            by[short(name)][0] += 1
            by[short(name)][1] += t
        print("| kernel | a step | ms a step |\n|---|---:|---:|")
        for name, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:15]:
            print(f"| `{name}` | {c / steps:.1f} | {t / steps / 1e6:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
