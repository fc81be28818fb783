#!/usr/bin/env bash
# Installs libtorch (PyTorch 2.13.0, the version tch 0.26 binds) into a cache outside the clone, once,
# and prints the LIBTORCH path. Every clone and CI run on this machine reuses the same install.
set -euo pipefail
TORCH_VERSION=2.13.0
CACHE_ROOT="${FL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtext}"
VENV="$CACHE_ROOT/torch-$TORCH_VERSION"
STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ]; then
  echo "installing torch==$TORCH_VERSION into $VENV (once; about 1 minute, 4.7 GB)" >&2
  mkdir -p "$CACHE_ROOT"
  rm -rf "$VENV.tmp"
  python3 -m venv "$VENV.tmp"
  "$VENV.tmp/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" >&2
  rm -rf "$VENV"
  mv "$VENV.tmp" "$VENV"
  # venv scripts carry absolute paths; the move breaks them, but only site-packages/torch is used.
  touch "$STAMP"
fi
ls -d "$VENV"/lib/python3*/site-packages/torch | head -n 1
