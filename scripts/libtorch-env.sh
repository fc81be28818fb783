#!/usr/bin/env bash
# Installs libtorch (PyTorch 2.13.0, the version tch 0.26 binds) into a cache outside the clone, once,
# and prints the LIBTORCH path. Every clone and CI run on this machine reuses the same install.
set -euo pipefail
TORCH_VERSION=2.13.0
. "$(dirname "${BASH_SOURCE[0]}")/pypi-cache-lib.sh"
pypi_cache_venv "torch-$TORCH_VERSION" "about 1 minute, 4.7 GB" "torch==$TORCH_VERSION"
ls -d "$VENV"/lib/python3*/site-packages/torch | head -n 1
