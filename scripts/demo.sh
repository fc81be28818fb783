#!/usr/bin/env bash
# A local federation on loopback over mutual TLS: a coordinator and 3 enrolled clients train the
# fastText classifier on generated data, then the final model predicts a sentence.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
DEMO=${DEMO_DIR:-target/demo}
ROUNDS=${ROUNDS:-5}
CLIENTS=${CLIENTS:-3}
rm -rf "$DEMO"
mkdir -p "$DEMO/logs"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

echo "== generating a labelled dataset (10 topics, $CLIENTS client shards)"
$BIN/fl-client gen-data --out "$DEMO/data" --shards "$CLIENTS" --seed 7

echo "== starting the coordinator ($ROUNDS rounds, logs in $DEMO/logs/coordinator.log)"
$BIN/fl-coordinator serve --listen 127.0.0.1:0 --state-dir "$DEMO/coordinator" \
  --rounds "$ROUNDS" --min-clients "$CLIENTS" --round-timeout 120 \
  --eval-data "$DEMO/data/eval.csv" >"$DEMO/logs/coordinator.log" 2>&1 &
coordinator=$!
pids+=("$coordinator")
for _ in $(seq 1 600); do
  [ -f "$DEMO/coordinator/join-token" ] && break
  kill -0 "$coordinator" 2>/dev/null || { cat "$DEMO/logs/coordinator.log"; exit 1; }
  sleep 0.1
done
URL="https://localhost:$(cut -d: -f2 "$DEMO/coordinator/listen-addr")"
TOKEN=$(cat "$DEMO/coordinator/join-token")

echo "== enrolling $CLIENTS clients at $URL (the token pins the coordinator's CA)"
for i in $(seq 1 "$CLIENTS"); do
  $BIN/fl-client enroll --coordinator "$URL" --token "$TOKEN" --state-dir "$DEMO/client-$i" --name "client-$i"
done
for i in $(seq 1 "$CLIENTS"); do
  $BIN/fl-client run --coordinator "$URL" --state-dir "$DEMO/client-$i" \
    --data "$DEMO/data/shard-$i.csv" --threads 1 >"$DEMO/logs/client-$i.log" 2>&1 &
  pids+=("$!")
done

echo "== training (accuracy of the global model on eval.csv after each round)"
shown=0
while :; do
  if [ -f "$DEMO/coordinator/metrics.jsonl" ]; then
    total=$(wc -l <"$DEMO/coordinator/metrics.jsonl")
    if [ "$total" -gt "$shown" ]; then
      tail -n +"$((shown + 1))" "$DEMO/coordinator/metrics.jsonl" | head -n "$((total - shown))" |
        sed -E 's/.*"round":([0-9]+).*"accuracy":([0-9.]+).*"participants":([0-9]+).*"round_s":([0-9.]+).*/\1 \2 \3 \4/' |
        while read -r r a p s; do printf 'round %s accuracy: %.4f  (%s clients, %.1f s)\n' "$r" "$a" "$p" "$s"; done
      shown=$total
    fi
  fi
  kill -0 "$coordinator" 2>/dev/null || break
  sleep 0.5
done
wait "$coordinator" || { echo "coordinator failed:"; tail -20 "$DEMO/logs/coordinator.log"; exit 1; }

MODEL="$DEMO/coordinator/model/final.safetensors"
SENTENCE=$(sed -n 2p "$DEMO/data/test.csv" | cut -d, -f1)
echo "== predicting with $MODEL"
echo "text: $SENTENCE"
$BIN/fl-client predict --model "$MODEL" --text "$SENTENCE"
echo "== held-out test set"
$BIN/fl-client predict --model "$MODEL" --data "$DEMO/data/test.csv"
