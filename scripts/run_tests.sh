#!/usr/bin/env bash
# The test command. Installs what the tests need, then runs them in both tested environments:
#   A  the full suite in .venv (scripts/install.sh: Python 3.11, fairseq-fixed, hydra 1.3, torch 2.14);
#   B  the tests marked env_b (literal training + resume, two gloo workers, config composition,
#      eval_recall, packaging, ...) in the existing-fairseq environment (scripts/install_env_b.sh:
#      Python 3.10, fairseq from source, hydra 1.0.7, omegaconf 2.0.6, torch 2.4), with the project
#      on PYTHONPATH as a user of such an environment runs it.
# Arguments go to pytest in both. CMD_PLUGIN_TEST_ENVS="a" or "b" runs one of them only.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
ENVS=${CMD_PLUGIN_TEST_ENVS:-a b}
status=0
times=()

timed() {  # timed LABEL COMMAND...: run, record the wall time, remember a failure
  local label=$1 start=$SECONDS rc
  shift
  "$@"
  rc=$?
  times+=("$label $((SECONDS - start))s")
  [ $rc -eq 0 ] || { echo "FAILED ($rc): $label" >&2; status=1; }
  return $rc
}

suite_b() {
  env PYTHONPATH="$PWD" PATH="$VENV_B/bin:$PATH" "$VENV_B/bin/python" -m pytest -q -p no:cacheprovider -m env_b tests "$@"
  local rc=$?
  # pytest's 5 (nothing collected): the arguments named no env_b test
  if [ $rc -eq 5 ] && [ $# -gt 0 ]; then echo "(no env_b test among: $*)"; return 0; fi
  return $rc
}

if [[ " $ENVS " == *" a "* ]]; then
  echo "== environment A: install (.venv), full suite"
  if timed "install A" bash scripts/install.sh; then
    timed "suite A" .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
  fi
fi

if [[ " $ENVS " == *" b "* ]]; then
  VENV_B=${CMD_PLUGIN_VENV_B:-${CMD_PLUGIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cmd_plugin}/venv-b}
  echo "== environment B: install ($VENV_B), tests marked env_b"
  if timed "install B" bash scripts/install_env_b.sh "$VENV_B"; then
    timed "suite B" suite_b "$@"
  fi
fi

echo "times: ${times[*]}"
exit $status
