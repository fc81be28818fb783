#!/usr/bin/env bash
# Writes the reference fixture of the minilm encoder test (model/src/model/minilm-reference.json):
# the mean-pooled all-MiniLM-L6-v2 embeddings of three fixed sentences, computed by Hugging Face
# transformers on the same files (scripts/minilm-env.sh). Run by hand when the base changes:
#   scripts/minilm-reference.sh > model/src/model/minilm-reference.json
# transformers goes into its own venv in the cache; it reuses the torch that libtorch-env.sh installed.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
model_dir="$("$here/minilm-env.sh")"
torch_dir="$(dirname "$("$here/libtorch-env.sh")")"
. "$here/pypi-cache-lib.sh"
pypi_cache_venv "minilm-reference-transformers5.23.0" "" "transformers==5.23.0"
site="$(ls -d "$VENV"/lib/python3*/site-packages | head -n 1)"
echo "$torch_dir" > "$site/fedtext-torch.pth"
"$VENV/bin/python" "$here/minilm_reference.py" "$model_dir" 64
