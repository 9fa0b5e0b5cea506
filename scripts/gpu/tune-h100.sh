#!/usr/bin/env bash
# First GPU call (run on the lent H100 through the device tool): raw batched forward of batchtune
# (real MiniLM f32/f16 and synthetic MiniLM f16) and sentence-transformers encode (fp32/fp16) on
# the same mixed-length texts (loadgen's default workload) at the same batch sizes; then
# `tuner search --target 'p95<50ms'` over tuner/spaces/gpu.toml and a served check of the winner.
# Everything lands in "$OUT/tune.tar.gz" (the device tool brings back only a few files), the
# tuned profile in "$OUT/h100-minilm.toml", and a summary printed last.
# Usage (on the device): bash scripts/gpu/tune-h100.sh "$OUT" [search time, default 4m]
set -uo pipefail
OUT="${1:?output folder}"; TIME=${2:-4m}
source scripts/gpu/common.sh
source <(sed -n '/^probe()/,/^stop()/p' scripts/gpu/bench-h100.sh)
W=/tmp/tune && rm -rf $W && mkdir -p $W
S=$W/summary.txt
SIZES=1,8,32,64,128,256,512
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; nproc; } | tee $W/gpu.txt
$B/loadgen --dump-texts $W/texts.txt 2>> $W/log.txt
$B/runtime bench --model $M --device cuda:0 --dtype f16 --sizes $SIZES --seconds 1.5 --texts $W/texts.txt \
  > $W/raw-real-f16.jsonl 2>> $W/log.txt
$B/runtime bench --model $M --device cuda:0 --dtype f32 --sizes $SIZES --seconds 1.5 --texts $W/texts.txt > $W/raw-real-f32.jsonl 2>> $W/log.txt
$B/runtime bench --model synthetic:minilm --device cuda:0 --dtype f16 --sizes $SIZES --seconds 1.5 --texts $W/texts.txt > $W/raw-synth-f16.jsonl 2>> $W/log.txt
for dt in fp32 fp16; do
  (cd scripts/gpu && python3 st_bench.py --model ../../$M --dtype $dt --sizes $SIZES --seconds 1.5 --texts-file $W/texts.txt) > $W/st-$dt.jsonl 2>> $W/log.txt
done
for f in raw-real-f16 raw-real-f32 raw-synth-f16 st-fp16 st-fp32; do
  python3 -c "
import json,sys
print('$f', ' '.join(f\"{r['batch_size']}:{r['inputs_per_s']:.0f}\" for r in map(json.loads, open('$W/$f.jsonl'))))" | tee -a $S
done
grep -h "overhead_tokens" $W/log.txt | head -3 | tee -a $S
gpu_profile profiles/default.toml $W/base.toml
$B/tuner search --target 'p95<50ms' --space tuner/spaces/gpu.toml --time "$TIME" --budget 16 \
  --probe 3s --probe-warmup 1s --spawn "$B/runtime serve --profile $W/base.toml" \
  --out $W/h100-minilm.toml --journal-dir $W/searches 2>&1 | grep -v -E '^\s*$' | tail -n 40 > $W/search.txt
tail -n 22 $W/search.txt >> $S
cp $W/h100-minilm.toml "$OUT/" 2>/dev/null
gpu_profile $W/h100-minilm.toml $W/tuned.toml
serve $W/tuned.toml 8200 && { closed batchtune-tuned http://127.0.0.1:8200 512; stop; }
tar -czf "$OUT/tune.tar.gz" -C /tmp tune
cat $S
