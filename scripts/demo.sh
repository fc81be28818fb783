#!/usr/bin/env bash
# A local federation on loopback over mutual TLS: a coordinator and 3 enrolled clients train the
# fastText classifier on generated data, then the final model predicts a sentence.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/federation-lib.sh
. scripts/federation-lib.sh
DEMO=${DEMO_DIR:-target/demo}
ROUNDS=${ROUNDS:-5}
CLIENTS=${CLIENTS:-3}
rm -rf "$DEMO"
mkdir -p "$DEMO/logs"
trap fed_stop EXIT

echo "== generating a labelled dataset (10 topics, $CLIENTS client shards)"
"$FL_BIN/fl-client" gen-data --out "$DEMO/data" --shards "$CLIENTS" --seed 7

echo "== starting the coordinator ($ROUNDS rounds, logs in $DEMO/logs/coordinator.log)"
fed_start_coordinator "$DEMO/coordinator" "$DEMO/logs/coordinator.log" \
  --rounds "$ROUNDS" --min-clients "$CLIENTS" --round-timeout 120 --eval-data "$DEMO/data/eval.csv"

echo "== enrolling $CLIENTS clients at $FED_URL (the token pins the coordinator's CA)"
fed_enroll "$DEMO/client" "$CLIENTS"
fed_run_clients "$DEMO/client" "$DEMO/data/shard" "$DEMO/logs" "$CLIENTS" --threads 1

echo "== training (accuracy of the global model on eval.csv after each round)"
shown=0
while :; do
  if [ -f "$DEMO/coordinator/metrics.jsonl" ]; then
    total=$(wc -l <"$DEMO/coordinator/metrics.jsonl")
    if [ "$total" -gt "$shown" ]; then
      tail -n +"$((shown + 1))" "$DEMO/coordinator/metrics.jsonl" | head -n "$((total - shown))" | format_rounds
      shown=$total
    fi
  fi
  kill -0 "$FED_COORD" 2>/dev/null || break
  sleep 0.5
done
wait "$FED_COORD" || { echo "coordinator failed:"; tail -20 "$DEMO/logs/coordinator.log"; exit 1; }

MODEL="$DEMO/coordinator/model/final.safetensors"
SENTENCE=$(sed -n 2p "$DEMO/data/test.csv" | cut -d, -f1)
echo "== predicting with $MODEL"
echo "text: $SENTENCE"
"$FL_BIN/fl-client" predict --model "$MODEL" --text "$SENTENCE"
echo "== held-out test set"
"$FL_BIN/fl-client" predict --model "$MODEL" --data "$DEMO/data/test.csv"
