#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install cmd_plugin with its dependencies.
# Order matters: torch first, then fairseq-fixed (an sdist) built against it without isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CMD_PLUGIN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import fairseq, open_clip, cmd_plugin, pytest" >/dev/null 2>&1 \
   || [ setup.py -nt "$VENV/.cmd_plugin_installed" ]; then
  "$PY" -m pip install -q --upgrade pip setuptools wheel
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 cython "numpy<2.4" pytest
  "$PY" -m pip install -q --no-build-isolation -e . --config-settings editable_mode=compat
  touch "$VENV/.cmd_plugin_installed"
fi
echo "environment ready: $VENV"
