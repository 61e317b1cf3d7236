#!/usr/bin/env bash
# The built-in default end to end on the CPU (see README): installs, then runs examples/demo.py.
#   bash examples/demo.sh [--ablation] [--fresh] [--max-update N] ...
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python examples/demo.py "$@"
