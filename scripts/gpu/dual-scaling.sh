#!/usr/bin/env bash
# Issue 8, scaling efficiency: the same knobs (profiles/2xh200-minilm.toml's) on one GPU and on
# two, plus one GPU at profiles/h100-minilm.toml's knobs, swept by `tuner compare` under
# p95<50ms in steps of 2,000 req/s. Output: "$OUT/scaling.tar.gz"; the table printed last.
set -uo pipefail
OUT="${1:?output folder}"
source scripts/gpu/common.sh
W=/tmp/scaling && rm -rf $W && mkdir -p $W/p
gpu_profile profiles/2xh200-minilm.toml $W/p/one-gpu.toml
sed 's/^devices = .*/devices = ["cuda:0", "cuda:1"]/' $W/p/one-gpu.toml > $W/p/two-gpus.toml
gpu_profile profiles/h100-minilm.toml $W/p/one-gpu-big-batch.toml
BATCHTUNE_RUNTIME=$B/runtime $B/tuner compare --name scaling --results-dir $W \
  --profiles $W/p/one-gpu.toml,$W/p/one-gpu-big-batch.toml,$W/p/two-gpus.toml \
  --rates 10000:40000:2000 --duration 3s --target 'p95<50ms' -q > $W/compare.txt 2>&1
tar -czf "$OUT/scaling.tar.gz" -C /tmp scaling
cat $W/scaling/table.md
