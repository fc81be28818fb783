#!/usr/bin/env bash
# Sourced by the *-env.sh scripts: installs PyPI packages into a venv in the project's cache
# (outside the clone), once per name, so that every clone and CI run on this machine reuses it.
#
#   pypi_cache_venv NAME "what to say while installing" PACKAGE==VERSION...
#
# sets VENV to "$CACHE_ROOT/NAME" (NAME should carry the versions). The venv is built in place (its
# console scripts carry its absolute path) and stamped with .installed only when pip succeeded, so
# an interrupted install is redone, not used.
CACHE_ROOT="${FL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtext}"

pypi_cache_venv() {
  local name="$1" note="$2"
  shift 2
  VENV="$CACHE_ROOT/$name"
  [ -f "$VENV/.installed" ] && return 0
  command -v python3 >/dev/null || { echo "python3 is needed to install $* (apt-get install python3-venv)" >&2; exit 1; }
  echo "installing $* into $VENV (once${note:+; $note})" >&2
  mkdir -p "$CACHE_ROOT"
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2 || { echo "python3 -m venv failed (apt-get install python3-venv)" >&2; exit 1; }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$@" >&2 \
    || { echo "pip could not install $* (is PyPI reachable?)" >&2; exit 1; }
  touch "$VENV/.installed"
}
