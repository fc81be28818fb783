#!/usr/bin/env bash
# Installs the Python prometheus-client (the reference parser of the Prometheus and OpenMetrics text
# formats) into a venv in the project's cache, once per version, and prints that venv's python.
set -euo pipefail
VERSION=0.26.0
CACHE_ROOT="${FL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtext}"
VENV="$CACHE_ROOT/prometheus-client-$VERSION"
if [ ! -f "$VENV/.installed" ]; then
  echo "installing prometheus-client==$VERSION into $VENV (once)" >&2
  mkdir -p "$CACHE_ROOT"
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2 || { echo "python3 -m venv failed (apt-get install python3-venv)" >&2; exit 1; }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "prometheus-client==$VERSION" >&2
  touch "$VENV/.installed"
fi
echo "$VENV/bin/python"
