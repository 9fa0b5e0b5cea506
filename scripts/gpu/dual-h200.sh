#!/usr/bin/env bash
# Issue 8 on nvidia-h200-x2: all-MiniLM-L6-v2 (f16) on one GPU and on both GPUs in one process,
# same knobs (profiles/h100-minilm.toml's), rate limit off:
#   closed-loop saturation; `tuner compare` of the two under p95<50ms (scaling efficiency);
#   `tuner search --target 'p95<50ms'` with devices = ["cuda:0", "cuda:1"] → "$OUT/2xh200-minilm.toml".
# Output: "$OUT/dual.tar.gz" and a summary printed last.
set -uo pipefail
OUT="${1:?output folder}"; TIME="${2:-3m}"
source scripts/gpu/common.sh
source <(sed -n '/^closed()/,/^stop()/p' scripts/gpu/bench-h100.sh)
W=/tmp/dual && rm -rf $W && mkdir -p $W/p; S=$W/summary.txt
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; } | tee -a $S
two() { sed 's/^devices = .*/devices = ["cuda:0", "cuda:1"]/' "$1" > "$2"; }
gpu_profile profiles/h100-minilm.toml $W/p/one-gpu.toml
two $W/p/one-gpu.toml $W/p/two-gpus.toml
serve $W/p/one-gpu.toml 8700 && { closed one-gpu http://127.0.0.1:8700 1024; }; stop
serve $W/p/two-gpus.toml 8700 && { closed two-gpus http://127.0.0.1:8700 2048; }; stop
grep -h "device=cuda" $W/metrics-two-gpus.txt | grep batch_size_inputs_count | tee -a $S
BATCHTUNE_RUNTIME=$B/runtime $B/tuner compare --name dual --results-dir $W --profiles $W/p/one-gpu.toml,$W/p/two-gpus.toml \
  --rates 8000,12000,16000,20000,24000,28000,32000,36000 --duration 3s --target 'p95<50ms' -q > $W/compare.txt 2>&1
cat $W/dual/table.md | tee -a $S
gpu_profile profiles/default.toml $W/base1.toml; two $W/base1.toml $W/base2.toml
$B/tuner search --target 'p95<50ms' --space tuner/spaces/gpu.toml --time "$TIME" --budget 16 \
  --spawn "$B/runtime serve --profile $W/base2.toml" --out $W/2xh200-minilm.toml \
  --journal-dir $W/searches > $W/search.txt 2>&1
cp $W/2xh200-minilm.toml "$OUT/" 2>/dev/null
grep -v -E '^\s*$' $W/search.txt | tail -n 24 | tee -a $S
tar -czf "$OUT/dual.tar.gz" -C /tmp dual
echo ==== ; cat $S
