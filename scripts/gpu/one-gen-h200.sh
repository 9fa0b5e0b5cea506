#!/usr/bin/env bash
# Issue 20's one-GPU side: the same search procedure as the two-GPU search (scripts/gpu/dual-gen-h200.sh
# tune), budget 1, so its one trial is the two-GPU winner's knobs on cuda:0 alone
# (results/generate-2xh200/p/one-gpu-776.toml): bracketing, bisection and confirmation as there.
set -uo pipefail
OUT="${1:?output folder}"
source scripts/gpu/common.sh
L=$OUT/run.log
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; } >> $L
timeout -s INT ${TUNE_LIMIT:-170} $B/tuner search --workload completions --output-tokens uniform:16:128 --target 'p95<4s' \
  --space scripts/gpu/gen-space-2xh200.toml --budget 1 --time ${TUNE_TIME:-2m} \
  --spawn "$B/runtime serve --profile results/generate-2xh200/p/one-gpu-776.toml" \
  --out "$OUT/one-gpu-776-tuned.toml" --journal-dir "$OUT/searches" --quiet > "$OUT/search.txt" 2>&1
echo "search rc $?" >> $L
tail -n 25 "$OUT/search.txt" >> $L
cp "$OUT"/searches/*/journal.jsonl "$OUT/journal.jsonl" 2>/dev/null
