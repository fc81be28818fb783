#!/usr/bin/env bash
# Personalised against global accuracy, per client, on Dirichlet-skewed shards.
# Every client runs `fl-client run --personalize METHOD`, holds out 20 % of its shard, and after
# each round writes the accuracy of the round's global model and of its personal model on that
# split to STATE/personal/accuracy.json. This script prints the mean and the 10th percentile over
# the clients after the last round.
# Usage: bench/personalize.sh METHOD ALPHA [CLIENTS] [ROUNDS]
# Environment: ROWS (7000), LAMBDA (ditto's, 10), LR (0.01), EPOCHS (1), BENCH_DIR (target/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:?METHOD: finetune, fedper or ditto}
ALPHA=${2:?ALPHA: the Dirichlet concentration}
CLIENTS=${3:-5}
ROUNDS=${4:-10}
BIN=target/release
DIR=${BENCH_DIR:-target/bench}/personalize-$METHOD-a$ALPHA-c$CLIENTS-r$ROUNDS
[ -x $BIN/fl-coordinator ] || { echo "run make build first" >&2; exit 1; }
rm -rf "$DIR"; mkdir -p "$DIR/logs"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

$BIN/fl-client gen-data --out "$DIR/data" --rows "${ROWS:-7000}" --shards "$CLIENTS" \
  --partition dirichlet --alpha "$ALPHA" --seed 11 >/dev/null
$BIN/fl-coordinator serve --listen 127.0.0.1:0 --state-dir "$DIR/coord" --rounds "$ROUNDS" \
  --min-clients "$CLIENTS" --eval-data "$DIR/data/test.csv" --lr "${LR:-0.01}" --batch-size 32 \
  --local-epochs "${EPOCHS:-1}" --optimizer adam --round-timeout 600 >"$DIR/logs/coordinator.log" 2>&1 &
coord=$!
pids+=("$coord")
while [ ! -f "$DIR/coord/listen-addr" ]; do sleep 0.05; kill -0 $coord || { cat "$DIR/logs/coordinator.log"; exit 1; }; done
URL="https://localhost:$(cut -d: -f2 "$DIR/coord/listen-addr")"
TOKEN=$(cat "$DIR/coord/join-token")
for i in $(seq 1 "$CLIENTS"); do
  $BIN/fl-client enroll --coordinator "$URL" --token "$TOKEN" --state-dir "$DIR/client-$i" --name "c$i" >/dev/null
  $BIN/fl-client run --coordinator "$URL" --state-dir "$DIR/client-$i" --data "$DIR/data/shard-$i.csv" \
    --threads 1 --personalize "$METHOD" --ditto-lambda "${LAMBDA:-10}" --local-test-fraction 0.2 \
    >"$DIR/logs/client-$i.log" 2>&1 &
  pids+=("$!")
done
wait $coord
for p in "${pids[@]:1}"; do wait "$p" || true; done

python3 - "$DIR" "$CLIENTS" "$METHOD" "$ALPHA" <<'PY'
import json, sys
d, clients, method, alpha = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rows = [json.load(open(f"{d}/client-{i}/personal/accuracy.json")) for i in range(1, clients + 1)]
def p10(v):
    v = sorted(v); k = 0.1 * (len(v) - 1); lo = int(k); hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)
g = [r["global_accuracy"] for r in rows]; p = [r["personal_accuracy"] for r in rows]
final = json.loads(open(f"{d}/coord/metrics.jsonl").read().splitlines()[-1])
print(f"method {rows[0]['method']}, alpha {alpha}, {clients} clients, last round {max(r['round'] for r in rows)}")
for i, r in enumerate(rows, 1):
    print(f"  client {i}: {r['train_rows']} train / {r['test_rows']} test rows, global {r['global_accuracy']:.4f}, personal {r['personal_accuracy']:.4f}")
print(f"mean per-client accuracy: global {sum(g)/len(g):.4f}, personal {sum(p)/len(p):.4f}, difference {100*(sum(p)-sum(g))/len(g):+.1f} points")
print(f"10th percentile: global {p10(g):.4f}, personal {p10(p):.4f}")
print(f"final global model on the coordinator's balanced test set: {final['accuracy']:.4f}")
PY
