#!/usr/bin/env bash
# Third-session GPU calls, with the pipelined GPU worker and the tuner's latency-drift test:
#   search  → `tuner search --target 'p95<50ms'` over tuner/spaces/gpu.toml ("$OUT/h100-minilm.toml")
#   compare → `tuner compare` of the seed profiles and the tuned one (GPU copies, rate limit off)
# Output: "$OUT/retune-<mode>.tar.gz" and a summary printed last.
# Usage (on the device): bash scripts/gpu/retune-h100.sh "$OUT" search|compare [search time]
set -uo pipefail
OUT="${1:?output folder}"; MODE="${2:?search or compare}"; TIME="${3:-4m}"
source scripts/gpu/common.sh
W=/tmp/retune-$MODE && rm -rf $W && mkdir -p $W
case "$MODE" in
search)
  gpu_profile profiles/default.toml $W/base.toml
  $B/tuner search --target 'p95<50ms' --space tuner/spaces/gpu.toml --time "$TIME" --budget 16 \
    --spawn "$B/runtime serve --profile $W/base.toml" --out $W/h100-minilm.toml \
    --journal-dir $W/searches > $W/search.txt 2>&1
  cp $W/h100-minilm.toml "$OUT/" 2>/dev/null
  grep -v -E '^\s*$' $W/search.txt | tail -n 30 ;;
compare)
  mkdir -p $W/p
  for p in conservative medium aggressive high-throughput default; do gpu_profile profiles/$p.toml $W/p/$p.toml; done
  gpu_profile "${TUNED:-profiles/h100-minilm.toml}" $W/p/h100-minilm.toml
  BATCHTUNE_RUNTIME=$B/runtime $B/tuner compare --name h100-seed-profiles --results-dir $W \
    --profiles $(ls $W/p/*.toml | tr '\n' ',' | sed 's/,$//') \
    --rates 1000,2000,4000,6000,8000,10000,12000,14000 --duration 3s --target 'p95<50ms' -q > $W/compare.txt 2>&1
  tail -n 30 $W/compare.txt; cat $W/h100-seed-profiles/table.md ;;
esac
tar -czf "$OUT/retune-$MODE.tar.gz" -C /tmp retune-$MODE
