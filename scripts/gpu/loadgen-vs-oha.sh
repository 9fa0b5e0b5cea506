#!/usr/bin/env bash
# loadgen vs oha on a host with cores to spare (issue 3's benchmark): each generator on core 0,
# the trivial server on cores 2-9 with 8 threads so it is not the ceiling. Binaries travel
# xz-compressed in .gpu-lg/ (loadgen, trivial_server, oha; built on the CPU machine).
# Output: "$OUT/loadgen-bench-16core.{json,md}".
set -uo pipefail
OUT="${1:?output folder}"; SECS="${2:-8}"
source scripts/gpu/unpack-lg.sh
BIN=$BIN SERVER_CPUS=2-9 SERVER_THREADS=8 OUT="$OUT/loadgen-bench-16core" \
  RATES="800 20000 60000 100000 140000 180000 220000 260000 300000" bash scripts/bench-loadgen.sh "$SECS"
