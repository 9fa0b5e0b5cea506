#!/usr/bin/env bash
# Generation on one GPU (run on the lent H200 through the device tool; binaries in .gpu/bin as
# scripts/gpu/common.sh expects): the engine's raw batched-decode ceiling for the synthetic
# SmolLM2-135M and Qwen2.5-0.5B shapes in bf16, the served rate at one batch size (loadgen closed
# loop, 64 forced output tokens), and Hugging Face transformers' `generate` with whole-request
# batching on the same shapes (random weights), the seeds' llm_model design.
# Usage (device): bash scripts/gpu/generate-h200.sh OUT
set -uo pipefail
OUT="${1:?output folder}"
source scripts/gpu/common.sh
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for m in synthetic:smollm2-135m synthetic:qwen2.5-0.5b; do
  n=${m#synthetic:}
  timeout 120 $B/runtime bench --model $m --device cuda:0 --dtype bf16 --sizes 1,8,32,64,128 \
    --steps 16 --context-tokens 110 > "$OUT/raw-$n.jsonl" 2>> "$OUT/log.txt"
  echo "== raw $n"; cat "$OUT/raw-$n.jsonl"
done
cat > /tmp/gen.toml <<EOF
model = "synthetic:qwen2.5-0.5b"
devices = ["cuda:0"]
dtype = "bf16"
max_batch_size = 64
max_batch_tokens = 4096
max_input_tokens = 2048
kv_cache_tokens = 65536
max_queue_size = 10000
request_timeout = "300s"
EOF
$B/runtime serve --profile /tmp/gen.toml --addr 127.0.0.1:9400 > "$OUT/server.log" 2>&1 &
srv=$!
if wait_up http://127.0.0.1:9400; then
  timeout 130 $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
    --concurrency 64 --duration 40s --warmup 10s --timeout 120s --quiet --json "$OUT/served-qwen.json" \
    > "$OUT/served-qwen.txt" 2>&1
  echo "== served qwen2.5-0.5b, 64 clients"; cat "$OUT/served-qwen.txt"
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics').read().decode())" \
    | grep -E '^batchtune_(engine_steps|step_sequences_(sum|count)|output_tokens|prefill_tokens)' | tee "$OUT/served-metrics.txt"
fi
kill $srv 2>/dev/null; wait $srv 2>/dev/null
echo "== HF transformers generate, whole-request batches"
timeout 180 python3 scripts/gpu/hf_generate.py --sizes 1,8,32,64 --prompt-tokens 46 --new-tokens 64 \
  > "$OUT/hf.jsonl" 2>> "$OUT/log.txt"
cat "$OUT/hf.jsonl"
tail -5 "$OUT/log.txt"
