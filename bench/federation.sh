#!/usr/bin/env bash
# Runs a local federation on generated data and prints its figures:
#   seconds per round, coordinator overhead per round beyond client training, bytes up and down
#   per round, wall time to reach a target accuracy, and the coordinator's peak RSS.
# Usage: bench/federation.sh [CLIENTS] [ROUNDS] [TARGET_ACCURACY]
# Environment: ROWS (6700), SIGNAL (generator difficulty, 0.2), MODEL (fasttext), BUCKETS (65536),
#   DIM (64) for fasttext, LR (0.01), EPOCHS (1), BENCH_DIR (target/bench), EXTRA_SERVE_ARGS,
#   CODEC (an --update-codec name; default: the coordinator's default), COMPRESSION (none, gzip or
#   zstd: the clients' and the coordinator's --compression; default: theirs). Writes DIR/summary.json; bench/codecs.sh
#   runs one codec after another and tabulates them. Besides the payload bytes of metrics.jsonl it
#   reports the bytes the coordinator's TCP connections carried (TLS records: what a link bills),
#   read with `ss` every 0.1 s.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${1:-4}
ROUNDS=${2:-20}
TARGET=${3:-0.42}
ROWS=${ROWS:-6700}
SIGNAL=${SIGNAL:-0.2}
# `ss` (Debian's iproute2) reads the bytes on the wire of each connection.
scripts/apt-tool.sh /usr/bin/ss iproute2 bench/federation.sh
# shellcheck source=scripts/federation-lib.sh
. scripts/federation-lib.sh
DIR=${BENCH_DIR:-target/bench}/${MODEL:-fasttext}-c$CLIENTS-r$ROUNDS${CODEC:+-$CODEC}${COMPRESSION:+-$COMPRESSION}
rm -rf "$DIR"; mkdir -p "$DIR/logs"
trap fed_stop EXIT

"$FL_BIN/fl-client" gen-data --out "$DIR/data" --rows "$ROWS" --shards "$CLIENTS" --signal "$SIGNAL" --seed 11 >/dev/null
start=$(date +%s.%N)
# shellcheck disable=SC2086
MODEL=${MODEL:-fasttext}
if [ "$MODEL" = fasttext ]; then
  MODEL_ARGS="--buckets ${BUCKETS:-65536} --embed-dim ${DIM:-64} --ngrams 2"
else
  MODEL_ARGS=""
fi
# shellcheck disable=SC2086
fed_start_coordinator "$DIR/coord" "$DIR/logs/coordinator.log" --rounds "$ROUNDS" \
  --min-clients "$CLIENTS" --eval-data "$DIR/data/test.csv" --model "$MODEL" $MODEL_ARGS \
  --lr "${LR:-0.01}" --batch-size 32 --local-epochs "${EPOCHS:-1}" --optimizer adam \
  --round-timeout 600 ${CODEC:+--update-codec $CODEC} ${COMPRESSION:+--compression $COMPRESSION} ${EXTRA_SERVE_ARGS:-}
coord=$FED_COORD
fed_enroll "$DIR/client" "$CLIENTS"
# shellcheck disable=SC2086
fed_run_clients "$DIR/client" "$DIR/data/shard" "$DIR/logs" "$CLIENTS" --threads 1 ${COMPRESSION:+--compression $COMPRESSION}
port=${FED_URL##*:}
: >"$DIR/wire.txt"
peak=0
cpu_ticks=0
while kill -0 $coord 2>/dev/null; do
  # Each connection's byte counters on the coordinator's side: PEER SENT RECEIVED.
  ss -tinH state established "( sport = :$port )" 2>/dev/null | awk '
    /^[0-9]/ { peer = $4 }
    /bytes_sent:/ { s = 0; r = 0
      for (i = 1; i <= NF; i++) { if ($i ~ /^bytes_sent:/) s = substr($i, 12); if ($i ~ /^bytes_received:/) r = substr($i, 16) }
      print peer, s, r }' >>"$DIR/wire.txt"
  hwm=$(awk '/VmHWM/ {print $2}' /proc/$coord/status 2>/dev/null || echo 0)
  [ -n "$hwm" ] && [ "$hwm" -gt "$peak" ] && peak=$hwm
  # utime + stime of the coordinator (fields 14 and 15), the last reading before it exits.
  ticks=$(awk '{print $14 + $15}' /proc/$coord/stat 2>/dev/null || echo "")
  [ -n "$ticks" ] && cpu_ticks=$ticks
  sleep 0.1
done
end=$(date +%s.%N)
wait $coord

python3 - "$DIR" "$CLIENTS" "$ROUNDS" "$TARGET" "$start" "$end" "$peak" "${CODEC:-default}" "$cpu_ticks" "$(getconf CLK_TCK)" "${COMPRESSION:-default}" <<'PY'
import json, re, sys, glob
d, clients, rounds, target, start, end, peak, codec = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]), sys.argv[8]
cpu_s = float(sys.argv[9]) / float(sys.argv[10])
compression = sys.argv[11]
# The last reading of each connection: its counters only grow.
wire = {}
for line in open(f"{d}/wire.txt"):
    peer, sent, received = line.split()
    s0, r0 = wire.get(peer, (0, 0))
    wire[peer] = (max(s0, int(sent)), max(r0, int(received)))
