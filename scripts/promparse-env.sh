#!/usr/bin/env bash
# Installs the Python prometheus-client (the reference parser of the Prometheus and OpenMetrics text
# formats) into a venv in the project's cache, once per version, and prints that venv's python.
set -euo pipefail
VERSION=0.26.0
. "$(dirname "${BASH_SOURCE[0]}")/pypi-cache-lib.sh"
pypi_cache_venv "prometheus-client-$VERSION" "" "prometheus-client==$VERSION"
echo "$VENV/bin/python"
