#!/usr/bin/env bash
# Issue 17's benchmark on the lent host's 16 cores (CPU only): loadgen on 1/2/4/8 cores against
# the trivial server on cores 8-15 (8 threads), oha on one core. Binaries travel xz-compressed in
# .gpu-lg/ (loadgen, trivial_server, oha; built on the CPU machine).
# Output: "$OUT/loadgen-scaling-16core.{json,md}".
set -uo pipefail
OUT="${1:?output folder}"; SECS="${2:-5}"
source scripts/gpu/unpack-lg.sh
BIN=$BIN SERVER_CPUS=8-15 SERVER_THREADS=8 THREADS="1 2 4 8" OUT="$OUT/loadgen-scaling-16core" \
  RATES="${RATES:-20000 40000 60000 80000 100000 120000 160000 240000 320000 400000 480000 640000 800000}" \
  bash scripts/bench-loadgen-scaling.sh "$SECS"
