#!/usr/bin/env bash
# The dashboard screenshot in BENCHMARKS.md and README.md: a 20-round federation of 3 clients on the
# demo's data (make demo's settings), then `fl-coordinator dashboard` on its state dir and headless
# Chromium (scripts/chromium-env.sh) writing docs/dashboard.png.
#
#   bench/dashboard-screenshot.sh         environment: ROUNDS (20), OUT (docs/dashboard.png)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/federation-lib.sh
. scripts/federation-lib.sh
ROUNDS=${ROUNDS:-20}
OUT=${OUT:-docs/dashboard.png}
DIR=target/dashboard-run
rm -rf "$DIR"
mkdir -p "$DIR"
trap fed_stop EXIT
browser="$(scripts/chromium-env.sh)"
"$FL_BIN/fl-client" gen-data --out "$DIR/data" --shards 3 --seed 7 >/dev/null
fed_start_coordinator "$DIR/coordinator" "$DIR/coordinator.log" --rounds "$ROUNDS" --min-clients 3 \
  --round-timeout 120 --eval-data "$DIR/data/eval.csv" --http 127.0.0.1:0
fed_enroll "$DIR/client" 3
fed_run_clients "$DIR/client" "$DIR/data/shard" "$DIR" 3 --threads 1
wait "$FED_COORD"
"$FL_BIN/fl-coordinator" dashboard --state-dir "$DIR/coordinator" --http 127.0.0.1:0 >"$DIR/dashboard.log" 2>&1 &
FED_PIDS+=("$!")
for _ in $(seq 1 100); do [ -s "$DIR/coordinator/http-addr" ] && grep -q dashboard "$DIR/dashboard.log" && break; sleep 0.1; done
addr="$(cat "$DIR/coordinator/http-addr")"
sandbox=()
[ "$(id -u)" = 0 ] && sandbox=(--no-sandbox)
mkdir -p "$(dirname "$OUT")"
"$browser" --headless "${sandbox[@]}" --disable-gpu --hide-scrollbars --window-size=1400,1500 \
  --virtual-time-budget=10000 --screenshot="$OUT" "http://$addr/?live=0" 2>/dev/null
"$FL_BIN/fl-coordinator" status --state-dir "$DIR/coordinator"
echo "wrote $OUT"
