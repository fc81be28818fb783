#!/usr/bin/env bash
# The edge model's figures: sizes and accuracy of int8 / f16 / pruned exports of a default
# fastText and a default transformer, and predict's examples/s on f32 against int8.
# Usage: bench/edge.sh   (after make build). Environment: BENCH_DIR (target/bench/edge),
#   MODELS ("fasttext transformer"), PARTS ("export timing distill"), THREADS (2), TIMING_ROWS (50000),
#   TEACHER (fasttext), TEMPERATURES (2), ALPHAS (0.5).
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/release/fl-client
D=${BENCH_DIR:-target/bench/edge}
THREADS=${THREADS:-2}
[ -x $B ] || { echo "run make build first" >&2; exit 1; }
mkdir -p "$D"
# The central baselines' data (BENCHMARKS.md): 7,000 rows, 10 classes, seed 7; 1,000 test rows.
[ -f "$D/data/test.csv" ] || $B gen-data --out "$D/data" --rows 7000 --classes 10 --seed 7 >/dev/null
PARTS=${PARTS:-export timing distill}
has() { [[ " $PARTS " == *" $1 "* ]]; }
# A larger file for throughput only (same seed: the generator's words depend on it).
[ -f "$D/timing/test.csv" ] || $B gen-data --out "$D/timing" --rows 10 --eval-rows 10 \
  --test-rows "${TIMING_ROWS:-50000}" --shards 1 --classes 10 --seed 7 >/dev/null
for m in ${MODELS:-fasttext transformer}; do
  [ -f "$D/$m.safetensors" ] || $B train --data "$D/data/train.csv" --model "$m" --threads "$THREADS" \
    --out "$D/$m.safetensors" | tail -1
done
export_() { # NAME MODEL ARGS...
  local name=$1 model=$2; shift 2
  echo "== $B export --model $D/$model.safetensors --out $D/$name.fl $* --data $D/data/test.csv"
  $B export --model "$D/$model.safetensors" --out "$D/$name.fl" "$@" --data "$D/data/test.csv"
}
if has export && [ -f "$D/fasttext.safetensors" ]; then
  export_ fasttext-int8 fasttext --quantize int8
  export_ fasttext-f16 fasttext --quantize f16
  export_ fasttext-int8-rows50 fasttext --quantize int8 --prune 0.5 --prune-rows
  export_ fasttext-int8-rows75 fasttext --quantize int8 --prune 0.75 --prune-rows
fi
if has timing && [ -f "$D/fasttext-int8.fl" ]; then
  for f in fasttext.safetensors fasttext-int8.fl; do
    for run in 1 2 3; do
      echo "== OMP_NUM_THREADS=$THREADS $B predict --model $D/$f --data $D/timing/test.csv (run $run)"
      OMP_NUM_THREADS=$THREADS $B predict --model "$D/$f" --data "$D/timing/test.csv" | grep -E '^(accuracy|predicted)'
    done
  done
fi
if has export && [ -f "$D/transformer.safetensors" ]; then
  export_ transformer-int8 transformer --quantize int8
  export_ transformer-prune50 transformer --quantize none --prune 0.5
  export_ transformer-prune50-global transformer --quantize none --prune 0.5 --prune-scope global
  export_ transformer-f16-prune50 transformer --quantize f16 --prune 0.5
fi
# Distillation into a small fastText (8,192 buckets x 16: 1/32 of the default table), against the
# same small fastText trained on the labels alone; same split, same seed, test.csv for both.
TEACHER=${TEACHER:-fasttext}
SMALL="--buckets 8192 --embed-dim 16"
if has distill && [ -f "$D/$TEACHER.safetensors" ]; then
  # shellcheck disable=SC2086
  $B train --data "$D/data/train.csv" --model fasttext $SMALL --threads "$THREADS" --out "$D/small-labels.safetensors" | tail -1
  for t in ${TEMPERATURES:-2}; do
    for a in ${ALPHAS:-0.5}; do
      echo "== $B distill --teacher $D/$TEACHER.safetensors --student-model fasttext $SMALL --data $D/data/train.csv --temperature $t --alpha $a"
      # shellcheck disable=SC2086
      $B distill --teacher "$D/$TEACHER.safetensors" --student-model fasttext $SMALL --data "$D/data/train.csv" \
        --unlabeled "$D/data/eval.csv" --temperature "$t" --alpha "$a" --threads "$THREADS" \
        --out "$D/small-distilled-$TEACHER-t$t-a$a.safetensors" | tail -4
      for f in "$TEACHER" small-labels "small-distilled-$TEACHER-t$t-a$a"; do
        printf '%s test ' "$f"; $B predict --model "$D/$f.safetensors" --data "$D/data/test.csv" | head -1
      done
    done
  done
fi
