#!/usr/bin/env bash
# Reliability scenarios against the release runtime on this host (RELIABILITY.md records a run):
#   overload  5x the rate limit for DURATION: statuses, accepted p95, 429 latency, RSS over time
#   sigterm   SIGTERM with >= 1000 requests accepted and unanswered, at two drain timeouts:
#             every request gets a status (io errors = silent closes = 0), stop time
#   idle      IDLE idle connections held open: /health latency meanwhile, how many were refused
#             (503 past --max-connections), RSS
#   reload    live reloads every 200 ms (valid and invalid) under load: no request lost
#   wait      overflow = "wait" at 5x capacity, twice: statuses, RSS before, during, after each
#             round (a leak grows per round; an allocator's high-water mark does not)
#   faults    planted forward faults (panic, error, out of memory) under load: only the batches
#             holding them fail, the workers survive. Needs the test hooks: it builds
#             target/release/runtime with --features test-hooks into target/hooks/runtime.
# Usage: scripts/reliability.sh OUT [overload,sigterm,idle,reload,wait,faults]
#        (needs cargo build --release)
# Env: RATE (80, the rate limit: near this machine's tuned rate), DURATION (60s), IDLE (20000)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?output folder}"; phases="${2:-overload,sigterm,idle,reload,wait}"
rate="${RATE:-80}"; duration="${DURATION:-60s}"; idle="${IDLE:-20000}"
bin=target/release
mkdir -p "$out"
has() { [[ ",$phases," == *",$1,"* ]]; }
port=9610
srv=""
trap '[ -n "$srv" ] && kill $srv 2>/dev/null' EXIT
up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && return 0; sleep 0.1; done; return 1; }
serve() { # profile-file log [extra flags]
  "$bin/runtime" serve --profile "$1" --addr 127.0.0.1:$port "${@:3}" > "$2" 2>&1 &
  srv=$!; up
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null; }
stop() { kill "$srv" 2>/dev/null; wait "$srv" 2>/dev/null; srv=""; }

if has overload; then
  printf 'rate_limit = %s\nmax_queue_size = 1024\n' "$rate" > "$out/overload.toml"
  serve "$out/overload.toml" "$out/overload-server.log"
  echo "t_s rss_kb" > "$out/overload-rss.txt"
  ( t=0; while kill -0 "$srv" 2>/dev/null; do echo "$t $(rss "$srv")" >> "$out/overload-rss.txt"; sleep 5; t=$((t+5)); done ) &
  sampler=$!
  over=$(python3 -c "print(5*$rate)")
  "$bin/loadgen" --url "http://127.0.0.1:$port" --rps "$over" --duration "$duration" --warmup 2s \
    --timeout 30s --quiet --json "$out/overload.json" > "$out/overload.txt" 2>&1
  # 429 latency: 50 sequential requests while a second overload runs.
  "$bin/loadgen" --url "http://127.0.0.1:$port" --rps "$over" --duration 8s --warmup 0s --quiet > /dev/null 2>&1 &
  lg=$!; sleep 2
  for _ in $(seq 50); do
    curl -s -o /dev/null -w '%{http_code} %{time_total}\n' -X POST "http://127.0.0.1:$port/v1/embeddings" \
      -H 'content-type: application/json' -d '{"input":"a short text"}'
  done > "$out/overload-curl.txt"
  wait $lg; kill $sampler 2>/dev/null
  echo "rss after: $(rss "$srv") kB" >> "$out/overload-rss.txt"
  stop
  echo "== overload ($over req/s against rate_limit $rate)"; grep -E "achieved|ok |latency \(intended\)" "$out/overload.txt"
  awk '$1==429 {n++; s+=$2; if ($2>m) m=$2} END {printf "429s: %d, mean %.2f ms, max %.2f ms\n", n, 1000*s/n, 1000*m}' "$out/overload-curl.txt"
  echo "RSS kB over time:"; tr '\n' ' ' < "$out/overload-rss.txt"; echo
fi

