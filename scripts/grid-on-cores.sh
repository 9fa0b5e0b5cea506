#!/usr/bin/env bash
# The search-efficiency grid of the default space (5 knobs × 3 levels = 243 points), measured in
# N shards at once, each shard (a tuner with its own runtime) pinned to its own pair of cores.
# Meant for a many-core host (the lent GPU machine's 16 cores: 8 shards); the shards' journals
# are merged by `tuner replay ID1,ID2,…`.
# A device call is limited to 10 minutes, so a grid may take two calls: RESUME=grid.tar.gz (the
# previous call's output, carried back) resumes every shard from its journal, repeating no
# finished trial.
# MAX_PROBES (default 6) caps the probes per point (repeated verdicts included).
# Usage: BIN=folder-with-tuner-and-runtime [RESUME=grid.tar.gz] [MAX_PROBES=6] scripts/grid-on-cores.sh OUT_DIR [shards] [time per shard]
set -uo pipefail
OUT="${1:?output folder}"; N="${2:-8}"; TIME="${3:-8m30s}"
BIN="${BIN:-target/release}"
J=/tmp/grid-journals && rm -rf $J && mkdir -p $J
[ -n "${RESUME:-}" ] && tar -xzf "$RESUME" -C /tmp
for k in $(seq 0 $((N - 1))); do
  # The journal whose header names shard k/N (one JSON header line per journal).
  prev=$(grep -l "\"shard\":\[$k,$N\]" $J/*/journal.jsonl 2>/dev/null | head -1)
  if [ -n "$prev" ]; then
    how=(--resume "$(basename "$(dirname "$prev")")")
  else
    how=(--target 'p95<1s' --strategy grid --budget 243 --shard "$k/$N" --seed 1 --probe 2s
      --probe-warmup 500ms --max-probes "${MAX_PROBES:-6}")
  fi
  taskset -c $((2 * k)),$((2 * k + 1)) "$BIN/tuner" search "${how[@]}" \
    --time "$TIME" --journal-dir $J --quiet >> $J/shard-$k.log 2>&1 &
done
wait
grep -h "grid shard done\|trial\|error" $J/shard-*.log | tail -n 20
for f in $J/*/journal.jsonl; do echo "$f $(grep -c '"type":"trial"' "$f") trials"; done
tar -czf "$OUT/grid.tar.gz" -C /tmp grid-journals
