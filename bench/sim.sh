#!/usr/bin/env bash
# fl-sim benchmarks (issue 13). Each mode prints its figures; all write under BENCH_DIR (target/bench/sim).
#   bench/sim.sh scale     1,000 clients, 100 per round, 5 rounds, fastText defaults, Dirichlet α 0.5 on
#                          `fl-client gen-data` rows: peak RSS (/usr/bin/time -v) and seconds per round.
#   bench/sim.sh vs-real   4 clients IID, 20 rounds, simulated, beside bench/federation.sh 4 20 (real
#                          processes, same data generator and seed): both accuracy curves.
#   bench/sim.sh alpha     non-IID study: 50 clients, 10 per round, 10 rounds, α in 0.1 0.3 1 100.
#   bench/sim.sh dp        DP study: 500 clients, 100 per round, 15 rounds, --dp-noise-multiplier 0 0.5 1 2.
# Environment: THREADS (the cores), ROWS (scale: 100000), BENCH_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${FL_BIN:-target/release}
DIR=${BENCH_DIR:-target/bench}/sim
THREADS=${THREADS:-$(nproc)}
mkdir -p "$DIR"

curve() {
  python3 - "$1" <<'PY'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1])]
print(" ".join(f"{x['accuracy']:.3f}" for x in m))
eps = m[-1].get("dp_epsilon")
print(f"final accuracy {m[-1]['accuracy']:.4f}, mean round_s {sum(x['round_s'] for x in m)/len(m):.2f}, epsilon {eps if eps is not None else '-'}")
PY
}
export RUST_LOG=${RUST_LOG:-warn}

case "${1:-scale}" in
scale)
  # GNU time measures the peak RSS; Debian's package `time` (not the shell keyword).
  scripts/apt-tool.sh /usr/bin/time time "bench/sim.sh scale"
  ROWS=${ROWS:-100000}
  "$BIN/fl-client" gen-data --out "$DIR/scale-data" --rows "$ROWS" --shards 1 --seed 11 >/dev/null
  rm -rf "$DIR/scale"
  start=$(date +%s.%N)
  /usr/bin/time -v "$BIN/fl-sim" --state-dir "$DIR/scale" --data "$DIR/scale-data/train.csv" \
    --eval-data "$DIR/scale-data/test.csv" --clients 1000 --clients-per-round 100 --rounds 5 \
    --partition dirichlet --alpha 0.5 --seed 42 --threads "$THREADS" --quiet \
    2> "$DIR/scale.time" | tail -8
  end=$(date +%s.%N)
  grep -E "Maximum resident set size|Elapsed" "$DIR/scale.time"
  python3 - "$DIR/scale/metrics.jsonl" "$start" "$end" <<'PY'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1])]
print(f"rounds {len(m)}, mean round_s {sum(x['round_s'] for x in m)/len(m):.2f}, wall {float(sys.argv[3])-float(sys.argv[2]):.1f} s, final accuracy {m[-1]['accuracy']:.4f}")
PY
  ;;
vs-real)
  "$BIN/fl-client" gen-data --out "$DIR/real-data" --rows 6700 --shards 1 --signal 0.2 --seed 11 >/dev/null
  rm -rf "$DIR/vs-real"
  "$BIN/fl-sim" --state-dir "$DIR/vs-real" --data "$DIR/real-data/train.csv" --eval-data "$DIR/real-data/test.csv" \
    --clients 4 --rounds 20 --partition iid --seed 42 --lr 0.01 --batch-size 32 --threads "$THREADS" --quiet >/dev/null
  echo "simulated (fl-sim, 4 clients IID):"; curve "$DIR/vs-real/metrics.jsonl"
  BENCH_DIR="$DIR" bench/federation.sh 4 20 > "$DIR/real.txt"
  echo "real (bench/federation.sh 4 20, 4 processes):"; curve "$DIR/fasttext-c4-r20/coord/metrics.jsonl"
  ;;
alpha)
  "$BIN/fl-client" gen-data --out "$DIR/study-data" --rows 20000 --shards 1 --seed 11 >/dev/null
  for a in 0.1 0.3 1 100; do
    rm -rf "$DIR/alpha-$a"
    "$BIN/fl-sim" --state-dir "$DIR/alpha-$a" --data "$DIR/study-data/train.csv" --eval-data "$DIR/study-data/test.csv" \
      --clients 50 --clients-per-round 10 --rounds 10 --partition dirichlet --alpha "$a" --min-shard-size 10 \
      --seed 42 --threads "$THREADS" --quiet >/dev/null
    echo "alpha $a:"; curve "$DIR/alpha-$a/metrics.jsonl"
  done
  ;;
dp)
  # As BENCHMARKS.md "Differential privacy": 500 clients of 40 rows, 100 per round, a 16,384 x 16
  # fastText, Adam at 0.05, C = 1; 15 rounds instead of 40.
  "$BIN/fl-client" gen-data --out "$DIR/dp-data" --rows 20000 --classes 4 --shards 1 --seed 11 >/dev/null
  for z in 0 0.5 1 2; do
    rm -rf "$DIR/dp-$z"
    if [ "$z" = 0 ]; then dp=(); else dp=(--dp-noise-multiplier "$z" --dp-clip-norm 1); fi
    "$BIN/fl-sim" --state-dir "$DIR/dp-$z" --data "$DIR/dp-data/train.csv" --eval-data "$DIR/dp-data/eval.csv" \
      --clients 500 --clients-per-round 100 --rounds 15 --partition iid --seed 42 --threads "$THREADS" --quiet \
      --buckets 16384 --embed-dim 16 --lr 0.05 --update-codec safetensors-f32 "${dp[@]}" >/dev/null
    echo "noise multiplier $z:"; curve "$DIR/dp-$z/metrics.jsonl"
  done
  ;;
*) echo "usage: bench/sim.sh scale|vs-real|alpha|dp" >&2; exit 2 ;;
esac