if has sigterm; then
  for drain in ${DRAINS:-3s 10s}; do
    printf 'max_queue_size = 4096\nmax_batch_size = 32\ndrain_timeout = "%s"\nrequest_timeout = "60s"\n' "$drain" > "$out/sigterm-$drain.toml"
    serve "$out/sigterm-$drain.toml" "$out/sigterm-$drain-server.log"
    "$bin/loadgen" --url "http://127.0.0.1:$port" --rps 1500 --duration 20s --warmup 0s --timeout 60s \
      --quiet --json "$out/sigterm-$drain.json" > "$out/sigterm-$drain.txt" 2>&1 &
    lg=$!
    sleep 3
    queued=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^batchtune_queue_depth_inputs / {print $2}')
    t0=$(date +%s.%N); kill -TERM "$srv"; wait "$srv" 2>/dev/null; t1=$(date +%s.%N); srv=""
    wait $lg
    echo "== SIGTERM, drain_timeout $drain: $queued requests queued at the signal; stopped after $(python3 -c "print(round($t1-$t0,2))") s"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('  ok', d['ok'], 'errors', d['errors'])" "$out/sigterm-$drain.json"
    grep -E "drained|drain_timeout" "$out/sigterm-$drain-server.log" | sed 's/\x1b\[[0-9;]*m//g' | tail -2
  done
fi

if has idle; then
  printf '\n' > "$out/idle.toml"
  # A header timeout longer than opening them all takes, so none is closed as idle meanwhile.
  serve "$out/idle.toml" "$out/idle-server.log" --header-read-timeout 600s
  # Each client process opens at most 10,000 (one process's open-file limit is this host's
  # 20,000 at most); they hold them while the last one measures /health.
  holders=$(( (idle + 9999) / 10000 ))
  cat > "$out/idle-hold.py" <<'PY'
import socket, sys, time
port, n, report, hold = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
socks, failed = [], 0
t0 = time.time()
for i in range(n):
    try:
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    except OSError:
        failed += 1
opened_s = time.time() - t0
time.sleep(1.0)
refused = closed = 0
for s in socks:
    s.setblocking(False)
    try:
        data = s.recv(64)
        if data.startswith(b"HTTP/1.1 503"):
            refused += 1
        elif data == b"":
            closed += 1
    except BlockingIOError:
        pass
open(report, "w").write(f"{len(socks)} {failed} {refused} {closed} {opened_s:.1f}\n")
time.sleep(hold)
PY
  pids=()
  for h in $(seq $holders); do
    per=$(( idle / holders ))
    python3 "$out/idle-hold.py" "$port" "$per" "$out/idle-hold-$h.txt" 20 &
    pids+=($!)
  done
  # Wait until every holder has reported, then measure /health while they still hold.
  for _ in $(seq 600); do [ "$(ls "$out"/idle-hold-*.txt 2>/dev/null | wc -l)" -ge "$holders" ] && break; sleep 0.5; done
  python3 - "$port" "$idle" "$out" > "$out/idle.txt" 2>&1 <<'PY'
import glob, sys, time, urllib.request, urllib.error
port, n, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
tot = [0, 0, 0, 0]
for f in glob.glob(f"{out}/idle-hold-*.txt"):
    for i, v in enumerate(open(f).read().split()[:4]):
        tot[i] += int(v)
opened, failed, refused, closed = tot
def health():
    t = time.time()
    try:
        code = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).status
    except urllib.error.HTTPError as e:
        code = e.code
    except Exception as e:
        code = type(e).__name__
    return code, time.time() - t
lat, codes = [], {}
for _ in range(20):
    code, dt = health()
    lat.append(dt)
    codes[code] = codes.get(code, 0) + 1
lat.sort()
print(f"opened {opened} of {n} from {len(glob.glob(out + '/idle-hold-*.txt'))} client processes (connect failures {failed}); answered 503: {refused}; closed without a byte: {closed}; held open: {opened - refused - closed}")
print(f"/health while they are open: {codes}, p50 {1000*lat[10]:.1f} ms, max {1000*lat[-1]:.1f} ms")
PY
  held_rss=$(rss "$srv")
  wait "${pids[@]}"
  codes=$(for _ in 1 2 3 4 5; do curl -s -o /dev/null -w '%{http_code} ' "http://127.0.0.1:$port/health"; done)
  echo "/health after the clients closed them: $codes" >> "$out/idle.txt"
  rm -f "$out"/idle-hold-*.txt "$out/idle-hold.py"
  echo "== $idle idle connections"; cat "$out/idle.txt"; echo "server RSS while held: $held_rss kB"
  sed 's/\x1b\[[0-9;]*m//g' "$out/idle-server.log" | grep -i "connection limit" | head -1
  stop