wire_down = sum(s for s, _ in wire.values())
wire_up = sum(r for _, r in wire.values())
m = [json.loads(l) for l in open(f"{d}/coord/metrics.jsonl")]
train = {}
for f in glob.glob(f"{d}/logs/client-*.log"):
    for line in (re.sub(r"\x1b\[[0-9;]*m", "", l) for l in open(f)):
        g = re.search(r"round=(\d+).*train_s=\"?([0-9.]+)", line)
        if "local training done" in line and g:
            r = int(g.group(1)); train[r] = max(train.get(r, 0.0), float(g.group(2)))
n = len(m)
# Each update reports its training seconds: metrics.jsonl has the slowest one per round.
for x in m:
    if "train_s" in x:
        train[x["round"]] = x["train_s"]
m0model = json.load(open(f"{d}/coord/federation.json"))["spec"]["kind"]
round_s = sum(x["round_s"] for x in m) / n
overhead = sum(x["round_s"] - train.get(x["round"], 0.0) for x in m) / n
coord_log = open(f"{d}/logs/coordinator.log").read()
# Wall time from the coordinator's launch to the metrics line of each round.
first = next((x for x in m if x["accuracy"] >= target), None)
print(f"model {m0model}, clients {clients}, rounds {n}/{rounds}, data rows per client ~{m[0]['examples']//max(1,m[0]['participants'])}")
print(f"accuracy per round: " + " ".join(f"{x['accuracy']:.3f}" for x in m))
print(f"final accuracy: {m[-1]['accuracy']:.4f}")
print(f"seconds per round (mean round_s): {round_s:.3f}")
print(f"coordinator overhead per round beyond the slowest client's training: {overhead:.3f} s")
print(f"bytes up per round: {sum(x['bytes_up'] for x in m)/n/1e6:.2f} MB, bytes down per round: {sum(x['bytes_down'] for x in m)/n/1e6:.2f} MB")
print(f"wire (TLS) bytes up per round: {wire_up/n/1e6:.2f} MB, down per round: {wire_down/n/1e6:.2f} MB (compression {compression})")
print(f"wall time, launch to end: {end-start:.1f} s")
if first:
    # elapsed_s counts from the coordinator's start of serving; launch-to-serve is included in wall time above.
    print(f"first round with accuracy >= {target}: round {first['round']}, {first['elapsed_s']:.1f} s after the coordinator started serving")
else:
    print(f"accuracy {target} not reached")
print(f"coordinator peak RSS: {peak/1024:.1f} MiB")
later = m[1:] or m
summary = {
    "codec": codec, "compression": compression, "clients": clients, "rounds": n,
    "wire_up_per_round": wire_up / n,
    "wire_down_per_round": wire_down / n,
    "coordinator_cpu_s": cpu_s,
    "bytes_up_per_round": sum(x["bytes_up"] for x in m) / n,
    "bytes_down_per_round": sum(x["bytes_down"] for x in m) / n,
    "final_accuracy": m[-1]["accuracy"],
    "round_s": round_s,
    "overhead_ratio_r2_on": sum((x["round_s"] - train.get(x["round"], 0.0)) / x["round_s"] for x in later) / len(later),
    "target": target,
    "target_round": first["round"] if first else None,
    "target_elapsed_s": first["elapsed_s"] if first else None,
    "peak_rss_mib": peak / 1024,
}
json.dump(summary, open(f"{d}/summary.json", "w"))
print(f"overhead_s / round_s, mean over rounds 2..{n}: {summary['overhead_ratio_r2_on']:.3f}")
print(f"coordinator CPU: {cpu_s:.1f} s over {end-start:.1f} s wall ({100*cpu_s/(end-start):.1f}% of one core)")
PY
