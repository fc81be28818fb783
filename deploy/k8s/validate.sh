#!/usr/bin/env bash
# Validates the Kubernetes manifests offline, with no cluster: renders the base and every overlay with
# `kubectl kustomize`, validates each resource against the Kubernetes API schema with
# `kubernetes-validate --strict` (unknown fields are errors), then checks the rules a schema cannot
# (check-manifests.py: non-root, read-only root fs, PVCs, probes, defined $(VARS), replica counts).
# The tools come from PyPI into the project's cache (scripts/k8s-tools-env.sh). Run by `make test`.
#
#   deploy/k8s/validate.sh            environment: K8S_VERSION (schema version, default: the tool's, 1.37)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="$("$root/scripts/k8s-tools-env.sh")"
out="$root/target/k8s"
mkdir -p "$out"
version_args=()
[ -n "${K8S_VERSION:-}" ] && version_args=(--kubernetes-version "$K8S_VERSION")

failed=0
for dir in "$here/base" "$here"/overlays/*/; do
  dir="${dir%/}"
  name="$(basename "$dir")"
  [ "$name" = base ] || name="overlay-$name"
  rendered="$out/$name.yaml"
  if ! "$bin/kubectl" kustomize "$dir" >"$rendered"; then
    echo "FAIL: kubectl kustomize ${dir#"$root"/}"
    failed=$((failed + 1))
    continue
  fi
  # An overlay named clients-N must render N client pods.
  clients=""
  case "$name" in overlay-clients-*) clients="${name#overlay-clients-}" ;; esac
  if "$bin/kubernetes-validate" --strict --quiet "${version_args[@]}" "$rendered" &&
    "$bin/python" "$here/check-manifests.py" "$rendered" $clients; then
    echo "PASS: ${dir#"$root"/} renders $(grep -c '^kind:' "$rendered") resources that validate (--strict)"
  else
    echo "FAIL: ${dir#"$root"/} (rendered: ${rendered#"$root"/})"
    failed=$((failed + 1))
  fi
done

# The checks must be able to fail: a misspelt field, a writable root fs and an undefined $(VAR),
# each in a copy of the rendered base, must each be refused.
base="$out/base.yaml"
refused() { # refused WHAT FILE: PASS when the schema or the policy check rejects FILE
  if "$bin/kubernetes-validate" --strict --quiet "${version_args[@]}" "$2" >/dev/null 2>&1 &&
    "$bin/python" "$here/check-manifests.py" "$2" >/dev/null 2>&1; then
    echo "FAIL: a manifest with $1 passed the checks"
    failed=$((failed + 1))
  else
    echo "PASS: a manifest with $1 is refused"
  fi
}
sed 's/readOnlyRootFilesystem:/readOnlyRootFileSystem:/' "$base" >"$out/bad-field.yaml"
refused "a misspelt field (readOnlyRootFileSystem)" "$out/bad-field.yaml"
sed 's/readOnlyRootFilesystem: true/readOnlyRootFilesystem: false/' "$base" >"$out/bad-rootfs.yaml"
refused "a writable root filesystem" "$out/bad-rootfs.yaml"
sed 's/\$(FL_ROUNDS)/$(FL_ROUNDZ)/' "$base" >"$out/bad-var.yaml"
refused "an undefined \$(FL_ROUNDZ)" "$out/bad-var.yaml"
[ "$failed" = 0 ] || { echo "$failed checks FAILED"; exit 1; }
