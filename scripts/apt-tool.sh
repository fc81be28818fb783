#!/usr/bin/env bash
# Makes sure a tool from one of Debian's packages is here: installs the package with apt-get
# (once) when the tool is missing and this runs as root, or stops with the one command to run.
#   scripts/apt-tool.sh PATH PACKAGE WHO   e.g. scripts/apt-tool.sh /usr/bin/time time "bench/sim.sh scale"
set -euo pipefail
TOOL=$1
PACKAGE=$2
WHO=$3
[ -x "$TOOL" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing $PACKAGE with apt-get (once)" >&2
  apt-get install -y --no-install-recommends "$PACKAGE" >/dev/null 2>&1 ||
    { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends "$PACKAGE" >/dev/null 2>&1; } || true
fi
[ -x "$TOOL" ] || { echo "$WHO needs $TOOL: run apt-get install $PACKAGE" >&2; exit 2; }
