#!/usr/bin/env bash
# Issue 17 on the H200 host: can loadgen drive streamed generation at the rate one H200 serves?
# The one-GPU profile of issue 20 (results/generate-2xh200/p/one-gpu-776.toml) serves completions
# with max_tokens uniform over 16..128 (forced); loadgen sends RATE req/s (default 1,919, the
# probe that one pacer could not hold: send-lag p99 444 ms) with one pacer (`--threads 1`, the
# old default) and with the default (one pacer per 40,000 streamed events/s), alternated, ROUNDS
# times. Summary lines go to "$OUT/run.log".
# Usage (device): bash scripts/gpu/gen-pacers-h200.sh OUT
set -uo pipefail
OUT="${1:?output folder}"
source scripts/gpu/common.sh
L=$OUT/run.log; mkdir -p "$OUT/pacers"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; } >> $L
$B/runtime serve --profile results/generate-2xh200/p/one-gpu-776.toml --addr 127.0.0.1:8600 \
  > /dev/null 2> "$OUT/pacers/server.txt" & srv=$!
wait_up http://127.0.0.1:8600 $srv || { echo "server did not come up" >> $L; tail -5 "$OUT/pacers/server.txt" >> $L; exit 1; }
for r in $(seq 1 ${ROUNDS:-2}); do
  for t in 1 default; do
    th=(); [ $t = default ] || th=(--threads $t)
    $B/loadgen --url http://127.0.0.1:8600 --workload completions --output-tokens uniform:16:128 --ignore-eos \
      --rps ${RATE:-1919} --duration ${DUR:-12s} --warmup 3s "${th[@]}" --json "$OUT/pacers/r$r-$t.json" \
      > "$OUT/pacers/r$r-$t.txt" 2>&1
    python3 - "$OUT/pacers/r$r-$t.json" "$r" "$t" >> $L <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
ms = lambda s: f"{(s or {}).get('p99', float('nan'))*1e3:.2f}ms"
print(f"round {sys.argv[2]} threads={sys.argv[3]:7} pacers={d.get('pacers')} achieved={d['achieved_rps']:.1f} "
      f"send_lag_p99={ms(d['send_lag'])} p95={d['latency']['p95']*1e3:.0f}ms ttft_p95={d['ttft']['p95']*1e3:.1f}ms "
      f"tok/s={d.get('output_tokens_per_s') or 0:.0f} valid={d['valid']} {'; '.join(d['invalid_reasons'])[:160]}")
PY
  done
done
kill -INT $srv; wait $srv