fi

if has reload; then
  printf '\n' > "$out/reload.toml"
  serve "$out/reload.toml" "$out/reload-server.log"
  "$bin/loadgen" --url "http://127.0.0.1:$port" --rps "$(python3 -c "print(0.6*$rate)")" --duration 30s \
    --warmup 1s --quiet --json "$out/reload.json" > "$out/reload.txt" 2>&1 &
  lg=$!
  codes=""
  for i in $(seq 120); do
    case $((i % 3)) in
      0) body='{"max_batch_size": 8, "batch_wait_timeout": "2ms"}' ;;
      1) body='{"max_batch_size": 32, "batch_wait_timeout": "10ms", "max_queue_size": 512}' ;;
      2) body='{"max_batch_size": -1}' ;;
    esac
    codes="$codes $(curl -s -o /dev/null -w '%{http_code}' -X PUT "http://127.0.0.1:$port/config" -d "$body")"
    sleep 0.2
  done
  wait $lg
  stop
  echo "== live reloads under load: PUT /config statuses: $(echo $codes | tr ' ' '\n' | sort | uniq -c | tr '\n' ' ')"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('  requests ok', d['ok'], 'errors', d['errors'], 'p95', round(d['latency']['p95']*1000,1), 'ms')" "$out/reload.json"
fi

if has wait; then
  printf 'overflow = "wait"\nmax_queue_size = 256\nqueue_timeout = "30s"\nrequest_timeout = "10s"\n' > "$out/wait.toml"
  serve "$out/wait.toml" "$out/wait-server.log"
  echo "== overflow = wait at 5x, two rounds of 30 s"
  for round in 1 2; do
    before=$(rss "$srv")
    "$bin/loadgen" --url "http://127.0.0.1:$port" --rps "$(python3 -c "print(5*$rate)")" --duration 30s \
      --warmup 0s --timeout 60s --quiet --json "$out/wait-$round.json" > "$out/wait-$round.txt" 2>&1 &
    lg=$!
    sleep 25; during=$(rss "$srv")
    wait $lg; sleep 5; after=$(rss "$srv")
    echo "  round $round: RSS before $before kB, at 25 s $during kB, 5 s after $after kB"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('    ok', d['ok'], 'errors', d['errors'])" "$out/wait-$round.json"
  done
  stop
fi

if has faults; then
  cargo build --release -q -p runtime --features test-hooks && mkdir -p target/hooks \
    && cp target/release/runtime target/hooks/runtime && cargo build --release -q -p runtime || exit 1
  printf 'max_batch_size = 8\nbatch_wait_timeout = "5ms"\n' > "$out/faults.toml"
  bin=target/hooks serve "$out/faults.toml" "$out/faults-server.log" \
    --test-fault boom=panic --test-fault fail=error --test-fault oom=oom
  "$bin/loadgen" --url "http://127.0.0.1:$port" --rps "$(python3 -c "print(0.5*$rate)")" --duration 20s \
    --warmup 0s --quiet --json "$out/faults.json" > "$out/faults.txt" 2>&1 &
  lg=$!
  sleep 2
  for i in $(seq 30); do
    w=$(echo boom fail oom | cut -d' ' -f$((i % 3 + 1)))
    curl -s -o /dev/null -w "$w %{http_code}\n" -X POST "http://127.0.0.1:$port/v1/embeddings" \
      -H 'content-type: application/json' -d "{\"input\":\"a text with $w in it\"}"
    sleep 0.5
  done > "$out/faults-curl.txt"
  wait $lg
  after=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$port/v1/embeddings" \
    -H 'content-type: application/json' -d '{"input":"after the faults"}')
  stop
  echo "== planted faults under $(python3 -c "print(0.5*$rate)") req/s: planted requests' statuses: $(cut -d' ' -f2 "$out/faults-curl.txt" | sort | uniq -c | tr '\n' ' ')"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('  load requests ok', d['ok'], 'errors', d['errors'])" "$out/faults.json"
  echo "  a request after the faults: $after"
fi
