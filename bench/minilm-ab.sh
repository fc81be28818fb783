#!/usr/bin/env bash
# Does averaging LoRA's A and B separately (what FedAvg does) differ from averaging B·A here?
# Trains CLIENTS minilm clients from one start (same --seed) on their own shards of the
# generated data for one epoch, then compares mean(B)·mean(A) with mean(B·A) per adapter.
#   bench/minilm-ab.sh [CLIENTS] [ROWS] [MAX_LEN]   (defaults 4, 800, 32). Run after `make build`.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS="${1:-4}"
ROWS="${2:-800}"
MAX_LEN="${3:-32}"
B=target/release/fl-client
D="${TMPDIR:-/tmp}/fedtext-minilm-ab"
scripts/minilm-env.sh >/dev/null
TORCH="$(scripts/libtorch-env.sh)"
rm -rf "$D" && mkdir -p "$D"
$B gen-data --out "$D" --rows "$ROWS" --shards "$CLIENTS" --classes 10 --seed 7 >/dev/null
models=()
for i in $(seq 1 "$CLIENTS"); do
  $B train --model minilm --data "$D/shard-$i.csv" --epochs 1 --max-len "$MAX_LEN" --threads 2 --seed 42 \
    --out "$D/client-$i.safetensors" >/dev/null 2>&1
  models+=("$D/client-$i.safetensors")
done
"$TORCH/../../../../bin/python" bench/minilm_ab.py "${models[@]}"
