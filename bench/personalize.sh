#!/usr/bin/env bash
# Personalised against global accuracy, per client, on Dirichlet-skewed shards.
# Every client runs `fl-client run --personalize METHOD`, holds out 20 % of its shard, and in each
# round reports to the coordinator the accuracy of the round's global model (as received) and of
# its personal model on that split; the coordinator writes their mean and 10th percentile over the
# clients into metrics.jsonl, which this script reads (the last round's line).
# With finetune, each client also fine-tunes the final model for FINETUNE_EPOCHS after the
# federation; the coordinator has finished by then, so those figures come from the clients'
# STATE/personal/accuracy.json.
# Usage: bench/personalize.sh METHOD ALPHA [CLIENTS] [ROUNDS]
# Environment: ROWS (7000), LAMBDA (ditto's, 10), DITTO_MIN_STEPS (the client's default, 20),
# LR (0.01), EPOCHS (local epochs, 1), STRATEGY (fedavg; e.g. reptile), SERVER_LR (the strategy's
# default), FINETUNE_EPOCHS (the client's default, 1),
# LOCAL_PRIOR (finetune's --local-prior: the client's default, true; false to skip the shift),
# SEED (gen-data's, 11), BENCH_DIR (target/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:?METHOD: finetune, fedper or ditto}
ALPHA=${2:?ALPHA: the Dirichlet concentration}
CLIENTS=${3:-5}
ROUNDS=${4:-10}
BIN=target/release
STRATEGY=${STRATEGY:-fedavg}
SEED=${SEED:-11}
DIR=${BENCH_DIR:-target/bench}/personalize-$METHOD-$STRATEGY${SERVER_LR:+-$SERVER_LR}${LOCAL_PRIOR:+-prior-$LOCAL_PRIOR}-a$ALPHA-c$CLIENTS-r$ROUNDS-s$SEED
[ -x $BIN/fl-coordinator ] || { echo "run make build first" >&2; exit 1; }
rm -rf "$DIR"; mkdir -p "$DIR/logs"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

$BIN/fl-client gen-data --out "$DIR/data" --rows "${ROWS:-7000}" --shards "$CLIENTS" \
  --partition dirichlet --alpha "$ALPHA" --seed "$SEED" >/dev/null
$BIN/fl-coordinator serve --listen 127.0.0.1:0 --state-dir "$DIR/coord" --rounds "$ROUNDS" \
  --min-clients "$CLIENTS" --eval-data "$DIR/data/test.csv" --lr "${LR:-0.01}" --batch-size 32 \
  --local-epochs "${EPOCHS:-1}" --optimizer adam --round-timeout 600 --strategy "$STRATEGY" \
  ${SERVER_LR:+--server-lr "$SERVER_LR"} >"$DIR/logs/coordinator.log" 2>&1 &
coord=$!
pids+=("$coord")
while [ ! -f "$DIR/coord/listen-addr" ]; do sleep 0.05; kill -0 $coord || { cat "$DIR/logs/coordinator.log"; exit 1; }; done
URL="https://localhost:$(cut -d: -f2 "$DIR/coord/listen-addr")"
TOKEN=$(cat "$DIR/coord/join-token")
for i in $(seq 1 "$CLIENTS"); do
  $BIN/fl-client enroll --coordinator "$URL" --token "$TOKEN" --state-dir "$DIR/client-$i" --name "c$i" >/dev/null
  $BIN/fl-client run --coordinator "$URL" --state-dir "$DIR/client-$i" --data "$DIR/data/shard-$i.csv" \
    --threads 1 --personalize "$METHOD" --ditto-lambda "${LAMBDA:-10}" ${DITTO_MIN_STEPS:+--ditto-min-steps "$DITTO_MIN_STEPS"} --local-test-fraction 0.2 \
    $([ "$METHOD" = finetune ] && echo ${FINETUNE_EPOCHS:+--finetune-epochs "$FINETUNE_EPOCHS"} ${LOCAL_PRIOR:+--local-prior "$LOCAL_PRIOR"}) \
    >"$DIR/logs/client-$i.log" 2>&1 &
  pids+=("$!")
done
wait $coord
for p in "${pids[@]:1}"; do wait "$p" || true; done

python3 - "$DIR" "$CLIENTS" "$METHOD" "$ALPHA" "$STRATEGY" <<'PY'
import json, sys
d, clients, method, alpha, strategy = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
lines = [json.loads(l) for l in open(f"{d}/coord/metrics.jsonl")]
last = lines[-1]
print(f"method {method}, strategy {strategy}, alpha {alpha}, {clients} clients, {len(lines)} rounds")
print(f"final global model on the coordinator's balanced test set: {last['accuracy']:.4f}")
print(f"round {last['round']} as the coordinator recorded it ({last['local_eval_clients']} clients reported; "
      "global = the round's global model as received, personal = after the round's local training):")
g, p = last["local_global_accuracy_mean"], last["personal_accuracy_mean"]
print(f"  mean per-client accuracy: global {g:.4f}, personal {p:.4f}, difference {100*(p-g):+.1f} points")
print(f"  10th percentile: global {last['local_global_accuracy_p10']:.4f}, personal {last['personal_accuracy_p10']:.4f}")
if method == "finetune":
    def p10(v):
        v = sorted(v); k = 0.1 * (len(v) - 1); lo = int(k); hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)
    rows = [json.load(open(f"{d}/client-{i}/personal/accuracy.json")) for i in range(1, clients + 1)]
    done = [r for r in rows if r.get("after_federation")]
    print(f"after the federation, the final model fine-tuned on each client (clients' accuracy.json, {len(done)} of {clients}):")
    for i, r in enumerate(rows, 1):
        print(f"  client {i}: {r['train_rows']} train / {r['test_rows']} test rows, final {r['global_accuracy']:.4f}, "
              f"fine-tuned {r['personal_accuracy']:.4f}{'' if r.get('after_federation') else ' (NOT fine-tuned after the federation)'}")
    g = [r["global_accuracy"] for r in done]; p = [r["personal_accuracy"] for r in done]
    if done:
        print(f"  mean per-client accuracy: final {sum(g)/len(g):.4f}, fine-tuned {sum(p)/len(p):.4f}, "
              f"difference {100*(sum(p)-sum(g))/len(g):+.1f} points; 10th percentile: final {p10(g):.4f}, fine-tuned {p10(p):.4f}")
    if len(done) < clients:
        sys.exit(f"{clients - len(done)} clients did not fine-tune the final model: see {d}/logs")
PY
