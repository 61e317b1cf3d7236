#!/usr/bin/env bash
# Build (or reuse) environment B: the "existing fairseq workflow" environment that cmd_plugin is also
# tested in — Python 3.10, fairseq main installed from source, hydra-core 1.0.7, omegaconf 2.0.6,
# torch 2.4.1 + torchvision 0.19.1 (versions in constraints/env-b.txt).
#
#   bash scripts/install_env_b.sh [VENV]   # default: $CMD_PLUGIN_VENV_B, else ~/.cache/cmd_plugin/venv-b
#
# fairseq's source: $CMD_PLUGIN_FAIRSEQ_SRC, a source archive (e.g. GitHub's archive of fairseq main at
# commit 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, the one tested) or a checkout; without it,
# ../shared/vendor/fairseq-main-3d262bb.tar.gz beside the clone if present (scripts/fairseq_source.sh).
# Caching between runs: the environment lives outside the clone, in $CMD_PLUGIN_CACHE (default
# ~/.cache/cmd_plugin), so every clone and CI run on a machine shares it; a stamp in it records what it
# was built from (fairseq source, constraints, this script) and a run with nothing changed returns in
# seconds. The fairseq wheel compiled here (C++/Cython extensions built against this torch) is kept
# there too, keyed by the source's checksum, Python and torch versions, so a rebuild does not recompile.
# cmd_plugin itself is NOT installed into it (it is shared by clones): run the project with it on
# PYTHONPATH (scripts/run_tests.sh does), or `pip install --no-build-isolation -e .` in your own env.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${CMD_PLUGIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cmd_plugin}
VENV=${1:-${CMD_PLUGIN_VENV_B:-$CACHE/venv-b}}
CONSTRAINTS=$ROOT/constraints/env-b.txt
PYVER=3.10.13

if ! SRC=$(bash "$ROOT/scripts/fairseq_source.sh"); then
  echo "install_env_b.sh: environment B not built" >&2
  exit 1
fi
if [ -d "$SRC" ]; then
  # a checkout: packed into an archive (what it is made of, without git's files or earlier build
  # outputs), so that its checksum names the source and pip builds a copy, leaving the checkout as it is
  packed_dir=$(mktemp -d)
  trap 'rm -rf "$packed_dir"' EXIT
  tar -C "$(dirname "$SRC")" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
      --exclude=.git --exclude=build --exclude='*.egg-info' --exclude=__pycache__ --exclude='*.so' \
      --transform 's,^[^/]*,fairseq,' -cf "$packed_dir/fairseq.tar" "$(basename "$SRC")"
  echo "packed the fairseq checkout $SRC"
  SRC=$packed_dir/fairseq.tar
fi

find_python() {
  if [ -n "${CMD_PLUGIN_PYTHON_B:-}" ]; then echo "$CMD_PLUGIN_PYTHON_B"; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    local p
    p="$(pyenv root)/versions/$PYVER/bin/python3.10"
    if [ -x "$p" ]; then echo "$p"; return; fi
  fi
  # a bare python3.10 may be a pyenv shim that refuses to run: check it really runs
  if python3.10 -c "" >/dev/null 2>&1; then command -v python3.10; return; fi
  echo "install_env_b.sh: no Python 3.10 found (pyenv install $PYVER, or set CMD_PLUGIN_PYTHON_B)" >&2
  exit 1
}

# one build at a time per environment (CI runs and clones share it)
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9

src_sum=$(sha256sum "$SRC" | cut -c1-16)
# what this environment is made of: a change to any of these rebuilds it
want="src=$src_sum constraints=$(sha256sum "$CONSTRAINTS" | cut -c1-16) script=$(sha256sum "$0" | cut -c1-16)"
stamp="$VENV/.cmd_plugin_env_b"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import fairseq, open_clip, pytest" >/dev/null 2>&1; then
  echo "environment B ready: $VENV"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$(find_python)" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q -c "$CONSTRAINTS")
"${PIP[@]}" "pip<24.1" wheel
# torch first (the registry's build, CUDA libraries included; it runs on the CPU), then fairseq compiled
# against it without build isolation, so its build does not fetch another torch.
"${PIP[@]}" torch torchvision torchaudio "numpy<2" cython
torch_ver=$("$PY" -c "import torch; print(torch.__version__)")
wheel_dir="$CACHE/wheels/fairseq-$src_sum-py$PYVER-torch$torch_ver"
if ! ls "$wheel_dir"/fairseq-*.whl >/dev/null 2>&1; then
  mkdir -p "$CACHE/wheels"
  tmp=$(mktemp -d "$CACHE/wheels/.build.XXXXXX")
  echo "compiling fairseq from $SRC (about 2 min)"
  "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$tmp" "$SRC"
  rm -rf "$wheel_dir" && mv "$tmp" "$wheel_dir"
fi
"${PIP[@]}" "$wheel_dir"/fairseq-*.whl
# what cmd_plugin needs beside fairseq, within the ranges setup.py declares, plus the test tools
"${PIP[@]}" open_clip_torch soundfile sentencepiece tqdm pillow tensorboard pytest pyyaml \
  scikit-learn npy-append-array editdistance   # fairseq's HuBERT recipe (the demo's upstream stage)
"$PY" -c "import fairseq, hydra, omegaconf, torch, open_clip; print('environment B:', 'fairseq', fairseq.__version__, 'hydra', hydra.__version__, 'omegaconf', omegaconf.__version__, 'torch', torch.__version__)"
echo "$want" > "$stamp"
echo "environment B ready: $VENV"
