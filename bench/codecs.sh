#!/usr/bin/env bash
# Runs bench/federation.sh once per update codec, one after another, and prints a markdown
# table: bytes up and down per round, their ratio to dense f32, final accuracy, seconds per
# round, overhead_s / round_s (mean over rounds 2..N), and the round and time to TARGET.
# Usage: bench/codecs.sh [CLIENTS] [ROUNDS] [TARGET_ACCURACY] [CODEC...]
# Environment: as bench/federation.sh (ROWS, SIGNAL, BUCKETS, DIM, LR, EPOCHS, BENCH_DIR, COMPRESSION).
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${1:-4}
ROUNDS=${2:-20}
TARGET=${3:-0.80}
shift $(($# < 3 ? $# : 3))
CODECS=("$@")
[ ${#CODECS[@]} -gt 0 ] || CODECS=(safetensors-f32 sparse-f32 sparse-f16 sparse-int8 dense-int8 topk-f16 topk-int8)
BENCH_DIR=${BENCH_DIR:-target/bench}
for codec in "${CODECS[@]}"; do
  echo "== $codec" >&2
  CODEC=$codec BENCH_DIR=$BENCH_DIR bench/federation.sh "$CLIENTS" "$ROUNDS" "$TARGET" >&2
done
python3 - "$BENCH_DIR" "$CLIENTS" "$ROUNDS" "${COMPRESSION:+-$COMPRESSION}" "${CODECS[@]}" <<'PY'
import json, sys
d, clients, rounds, suffix, codecs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
rows = [json.load(open(f"{d}/fasttext-c{clients}-r{rounds}-{c}{suffix}/summary.json")) for c in codecs]
dense = next((r for r in rows if r["codec"] == "safetensors-f32"), rows[0])
dense_bytes = dense["bytes_up_per_round"] + dense["bytes_down_per_round"]
print("| codec | up MB/round | down MB/round | (up+down) / dense | final accuracy | s/round | overhead_s/round_s (rounds 2..N) | round (s) to accuracy %.2f |" % rows[0]["target"])
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    b = r["bytes_up_per_round"] + r["bytes_down_per_round"]
    reach = f"{r['target_round']} ({r['target_elapsed_s']:.1f} s)" if r["target_round"] else "not reached"
    print(f"| `{r['codec']}` | {r['bytes_up_per_round']/1e6:.2f} | {r['bytes_down_per_round']/1e6:.2f} | 1/{dense_bytes/b:.1f} | {r['final_accuracy']:.4f} | {r['round_s']:.2f} | {r['overhead_ratio_r2_on']:.2f} | {reach} |")
PY
