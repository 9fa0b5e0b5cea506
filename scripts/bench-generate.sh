#!/usr/bin/env bash
# Generation benchmark on this machine's CPU (issue: LLM generation runtime), three parts:
#  1. raw: the engine's own ceiling, `runtime bench` batched decode steps (no HTTP, no scheduler),
#     output tokens/s by batch size, every sequence holding CONTEXT tokens;
#  2. served: the same model behind the HTTP server at max_batch_size = BEST, driven by loadgen's
#     closed loop (BEST clients, fixed prompt, MAX_TOKENS output tokens forced with ignore_eos):
#     served output tokens/s ÷ the raw ceiling at BEST;
#  3. continuous vs static: a mixed-length workload (output 8..128 tokens, uniform) sent open
#     loop (Poisson) at a ladder of rates, once with scheduling = continuous (max_batch_size
#     RUNNING) and once static (groups of RUNNING/4, 4 at once: the same concurrency cap); the
#     highest rate at which each keeps p95 end-to-end latency under P95_S.
# Usage: scripts/bench-generate.sh MODEL OUT_DIR   (MODEL: synthetic:smollm2-135m or a .gguf)
# Env: BEST (32) MAX_TOKENS (64) RUNNING (32) P95_S (30) RATES ("0.5 1 1.5 2 3") SECS (90)
# Needs: cargo build --release --workspace (runtime + loadgen in target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:?model spec}"; out="${2:?output folder}"
best="${BEST:-32}"; max_tokens="${MAX_TOKENS:-64}"; running="${RUNNING:-32}"
p95_s="${P95_S:-30}"; rates="${RATES:-0.5 1 1.5 2 3}"; secs="${SECS:-90}"
bin=target/release
mkdir -p "$out"
port=9310
srv=""
trap '[ -n "$srv" ] && kill $srv 2>/dev/null || true' EXIT

serve() { # profile file
  "$bin/runtime" serve --profile "$1" --addr 127.0.0.1:$port > "$out/server.log" 2>&1 &
  srv=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server did not start; see $out/server.log" >&2; exit 1
}
unserve() { kill "$srv"; wait "$srv" 2>/dev/null || true; srv=""; }

# Prompts of about 32 tokens; output lengths fixed (served) or mixed (ladder).
python3 - "$out" "$max_tokens" <<'PY'
import json, random, sys
out, n = sys.argv[1], int(sys.argv[2])
words = "the model serves requests with continuous batching under load on two cores today".split()
rng = random.Random(7)
def prompt():
    return " ".join(rng.choice(words) for _ in range(24))
with open(f"{out}/fixed.jsonl", "w") as f:
    for _ in range(256):
        f.write(json.dumps({"prompt": prompt(), "max_tokens": n, "ignore_eos": True, "temperature": 0}) + "\n")
with open(f"{out}/mixed.jsonl", "w") as f:
    for _ in range(1024):
        f.write(json.dumps({"prompt": prompt(), "max_tokens": rng.randint(8, 128), "ignore_eos": True}) + "\n")
PY

# Average context of a served sequence: the prompt plus half its output.
prompt_tokens=$(head -1 "$out/fixed.jsonl" | python3 -c "import json,sys;print(len(json.load(sys.stdin)['prompt'].split())+6)")
context=$((prompt_tokens + max_tokens / 2))
echo "== raw decode (context $context tokens)"
"$bin/runtime" bench --model "$model" --sizes 1,2,4,8,16,32,64 --steps 12 --context-tokens $context \
  > "$out/raw.jsonl" 2>> "$out/bench.log"
cat "$out/raw.jsonl"

profile() { # file, scheduling, max_batch_size, max_concurrent_batches
  cat > "$1" <<EOF
model = "$model"
scheduling = "$2"
max_batch_size = $3
max_concurrent_batches = $4
max_batch_tokens = 2048
max_input_tokens = 2048
max_new_tokens = 256
kv_cache_tokens = 65536
batch_wait_timeout = "5ms"
max_queue_size = 100000
request_timeout = "600s"
EOF
}

echo "== served, closed loop of $best clients, $max_tokens output tokens each"
profile "$out/served.toml" continuous "$best" 1
serve "$out/served.toml"
"$bin/loadgen" --url "http://127.0.0.1:$port/v1/completions" --workload "$out/fixed.jsonl" \
  --concurrency "$best" --duration 60s --warmup 20s --timeout 600s --quiet --json "$out/served.json" \
  > "$out/served.txt" 2>&1 || true
curl -s "http://127.0.0.1:$port/metrics" > "$out/served-metrics.txt"
unserve

for mode in continuous static; do
  if [ $mode = continuous ]; then profile "$out/$mode.toml" continuous "$running" 1
  else profile "$out/$mode.toml" static $((running / 4)) 4; fi
  for rate in $rates; do
    echo "== $mode at $rate req/s"
    serve "$out/$mode.toml"
    "$bin/loadgen" --url "http://127.0.0.1:$port/v1/completions" --workload "$out/mixed.jsonl" \
      --rps "$rate" --arrival poisson --duration ${secs}s --warmup 15s --timeout 600s --quiet \
      --json "$out/$mode-$rate.json" > "$out/$mode-$rate.txt" 2>&1 || true
    unserve
  done
done

python3 scripts/bench-generate-summary.py "$out" "$best" "$max_tokens" "$p95_s" "$rates"
