#!/usr/bin/env bash
# Issue 20 on nvidia-h200-x2: the generation runtime (Qwen2.5-0.5B shape, synthetic, bf16) on one
# GPU and on both GPUs in one process (one replica per GPU, sequences placed by load, KV budget
# per replica), same knobs (profiles/h200-llm.toml's), rate limit off:
#   compare  `tuner compare` of the two over one rate grid under p95<4s, completions with
#            max_tokens uniform over 16..128 (forced): scaling efficiency = two GPUs' sustainable
#            output tokens/s ÷ (2 × one GPU's)
#   tune     `tuner search --target 'p95<4s'` with devices = ["cuda:0", "cuda:1"] →
#            "$OUT/2xh200-llm.toml" (SPACE: scripts/gpu/gen-space-2xh200.toml, TUNE_TIME)
# Every line of the summary goes to "$OUT/run.log" as it is made, so a call cut short keeps it.
# Usage (device): bash scripts/gpu/dual-gen-h200.sh OUT [compare,tune]
set -uo pipefail
OUT="${1:?output folder}"; PHASES="${2:-compare,tune}"
source scripts/gpu/common.sh
has() { [[ ",$PHASES," == *",$1,"* ]]; }
mkdir -p "$OUT/p"; L=$OUT/run.log
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; } >> $L
# The tuned one-GPU profile's knobs on the given devices, rate limit off, no provenance.
on() { # devices dst
  sed -n '/^\[provenance\]/q;p' profiles/h200-llm.toml | grep -v -E '^(devices|rate_limit) *=' > "$2"
  printf 'devices = %s\nrate_limit = 0.0\n' "$1" >> "$2"
}
on '["cuda:0"]' "$OUT/p/one-gpu.toml"
on '["cuda:0", "cuda:1"]' "$OUT/p/two-gpus.toml"
WORK="--workload completions --output-tokens uniform:16:128"
if has compare; then
  timeout ${COMPARE_LIMIT:-240} env BATCHTUNE_RUNTIME=$B/runtime $B/tuner compare --name dual-gen --results-dir "$OUT" \
    --profiles "$OUT/p/one-gpu.toml,$OUT/p/two-gpus.toml" $WORK --target 'p95<4s' \
    --rates ${RATES:-560,640,720,800,1120,1280,1440,1600} --duration 8s --warmup 3s > "$OUT/compare.txt" 2>&1
  echo "compare rc $?" >> $L
  tail -n 20 "$OUT/compare.txt" >> $L
  cat "$OUT/dual-gen/table.md" >> $L 2>/dev/null
fi
if has tune; then
  # SIGINT: the tuner finishes its probe, confirms what it has and writes the profile.
  timeout -s INT ${TUNE_LIMIT:-290} $B/tuner search $WORK --target 'p95<4s' \
    --space ${SPACE:-scripts/gpu/gen-space-2xh200.toml} --spawn "$B/runtime serve --profile $OUT/p/two-gpus.toml" \
    --time ${TUNE_TIME:-4m} --out "$OUT/2xh200-llm.toml" --journal-dir "$OUT/searches" --quiet > "$OUT/search.txt" 2>&1
  echo "search rc $?" >> $L
  tail -n 25 "$OUT/search.txt" >> $L
fi
