#!/usr/bin/env python3
"""Main effects of a stored grid: for each knob level, the mean sustainable rate over the grid
points at that level, one column per pass. Tells which knobs matter on a host and by how much,
next to `tuner replay`'s rank correlation between passes (how much is noise).

Usage: scripts/grid-effects.py 'ID1,ID2,…' ['ID1,ID2,…' …]   (journals under results/searches)"""
import collections
import json
import statistics
import sys
from pathlib import Path

ROOT = Path("results/searches")


def load(pass_ids):
    rates = {}
    for sid in pass_ids.split(","):
        for line in (ROOT / sid / "journal.jsonl").read_text().splitlines():
            d = json.loads(line)
            if d["type"] == "trial":
                rates[d["key"]] = (d["result"]["sustainable_rps"] or 0.0, d["knobs"])
    return rates


def magnitude(level):
    """Sort key: durations in seconds ("500us", "7ms", "1s"), other levels as numbers."""
    for suffix, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if level.endswith(suffix):
            return float(level[: -len(suffix)]) * scale
    return float(level)


passes = [load(p) for p in sys.argv[1:]]
if not passes:
    sys.exit(__doc__)
knobs = sorted(next(iter(passes[0].values()))[1])
print("| knob | level | " + " | ".join(f"pass {i + 1} mean req/s" for i in range(len(passes))) + " |")
print("|---|---|" + "---:|" * len(passes))
for knob in knobs:
    levels = collections.defaultdict(lambda: [[] for _ in passes])
    for i, p in enumerate(passes):
        for rate, k in p.values():
            levels[str(k[knob])][i].append(rate)
    for level, cols in sorted(levels.items(), key=lambda kv: magnitude(kv[0])):
        print(f"| {knob} | {level} | " + " | ".join(f"{statistics.mean(c):.1f}" for c in cols) + " |")
