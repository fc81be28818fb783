#!/usr/bin/env bash
# Async (FedBuff) against sync rounds with one slow client: the same federation twice, on the same
# data, with client 4 of 4 throttled to a quarter of the time (see `throttle`), and prints
# the wall time to a target accuracy, the final accuracy and the staleness of each run.
# Usage: bench/async.sh [TARGET_ACCURACY[,TARGET...]]
# Environment: ROWS (12000), SIGNAL (0.3, gen-data's difficulty), SYNC_ROUNDS (8), ASYNC_STEPS (11: about as many updates as the sync
#   rounds fold), BUFFER (3), MAX_STALENESS (4), RUN_MS (100), STOP_MS (300), EPOCHS (1), LR (0.005),
#   BENCH_DIR (target/bench).
# Times are from the start of the first round (after the clients enrolled and connected).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-0.7,0.73}
ROWS=${ROWS:-12000}
# shellcheck source=scripts/federation-lib.sh
. scripts/federation-lib.sh
DIR=${BENCH_DIR:-target/bench}/async
rm -rf "$DIR"; mkdir -p "$DIR"
trap fed_stop EXIT
"$FL_BIN/fl-client" gen-data --out "$DIR/data" --rows "$ROWS" --shards 4 --seed 11 --signal "${SIGNAL:-0.3}" >/dev/null

# The slow client runs RUN_MS out of every RUN_MS + STOP_MS milliseconds (SIGSTOP/SIGCONT), so
# it is slower by a fixed factor whatever else loads the machine.
throttle() {
  local pid="$1" run stop
  run=$(awk "BEGIN { print ${RUN_MS:-100} / 1000 }")
  stop=$(awk "BEGIN { print ${STOP_MS:-300} / 1000 }")
  while kill -0 "$pid" 2>/dev/null; do
    kill -STOP "$pid" 2>/dev/null || break
    sleep "$stop"
    kill -CONT "$pid" 2>/dev/null || break
    sleep "$run"
  done
}

run_one() {
  local mode="$1" out="$DIR/$1"
  shift
  mkdir -p "$out/logs"
  local start
  start=$(date +%s.%N)
  fed_start_coordinator "$out/coord" "$out/logs/coordinator.log" --min-clients 4 \
    --eval-data "$DIR/data/test.csv" --buckets 65536 --embed-dim 64 --lr "${LR:-0.005}" --batch-size 32 \
    --local-epochs "${EPOCHS:-1}" --round-timeout 600 --seed 3 "$@"
  local coord=$FED_COORD i
  fed_enroll "$out/client" 4
  for i in 1 2 3 4; do
    "$FL_BIN/fl-client" run --coordinator "$FED_URL" --state-dir "$out/client-$i" \
      --data "$DIR/data/shard-$i.csv" --threads 1 >"$out/logs/client-$i.log" 2>&1 &
    FED_PIDS+=("$!")
  done
  throttle "$!" &
  FED_PIDS+=("$!")
  wait "$coord"
  local end
  end=$(date +%s.%N)
  python3 - "$mode" "$out" "$TARGET" "$start" "$end" <<'PY'
import json, sys
mode, out, targets, start, end = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
m = [json.loads(l) for l in open(f"{out}/coord/metrics.jsonl")]
t0 = m[0]["elapsed_s"] - m[0]["round_s"]  # when the first round (step) opened
updates = sum(x["participants"] for x in m)
line = f"{mode:5}: {len(m)} rounds/steps, {updates} updates folded, launch to end {end - start:.1f} s, final accuracy {m[-1]['accuracy']:.3f}"
for target in (float(t) for t in targets.split(",")):
    first = next((x for x in m if x["accuracy"] >= target), None)
    line += f"; to {target}: " + (f"{first['elapsed_s'] - t0:.1f} s (round/step {first['round']})" if first else "not reached")
if "staleness_mean" in m[0]:
    n = len(m)
    line += f"; staleness mean {sum(x['staleness_mean'] for x in m)/n:.2f}, max {max(x['staleness_max'] for x in m)}, dropped {sum(x['dropped_stale'] for x in m)}"
print(line)
print("  accuracy: " + " ".join(f"{x['accuracy']:.3f}" for x in m))
print("  seconds:  " + " ".join(f"{x['elapsed_s'] - t0:.1f}" for x in m))
PY
}

run_one sync --rounds "${SYNC_ROUNDS:-8}"
run_one async --rounds "${ASYNC_STEPS:-11}" --mode async --buffer-size "${BUFFER:-3}" --max-staleness "${MAX_STALENESS:-4}"
