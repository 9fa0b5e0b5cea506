#!/usr/bin/env bash
# Generation on one GPU after batched decode attention (run on the lent H200 through the device
# tool; binaries in .gpu/bin as scripts/gpu/common.sh expects). Phases, in one call or several:
#   raw     the engine's raw batched-decode ceiling (runtime bench, bf16, both synthetic shapes)
#           and HF transformers `generate` with whole-request batches on the Qwen2.5 shape
#   mixed   the raw decode step with and without fresh prompts prefilled in it (MIXED_PREFILLS)
#   sample  the raw decode step greedy (temperature 0) and sampled on the device (temperature 1)
#   served  loadgen closed loops against the runtime at one batch cap (served ÷ raw); with
#           RUNTIMES="name:binary …" each binary in turn (an A/B of two builds in one call)
#   kernels every kernel of raw decode steps timed by Nsight Compute (ncu, clocks not locked,
#           only the timed steps recorded), with and without prompts prefilled in the step:
#           GPU-busy time against the step's wall time (scripts/gpu/ncu-steps.py reads the CSVs)
#   servedkernels  the same for served steps: the server under ncu, its profiler window around
#           engine steps KERNEL_FIRST.. (runtime serve --cuda-profile-steps) under a closed loop
#   tune    tuner search for a completions workload (SPACE: the search space file)
#   compare tuner compare: the tuned profile, continuous vs static at the same cap, and the
#           seed presets (GPU-ised)
# Usage (device): bash scripts/gpu/generate-batched-h200.sh OUT raw,served,tune
set -uo pipefail
OUT="${1:?output folder}"
PHASES="${2:-raw}"
source scripts/gpu/common.sh
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
has() { [[ ",$PHASES," == *",$1,"* ]]; }
if has raw; then
  for m in ${RAW_MODELS:-synthetic:smollm2-135m synthetic:qwen2.5-0.5b}; do
    n=${m#synthetic:}
    timeout 150 $B/runtime bench --model $m --device cuda:0 --dtype bf16 --sizes 1,8,32,64,128,256 \
      --steps 16 --context-tokens 110 > "$OUT/raw-$n.jsonl" 2>> "$OUT/log.txt"
    echo "== raw $n"; cat "$OUT/raw-$n.jsonl"
  done
  [ -n "${NO_HF:-}" ] || { echo "== HF transformers generate, whole-request batches"
  timeout 240 python3 scripts/gpu/hf_generate.py --sizes 1,8,32,64,128,256 --prompt-tokens 46 \
    --new-tokens 64 > "$OUT/hf.jsonl" 2>> "$OUT/log.txt"
  cat "$OUT/hf.jsonl"; }
fi
if has mixed; then
  # A served step also prefills newcomers: the raw cost of decode steps that carry P fresh
  # prompts of 46 tokens (a closed loop of 256 clients with 64-token outputs brings ~4 a step).
  for p in ${MIXED_PREFILLS:-0 4}; do
    timeout 120 $B/runtime bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 --sizes 64,256 \
      --steps 32 --context-tokens 110 --prefill-chunks $p > "$OUT/mixed-p$p.jsonl" 2>> "$OUT/log.txt"
    echo "== raw qwen2.5-0.5b, $p prompts prefilled per step"; cat "$OUT/mixed-p$p.jsonl"
  done
fi
if has sample; then
  for t in 0 1; do
    timeout 120 $B/runtime bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 --sizes 1,64,256 \
      --steps 32 --context-tokens 110 --temperature $t > "$OUT/sample-t$t.jsonl" 2>> "$OUT/log.txt"
    echo "== raw qwen2.5-0.5b, temperature $t"; cat "$OUT/sample-t$t.jsonl"
  done
fi
if has kernels; then
  # ncu records only the bench's timed decode steps (the bench opens the profiler window around
  # them): the contexts' prefill, ~850 serialized kernels per sequence under ncu, outlasted a
  # 200 s run when everything was recorded. KERNEL_STEPS steps, then the same run unprofiled.
  s=${KERNEL_STEPS:-3}
  for p in ${MIXED_PREFILLS:-0 4}; do
    timeout ${KERNEL_LIMIT:-200} ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --print-units base \
      $B/runtime bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 --sizes 256 \
      --steps $s --context-tokens 110 --prefill-chunks $p > "$OUT/ncu-p$p-s$s.csv" 2>> "$OUT/log.txt"
    echo "== ncu p$p: $(grep -c gpu__time_duration "$OUT/ncu-p$p-s$s.csv") kernels in $s steps"
    timeout 120 $B/runtime bench --model synthetic:qwen2.5-0.5b --device cuda:0 --dtype bf16 --sizes 256 \
      --steps 32 --context-tokens 110 --prefill-chunks $p > "$OUT/wall-p$p.jsonl" 2>> "$OUT/log.txt"
    cat "$OUT/wall-p$p.jsonl"
  done
  python3 scripts/gpu/ncu-steps.py "$OUT"
fi
# A generation profile for this GPU from any profile: the Qwen2.5-0.5B shape in bf16 on cuda:0,
# rate limit off, the KV budget raised to what the GPU holds for the cap.
gen_profile() { # src dst
  sed -n '/^\[provenance\]/q;p' "$1" | grep -v -E '^(model|devices|dtype|rate_limit|kv_cache_tokens|request_timeout|queue_timeout) *=' > "$2"
  printf 'model = "synthetic:qwen2.5-0.5b"\ndevices = ["cuda:0"]\ndtype = "bf16"\nrate_limit = 0.0\nkv_cache_tokens = 262144\nrequest_timeout = "120s"\nqueue_timeout = "120s"\n' >> "$2"
}
# Output lengths of the open-loop phases (hf, tune, compare); OUTPUT=lognormal:32:1:128 gives a
# long-tailed mix capped at the seeds' MAX_NEW_TOKENS.
WORK="--output-tokens ${OUTPUT:-uniform:16:128}"
mkdir -p "$OUT/p"
if has served; then
  gen_profile profiles/llm-default.toml "$OUT/p/served.toml"
  sed -i 's/^max_batch_size = .*/max_batch_size = 256/' "$OUT/p/served.toml"
  for rt in ${RUNTIMES:-new:$B/runtime}; do
    name=${rt%%:*}; bin=${rt#*:}
    # SERVER_CPUS / LOADGEN_CPUS (taskset lists) keep the server's threads and the generator's
    # apart: a launch-bound step is host work, and 256 streams' clients compete for the same cores.
    ${SERVER_CPUS:+taskset -c $SERVER_CPUS} $bin serve --profile "$OUT/p/served.toml" --addr 127.0.0.1:9400 > "$OUT/server-$name.log" 2>&1 &
    srv=$!
    if wait_up http://127.0.0.1:9400 $srv; then
      # SERVED_TEMPS: "default" sends no temperature (1, the OpenAI default: sampled on the
      # device); 0 is greedy, as the raw bench runs.
      for temp in ${SERVED_TEMPS:-default}; do
        for c in ${SERVED_CLIENTS:-64 256}; do
          t=""; [ "$temp" = default ] || t="--temperature $temp"
          tag=$name-$c; [ "$temp" = default ] || tag=$tag-t$temp
          timeout 60 ${LOADGEN_CPUS:+taskset -c $LOADGEN_CPUS} $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos $t \
            --concurrency $c --duration 20s --warmup 5s --timeout 60s --quiet --json "$OUT/served-$tag.json" \
            > "$OUT/served-$tag.txt" 2>&1
          echo "== served qwen2.5-0.5b, runtime $name, $c clients, temperature $temp"; cat "$OUT/served-$tag.txt"
          python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics').read().decode())" \
            | grep -E '^batchtune_(engine_steps|step_sequences_(sum|count)|output_tokens|prefill_tokens|step_phase_seconds_(sum|count))' \
            > "$OUT/served-$tag-metrics.txt"
        done
      done
    fi
    kill $srv 2>/dev/null; wait $srv 2>/dev/null
  done
fi
if has servedkernels; then
  # The kernels of served steps, for comparison with the bench's (`kernels`): the server runs under
  # ncu with its profiler window around engine steps KERNEL_FIRST.. (+KERNEL_STEPS), reached once a
  # closed loop of SERVED_CLIENTS (256) has filled the batch; then the server is stopped.
  s=${KERNEL_STEPS:-3}
  gen_profile profiles/llm-default.toml "$OUT/p/kernels.toml"
  sed -i 's/^max_batch_size = .*/max_batch_size = 256/' "$OUT/p/kernels.toml"
  timeout ${KERNEL_LIMIT:-300} ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --print-units base \
    --log-file "$OUT/ncu-pserved-s$s.csv" $B/runtime serve --profile "$OUT/p/kernels.toml" --addr 127.0.0.1:9400 \
    --cuda-profile-steps ${KERNEL_FIRST:-1500}:$s > "$OUT/server-kernels.log" 2>&1 &
  if wait_up http://127.0.0.1:9400 $!; then
    timeout $(( ${KERNEL_LIMIT:-300} - 20 )) $B/loadgen --url http://127.0.0.1:9400 --workload completions --output-tokens 64 --ignore-eos \
      --concurrency ${SERVED_CLIENTS:-256} --duration ${KERNEL_LOAD:-120s} --timeout 120s --quiet --json "$OUT/served-kernels.json" > /dev/null 2>&1 &
    lg=$!
    # The window has closed when the server logs it; then the load has done its job.
    for _ in $(seq 1 ${KERNEL_LIMIT:-300}); do grep -q "profiler window closed" "$OUT/server-kernels.log" && break; sleep 1; done
    kill $lg 2>/dev/null; wait $lg 2>/dev/null
  fi
  pkill -f -- "--profile $OUT/p/kernels.toml"; wait
  echo "== ncu, served steps"; python3 scripts/gpu/ncu-steps.py "$OUT"
fi
if has hf; then
  # HF transformers behind the seeds' llm_model design (scripts/gpu/hf_llm_server.py), swept by
  # hand (loadgen JSON reports, imported into the comparison afterwards): the seed 001
  # aggressive .env, and the best whole-request setting tried (one worker, batches of 64).
  mkdir -p "$OUT/hf"
  for cfg in "seed001-aggressive 8 8 0.1 ${HF_RATES_A:-0.25 0.5 1 2 4}" "batch64 1 64 0.1 ${HF_RATES_B:-2 4 8 16 24 32}"; do
    set -- $cfg; name=$1; w=$2; bs=$3; wait_s=$4; shift 4
    MAX_CONCURRENT_GENERATIONS=$w MAX_INFERENCE_BATCH_SIZE=$bs BATCH_WAIT_TIMEOUT=$wait_s MAX_INFERENCE_QUEUE_SIZE=4000 \
      python3 scripts/gpu/hf_llm_server.py --port 9500 > "$OUT/hf/server-$name.log" 2>&1 &
    hf=$!
    if wait_up http://127.0.0.1:9500 $hf; then
      sat=0
      for r in "$@"; do
        timeout 60 $B/loadgen --url http://127.0.0.1:9500 --workload completions $WORK --ignore-eos --no-stream \
          --rps $r --duration 12s --warmup 3s --timeout 60s --quiet --json "$OUT/hf/hf-$name-$r.json" > /dev/null 2>&1
        a=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(round(d['achieved_rps'],2), round(d['latency']['p95'],3))" "$OUT/hf/hf-$name-$r.json")
        echo "hf $name rate $r: achieved, p95 = $a"
        python3 -c "import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d['achieved_rps'] < 0.8*float(sys.argv[2]) or d['latency']['p95'] > 20 else 1)" "$OUT/hf/hf-$name-$r.json" $r && sat=$((sat+1)) || sat=0
        [ $sat -ge 2 ] && break
      done
    fi
    kill $hf 2>/dev/null; wait $hf 2>/dev/null
  done
fi
if has tune; then
  # BASE: the profile the search starts from (its knobs outside SPACE stay as they are).
  gen_profile ${BASE:-profiles/llm-default.toml} "$OUT/p/base.toml"
  # SIGINT: the tuner finishes its probe and leaves the journal consistent (resumable).
  timeout -s INT ${TUNE_LIMIT:-260} $B/tuner search --workload completions $WORK --target 'p95<4s' --space ${SPACE:-scripts/gpu/gen-space-h200.toml} \
    --spawn "$B/runtime serve --profile $OUT/p/base.toml" --time ${TUNE_TIME:-2m} --out "$OUT/h200-llm.toml" \
    --journal-dir "$OUT/searches" --quiet 2>&1 | tail -25
fi
if has compare; then
  gen_profile profiles/llm-aggressive.toml "$OUT/p/seed001-aggressive.toml"
  gen_profile profiles/llm-production.toml "$OUT/p/seed003-production.toml"
  gen_profile profiles/llm-default.toml "$OUT/p/continuous-64.toml"
  sed -i 's/^max_batch_size = .*/max_batch_size = 64/' "$OUT/p/continuous-64.toml"
  list=""
  for p in ${COMPARE_PROFILES:-seed001-aggressive continuous-64}; do list="$list${list:+,}$OUT/p/$p.toml"; done
  # The tuned profile as written (its KV budget and rate limit are part of what was tuned).
  TUNED=${TUNED:-$OUT/h200-llm.toml}; [ -f "$TUNED" ] && list="$list,$TUNED"
  timeout ${COMPARE_LIMIT:-330} $B/tuner compare --profiles "$list" --workload completions $WORK --target 'p95<4s' \
    --rates ${RATES:-8,16,32,48,64,96,128} --duration 10s --warmup 3s --name generate-h200-compare${COMPARE_SUFFIX:-} \
    --results-dir "$OUT" 2>&1 | tail -30
  cat "$OUT/generate-h200-compare${COMPARE_SUFFIX:-}/table.md"
fi
tail -5 "$OUT/log.txt" 2>/dev/null
tar czf /tmp/all.tgz -C "$OUT" . && mv /tmp/all.tgz "$OUT/all.tgz"
