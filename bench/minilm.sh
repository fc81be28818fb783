#!/usr/bin/env bash
# Central comparison of --model minilm (pretrained all-MiniLM-L6-v2 + LoRA) against the
# from-scratch models on the same generated data: accuracy, training and inference examples/s,
# and the bytes of one update (the f32 weights that travel each round). Run after `make build`.
#   bench/minilm.sh [ROWS] [MAX_LEN]   (defaults 600 and 32: the encoder is slow on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-600}"
MAX_LEN="${2:-32}"
B=target/release/fl-client
D="${TMPDIR:-/tmp}/fedtext-minilm-bench"
scripts/minilm-env.sh >/dev/null
rm -rf "$D" && mkdir -p "$D"
$B gen-data --out "$D" --rows "$ROWS" --test-rows 300 --eval-rows 100 --classes 10 --seed 7 >/dev/null
echo "| model | parameters that travel | bytes per update (f32) | training examples/s | test accuracy | inference examples/s |"
echo "|---|---|---|---|---|---|"
for m in fasttext bilstm transformer minilm; do
  extra=()
  [ "$m" = minilm ] && extra=(--max-len "$MAX_LEN")
  out="$($B train --data "$D/train.csv" --model "$m" --threads 2 --out "$D/$m.safetensors" "${extra[@]}" 2>&1 | tail -n 1)"
  params="$(sed -n 's/.*model, \([0-9]*\) parameters.*/\1/p' <<<"$out")"
  train_speed="$(sed -n 's/.*median epoch: \([0-9.]*\) examples\/s.*/\1/p' <<<"$out")"
  pred="$($B predict --model "$D/$m.safetensors" --data "$D/test.csv" 2>&1)"
  acc="$(sed -n 's/^accuracy: //p' <<<"$pred")"
  infer="$(sed -n 's/.*: \([0-9.]*\) examples\/s.*/\1/p' <<<"$pred" | tail -n 1)"
  echo "| $m | $params | $((params * 4)) | $train_speed | $acc | $infer |"
done
