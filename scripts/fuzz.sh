#!/usr/bin/env bash
# Runs every property-based fuzz target (tests/fuzz.rs of runtime, profiles and loadgen) for a
# wall-clock budget each, in rounds of PROPTEST_CASES cases with a fresh random seed per round,
# and prints one line per crate: rounds, cases, failed rounds. The test binaries run directly
# (no cargo lock held meanwhile). A failure leaves its shrunk input in the crate's
# proptest-regressions/ folder (replayed first by every later run) and its log in /tmp.
# Usage: scripts/fuzz.sh [SECONDS_PER_CRATE (600)] [CASES_PER_ROUND (20000)]
set -uo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"; cases="${2:-20000}"
bins=$(cargo test -p runtime -p profiles -p loadgen --test fuzz --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "fuzz":
        print(m["package_id"].split("#")[0].rsplit("/", 1)[-1].split("@")[0], m["executable"])')
[ -n "$bins" ] || { echo "fuzz.sh: could not build the fuzz targets" >&2; exit 1; }
while read -r pkg bin; do
  end=$(( $(date +%s) + secs )); rounds=0; failed=0
  while [ "$(date +%s)" -lt "$end" ]; do
    # Each crate's tests run from its own folder (proptest-regressions/ lives there).
    if ! (cd "$pkg" && PROPTEST_CASES=$cases "$bin" > "/tmp/fuzz-$pkg.log" 2>&1); then
      failed=$((failed + 1)); cp "/tmp/fuzz-$pkg.log" "/tmp/fuzz-$pkg-failure-$failed.log"
    fi
    rounds=$((rounds + 1))
  done
  targets=$(grep -oE 'running [0-9]+ tests' "/tmp/fuzz-$pkg.log" | grep -oE '[0-9]+' | head -1)
  echo "$pkg: ${secs}s, $rounds rounds x $cases cases x ${targets:-?} targets, $failed failed rounds"
done <<< "$bins"
