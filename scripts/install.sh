#!/usr/bin/env bash
# Environment A, the fresh one: create (or reuse) the virtual environment .venv (Python 3.11) and install
# cmd_plugin with fairseq-fixed and every extra, at the exact versions of constraints/env-a.txt; plus the
# Debian packages the generated demo corpus (espeak-ng, sox) and the headless-browser tests (chromium, and
# chromium-driver for the web app's tests) need.
# Order matters: torch first, then fairseq-fixed (an sdist) built against it without isolation.
# Into an existing fairseq environment instead: see the README (pip install --no-build-isolation -e .).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CMD_PLUGIN_VENV:-.venv}
CONSTRAINTS=constraints/env-a.txt

missing=()
for tool in espeak-ng sox chromium chromium-driver:chromedriver; do  # package[:command]
  command -v "${tool#*:}" >/dev/null 2>&1 || missing+=("${tool%%:*}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "install ${missing[*]} first (Debian/Ubuntu: sudo apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q -c "$CONSTRAINTS")
stamp="$VENV/.cmd_plugin_installed"
# what the environment is made of: a change to either reinstalls
want="setup=$(sha256sum setup.py | cut -c1-16) constraints=$(sha256sum "$CONSTRAINTS" | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] \
   || ! "$PY" -c "import fairseq, open_clip, cmd_plugin, pytest, tensorboard, faiss, gradio, selenium, sklearn, npy_append_array, editdistance, ruff, mteb" >/dev/null 2>&1; then
  "${PIP[@]}" --upgrade pip setuptools wheel
  "${PIP[@]}" torch torchvision cython numpy pytest pyyaml
  "${PIP[@]}" --no-build-isolation -e ".[fairseq,tensorboard,search,app,plot,recipe,lint,test,mteb]" --config-settings editable_mode=compat
  echo "$want" > "$stamp"
fi
echo "environment ready: $VENV"
