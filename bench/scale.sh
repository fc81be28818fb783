#!/usr/bin/env bash
# The coordinator under many connected clients (issue 13, part 3). fl-loadgen opens N enrolled
# mTLS connections from one process against a real `fl-coordinator serve` (the fastText model,
# evaluation on generated data) and answers its rounds with synthetic sparse deltas, with
# log-normal training times and drop-outs mid-round; it watches the coordinator's /proc meanwhile.
# For each N it measures:
#   idle:   N clients joined, no round (--min-clients above N), held HOLD_SECS seconds: RSS and
#           CPU seconds per second of holding the connections;
#   rounds: ROUNDS rounds of PER_ROUND sampled (--clients-per-round, over-sampled 1.1): peak RSS
#           (VmHWM), CPU seconds per round, round time and overhead from metrics.jsonl, and the
#           time from an upload's start to its acknowledgement (spooled, checked and folded).
# The federation is created, and the largest N enrolled, once: identities and the pristine
# state dir stay in BENCH_DIR and every later run starts from a copy of them.
#
# Usage: bench/scale.sh [N ...]            (default: 10 100 1000)
# Environment: BENCH_DIR (target/bench-scale), ROUNDS (3), PER_ROUND (100), TRAIN_SECS (5),
#   DROPOUT (0.05), HOLD_SECS (10), FL_BIN (target/release), COORDINATOR (the fl-coordinator
#   binary to measure; default $FL_BIN/fl-coordinator), NOFILE (a soft open-files limit to start
#   the coordinator with, e.g. 1024 as systemd gives; default: this shell's), SKIP_IDLE (1: no
#   idle runs), TAG (a name for this set of runs, default "current").
# Writes BENCH_DIR/TAG/{idle,rounds}-N.json (the loadgen reports) and BENCH_DIR/TAG/summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
FL_BIN=${FL_BIN:-target/release}
COORDINATOR=${COORDINATOR:-$FL_BIN/fl-coordinator}
BENCH=${BENCH_DIR:-target/bench-scale}
TAG=${TAG:-current}
ROUNDS=${ROUNDS:-3}
PER_ROUND=${PER_ROUND:-100}
TRAIN_SECS=${TRAIN_SECS:-5}
DROPOUT=${DROPOUT:-0.05}
HOLD_SECS=${HOLD_SECS:-10}
COUNTS=("$@")
[ ${#COUNTS[@]} -gt 0 ] || COUNTS=(10 100 1000)
MAX=$(printf '%s\n' "${COUNTS[@]}" | sort -n | tail -1)
for bin in "$COORDINATOR" "$FL_BIN/fl-loadgen" "$FL_BIN/fl-client"; do
  [ -x "$bin" ] || { echo "$bin is missing: run make build" >&2; exit 1; }
done
OUT=$BENCH/$TAG
mkdir -p "$BENCH" "$OUT"

PIDS=()
stop_all() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap stop_all EXIT

# start STATE LOG ARGS...: starts the coordinator on port 0; sets COORD (pid) and URL.
start() {
  local state="$1" log="$2"
  shift 2
  rm -f "$state/listen-addr"
  (
    [ -z "${NOFILE:-}" ] || ulimit -Sn "$NOFILE"
    exec "$COORDINATOR" serve --listen 127.0.0.1:0 --state-dir "$state" "$@"
  ) >"$log" 2>&1 &
  COORD=$!
  PIDS+=("$COORD")
  local _
  for _ in $(seq 1 1200); do
    [ -f "$state/listen-addr" ] && break
    kill -0 "$COORD" 2>/dev/null || { echo "the coordinator exited:" >&2; tail -20 "$log" >&2; exit 1; }
    sleep 0.05
  done
  [ -f "$state/listen-addr" ] || { echo "the coordinator did not start; see $log" >&2; exit 1; }
  URL="https://localhost:$(cut -d: -f2 "$state/listen-addr")"
}

# stop_coordinator: SIGTERM, then wait for it to save and exit.
stop_coordinator() {
  kill -TERM "$COORD" 2>/dev/null || true
  wait "$COORD" 2>/dev/null || true
}

# The federation, created once: evaluation data, the pristine state dir, MAX enrolled identities.
DATA=$BENCH/data
[ -f "$DATA/eval.csv" ] || "$FL_BIN/fl-client" gen-data --out "$DATA" --rows 100 --eval-rows 1000 \
  --test-rows 100 --shards 1 --seed 11 >/dev/null
have=$( { find "$BENCH/identities" -maxdepth 1 -name 'client-*' 2>/dev/null || true; } | wc -l)
if [ ! -f "$BENCH/pristine/federation.json" ] || [ "$have" -lt "$MAX" ]; then
  if [ ! -f "$BENCH/pristine/federation.json" ]; then
    rm -rf "$BENCH/pristine" "$BENCH/identities"
  fi
  echo "== enrolling $MAX clients (once; reruns reuse $BENCH/identities)"
  # --min-clients above MAX: no round starts while the pristine federation is being made.
  start "$BENCH/pristine" "$OUT/enroll.log" --rounds "$ROUNDS" --min-clients 100000 \
    --eval-data "$DATA/eval.csv"
  "$FL_BIN/fl-loadgen" --coordinator "$URL" --token-file "$BENCH/pristine/join-token" \
    --identities "$BENCH/identities" --clients "$MAX" --hold-secs 1 \
    --coordinator-pid "$COORD" --coordinator-state "$BENCH/pristine" --report "$OUT/enroll.json" >/dev/null
  stop_coordinator
  rm -f "$BENCH/pristine/status.json" "$BENCH/pristine/metrics.jsonl"
fi
MODEL_BYTES=$(stat -c %s "$BENCH/pristine/model/initial.safetensors")

for n in "${COUNTS[@]}"; do
  if [ "${SKIP_IDLE:-0}" != 1 ]; then
    echo "== $n clients, idle for ${HOLD_SECS} s"
    state=$OUT/idle-$n
    rm -rf "$state"; cp -a "$BENCH/pristine" "$state"
    start "$state" "$state.log" --rounds "$ROUNDS" --min-clients 100000 --eval-data "$DATA/eval.csv"
    "$FL_BIN/fl-loadgen" --coordinator "$URL" --identities "$BENCH/identities" --clients "$n" \
      --hold-secs "$HOLD_SECS" --coordinator-pid "$COORD" --coordinator-state "$state" \
      --report "$OUT/idle-$n.json" >/dev/null
    stop_coordinator
  fi

  echo "== $n clients, $ROUNDS rounds of $PER_ROUND sampled"
  state=$OUT/rounds-$n
  rm -rf "$state"; cp -a "$BENCH/pristine" "$state"
  min=$(( n < PER_ROUND ? n : PER_ROUND ))
  start "$state" "$state.log" --rounds "$ROUNDS" --clients-per-round "$PER_ROUND" --over-sample 1.1 \
    --min-clients "$min" --round-timeout 120 --eval-data "$DATA/eval.csv"
  "$FL_BIN/fl-loadgen" --coordinator "$URL" --identities "$BENCH/identities" --clients "$n" \
    --train-secs "$TRAIN_SECS" --dropout "$DROPOUT" --coordinator-pid "$COORD" \
    --coordinator-state "$state" --report "$OUT/rounds-$n.json" >/dev/null || echo "(the load run reported errors: see $OUT/rounds-$n.json)"
  wait "$COORD" || { echo "the coordinator exited with $?; see $state.log" >&2; exit 1; }
done

python3 - "$OUT" "$MODEL_BYTES" "$TRAIN_SECS" "$DROPOUT" "$HOLD_SECS" "${COUNTS[@]}" <<'PY' | tee "$OUT/summary.md"
import json, os, statistics, sys
out, model_bytes, train, dropout, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
counts = [int(n) for n in sys.argv[6:]]
mib = lambda kib: kib / 1024
print(f"model file: {model_bytes / 2**20:.1f} MiB; training {train} s median, drop-out {dropout}\n")
print("| clients | idle RSS (MiB) | idle CPU (ms/s) | peak RSS (MiB) | CPU s per round | round s | overhead s | upload ack p50 / p95 / max (ms) | rounds: participants/sampled, close |")
print("|---:|---:|---:|---:|---|---|---|---|---|")
idle_rss = {}
for n in counts:
    idle = f"{out}/idle-{n}.json"
    irss = icpu = "-"
    if os.path.exists(idle):
        c = json.load(open(idle))["coordinator"]
        marks = {m["name"]: m for m in c["marks"]}
        j, h = marks["joined"], marks["held"]
        idle_rss[n] = j["rss_kib"]
        irss = f"{mib(h['rss_kib']):.0f}"
        icpu = f"{(h['cpu_s'] - j['cpu_s']) / max(h['at_s'] - j['at_s'], 1e-9) * 1000:.0f}"
    r = json.load(open(f"{out}/rounds-{n}.json"))
    c = r["coordinator"]
    rounds = c["rounds"]
    cpu = " / ".join(f"{x['cpu_s']:.1f}" for x in rounds)
    secs = " / ".join(f"{x['metrics']['round_s']:.1f}" for x in rounds)
    over = " / ".join(f"{x['metrics']['overhead_s']:.1f}" for x in rounds)
    acks = [x for x in r["rounds"] if x["accepted"]]
    ack = " ; ".join(f"{x['ack_ms_p50']:.0f}/{x['ack_ms_p95']:.0f}/{x['ack_ms_max']:.0f}" for x in acks)
    parts = " ; ".join(f"{x['metrics']['participants']}/{x['metrics']['sampled']}" for x in rounds)
    errors = sum(r["errors"].values())
    note = f" ({errors} load errors: {r['error_samples']})" if errors else ""
    print(f"| {n} | {irss} | {icpu} | {mib(c['peak_rss_kib']):.0f} | {cpu} | {secs} | {over} | {ack} | {parts}{note} |")
if len(idle_rss) >= 2:
    lo, hi = min(idle_rss), max(idle_rss)
    per = (idle_rss[hi] - idle_rss[lo]) / (hi - lo)
    print(f"\nmemory per connected client (idle, {lo} to {hi} clients): {per:.0f} KiB")
enroll = f"{out}/enroll.json"
if os.path.exists(enroll):
    e = json.load(open(enroll))
    marks = {m["name"]: m for m in e["coordinator"]["marks"]}
    cpu = lambda a, b: marks[b]["cpu_s"] - marks[a]["cpu_s"]
    print(f"\nenrolled {e['enrolled']} clients in {e['enroll_s']:.1f} s (coordinator CPU {cpu('start', 'enrolled'):.1f} s); "
          f"connected in {e['connect_s']:.1f} s (CPU {cpu('enrolled', 'connected'):.1f} s), joined in {e['join_s']:.1f} s "
          f"(CPU {cpu('connected', 'joined'):.1f} s); registry.json {os.path.getsize(os.path.join(os.path.dirname(out), 'pristine', 'registry.json')) / 1024:.0f} KiB")
PY
