#!/usr/bin/env bash
# Installs Flower 1.42 into a venv for the comparison benchmark, reusing the torch 2.13.0 that
# the project already has (same libtorch as fl-client links against), and checks both import.
# Idempotent: a venv that already imports flwr 1.42.* and torch 2.13.0 is left as it is.
# Environment: FL_CACHE_DIR (~/.cache/fedtext, as scripts/libtorch-env.sh), PYTHON (python3.11 of the torch venv's base).
set -euo pipefail
CACHE=${FL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtext}
TORCH_VENV=$CACHE/torch-2.13.0
VENV=$CACHE/flower-venv
TORCH_SITE=$TORCH_VENV/lib/python3.11/site-packages
[ -d "$TORCH_SITE/torch" ] || { echo "torch 2.13.0 not found at $TORCH_SITE" >&2; exit 1; }
# The same interpreter the torch venv was made from (python 3.11, or its .pth makes no sense).
PYTHON=${PYTHON:-$(awk -F' = ' '/^executable/ {print $2}' "$TORCH_VENV/pyvenv.cfg")}

check() {
  "$VENV/bin/python" - <<'PY' 2>/dev/null
import flwr, torch, sys
ok = flwr.__version__.startswith("1.42.") and torch.__version__.split("+")[0] == "2.13.0"
print(f"flwr {flwr.__version__}, torch {torch.__version__} from {torch.__file__}")
sys.exit(0 if ok else 1)
PY
}

if [ -x "$VENV/bin/python" ] && check; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "flwr==1.42.*"
# Reuse torch: a .pth appends the torch venv's site-packages to sys.path (after the venv's own,
# so Flower's dependencies keep their versions). Never pip-install another torch here.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$TORCH_SITE" >"$SITE/fedtext-torch-2.13.0.pth"
check || { echo "flower venv does not import flwr 1.42 and torch 2.13.0" >&2; exit 1; }
