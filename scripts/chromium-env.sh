#!/usr/bin/env bash
# Prints the path of a headless Chromium for the browser tests: Debian's `chromium-headless-shell`,
# installed with apt-get when it is missing and this runs as root. When it cannot be had, prints
# "skipped: WHY" on stderr and exits 3, so that a test says why it did not run.
set -euo pipefail
for name in chromium-headless-shell chrome-headless-shell; do
  if command -v "$name" >/dev/null; then command -v "$name"; exit 0; fi
done
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "skipped: chromium-headless-shell is not installed and cannot be installed here (needs root and apt-get): run apt-get install chromium-headless-shell" >&2
  exit 3
fi
log="${TMPDIR:-/tmp}/fedtext-apt-chromium.log"
echo "installing chromium-headless-shell with apt-get (once; log: $log)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends chromium-headless-shell >"$log" 2>&1; then
  timeout 300 apt-get update >>"$log" 2>&1 || true
  if ! apt-get install -y --no-install-recommends chromium-headless-shell >>"$log" 2>&1; then
    echo "skipped: apt-get could not install chromium-headless-shell ($(tail -n 1 "$log"))" >&2
    exit 3
  fi
fi
command -v chromium-headless-shell
