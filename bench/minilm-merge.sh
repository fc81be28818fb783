#!/usr/bin/env bash
# `fl-client export --merge` on a minilm model: bytes of the merged standalone file against the
# adapter model file, and `predict` examples/s of each on the same test rows (alternated REPEAT
# times, so machine load hits both alike). Run after `make build`.
#   bench/minilm-merge.sh [ROWS] [MAX_LEN] [REPEAT]   (defaults 400, 32 and 3)
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-400}"
MAX_LEN="${2:-32}"
REPEAT="${3:-3}"
B=target/release/fl-client
D="${TMPDIR:-/tmp}/fedtext-minilm-merge-bench"
scripts/minilm-env.sh >/dev/null
rm -rf "$D" && mkdir -p "$D/no-base"
$B gen-data --out "$D" --rows "$ROWS" --test-rows 300 --eval-rows 100 --classes 10 --seed 7 >/dev/null
$B train --data "$D/train.csv" --model minilm --max-len "$MAX_LEN" --epochs 1 --threads 2 \
  --out "$D/adapters.safetensors" >/dev/null 2>&1
$B export --merge --model "$D/adapters.safetensors" --out "$D/merged.safetensors" --data "$D/test.csv"
adapters=$(stat -c %s "$D/adapters.safetensors")
merged=$(stat -c %s "$D/merged.safetensors")
echo
echo "| file | bytes | ratio to the adapter file |"
echo "|---|---|---|"
echo "| adapters + head (round file, final.safetensors) | $adapters | 1 |"
echo "| merged standalone (export --merge) | $merged | $(awk "BEGIN{printf \"%.0f\", $merged/$adapters}") |"
echo
# examples/s of the prediction itself, and the wall seconds of the whole command (reading the
# model and, for the adapter file, hashing and reading the base package).
run() {
  local start end out
  start=$(date +%s.%N)
  out=$("$@" 2>&1)
  end=$(date +%s.%N)
  printf '%s | %.2f' "$(sed -n 's/.*: \([0-9.]*\) examples\/s.*/\1/p' <<<"$out" | tail -n 1)" "$(awk "BEGIN{print $end-$start}")"
}
echo "| run | adapters + base package: examples/s | its command: s | merged, no base: examples/s | its command: s |"
echo "|---|---|---|---|---|"
for i in $(seq 1 "$REPEAT"); do
  a=$(run $B predict --model "$D/adapters.safetensors" --data "$D/test.csv")
  m=$(run $B --pretrained "$D/no-base" predict --model "$D/merged.safetensors" --data "$D/test.csv")
  echo "| $i | $a | $m |"
done
