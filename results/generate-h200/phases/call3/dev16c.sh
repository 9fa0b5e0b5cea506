# Issue 15, twelfth session, call 3: why call 2's build failed (short diagnostics, output kept),
# a pool A/B if it runs, then the re-tune of profiles/h200-llm.toml with the build of call 1.
set -uo pipefail
OUT=${1:?out}
source scripts/gpu/common.sh
W=$OUT/w; mkdir -p $W
d() { local tag=$1; shift; env "$@" timeout 45 taskset -c 0 $B/runtime bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 \
  --temperature 1 "${ARGS[@]}" > $W/diag-$tag.txt 2>&1; echo "diag $tag rc $?"; tail -4 $W/diag-$tag.txt; }
ARGS=(--sizes 8 --steps 4 --context-tokens 20)
d new
d new-release BATCHTUNE_AB_RELEASE=1
if grep -q tokens_per_s $W/diag-new.txt; then
  ARGS=(--sizes 256 --steps 24 --context-tokens 110 --prefill-chunks 4 --prefill-tokens 46)
  d keep-440; d release-440 BATCHTUNE_AB_RELEASE=1; d keep-440b; d release-440b BATCHTUNE_AB_RELEASE=1
fi
cp $B/runtime-good $B/runtime
BASE=.gpu/p/continuous-512.toml SPACE=scripts/gpu/gen-space-h200-paged.toml TUNE_TIME=${TUNE_TIME:-5m} TUNE_LIMIT=${TUNE_LIMIT:-330} \
  bash scripts/gpu/generate-batched-h200.sh $W/t tune > $W/tune.txt 2>&1
tail -30 $W/tune.txt
tar czf $OUT/all.tgz -C $W . && rm -rf $W
