#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install cmd_plugin with its dependencies,
# plus the Debian packages the generated demo corpus needs (espeak-ng, sox).
# Order matters: torch first, then fairseq-fixed (an sdist) built against it without isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CMD_PLUGIN_VENV:-.venv}

if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v sox >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox >/dev/null
  else
    echo "install espeak-ng and sox first (Debian/Ubuntu: sudo apt-get install -y espeak-ng sox)" >&2
    exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.cmd_plugin_installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || ! "$PY" -c "import fairseq, open_clip, cmd_plugin, pytest" >/dev/null 2>&1; then
  "$PY" -m pip install -q --upgrade pip setuptools wheel
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 cython "numpy<2.4" pytest pyyaml
  "$PY" -m pip install -q --no-build-isolation -e ".[test]" --config-settings editable_mode=compat
  touch "$stamp"
fi
echo "environment ready: $VENV"
