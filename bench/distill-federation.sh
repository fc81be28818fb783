#!/usr/bin/env bash
# Federated distillation's cost and effect: the bytes of shipping the teacher (serve --distill-from)
# against the model's own traffic, and the accuracy with and without it.
# Usage: bench/distill-federation.sh [CLIENTS] [ROUNDS]   (after make build)
# Environment: BENCH_DIR (target/bench/distill), ROWS (6700) and SIGNAL (0.2) as bench/federation.sh.
# It generates bench/federation.sh's data (same rows, signal and seed) as one shard, trains a
# default fastText teacher on all of it with `fl-client train`, exports it to int8, then runs
# bench/federation.sh twice: without a teacher, and with --distill-from the int8 teacher.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${1:-4}
ROUNDS=${2:-5}
B=target/release/fl-client
D=${BENCH_DIR:-target/bench/distill}
export ROWS=${ROWS:-6700} SIGNAL=${SIGNAL:-0.2}
[ -x $B ] || { echo "run make build first" >&2; exit 1; }
mkdir -p "$D"
[ -f "$D/data/train.csv" ] || $B gen-data --out "$D/data" --rows "$ROWS" --shards 1 --signal "$SIGNAL" --seed 11 >/dev/null
[ -f "$D/teacher.safetensors" ] || $B train --data "$D/data/train.csv" --threads 2 --out "$D/teacher.safetensors" | tail -1
[ -f "$D/teacher.fl" ] || $B export --model "$D/teacher.safetensors" --out "$D/teacher.fl" --quantize int8 --data "$D/data/test.csv"
BENCH_DIR="$D/plain" bench/federation.sh "$CLIENTS" "$ROUNDS" 1.0 | grep -E "accuracy|bytes"
BENCH_DIR="$D/distilled" EXTRA_SERVE_ARGS="--distill-from $D/teacher.fl" bench/federation.sh "$CLIENTS" "$ROUNDS" 1.0 |
  grep -E "accuracy|bytes"
python3 - "$D" "$CLIENTS" "$ROUNDS" <<'PY'
import glob, json, os, sys
d, clients, rounds = sys.argv[1], sys.argv[2], sys.argv[3]
teacher = os.path.getsize(f"{d}/teacher.fl")
f32 = os.path.getsize(f"{d}/teacher.safetensors")
print(f"teacher file: {teacher} bytes int8 ({f32} bytes in f32)")
for run in ("plain", "distilled"):
    [path] = glob.glob(f"{d}/{run}/*/coord/metrics.jsonl")
    m = [json.loads(l) for l in open(path)]
    print(f"{run}: round accuracy bytes_up bytes_down teacher_bytes_down distilled")
    for x in m:
        print(f"  {x['round']} {x['accuracy']:.4f} {x['bytes_up']} {x['bytes_down']} {x.get('teacher_bytes_down', '-')} {x.get('distilled', '-')}")
    total = sum(x["bytes_up"] + x["bytes_down"] for x in m)
    shipped = sum(x.get("teacher_bytes_down", 0) for x in m)
    print(f"  total up+down {total} bytes over {len(m)} rounds; teacher {shipped} bytes = {shipped / total:.3f} of it")
PY
