#!/usr/bin/env bash
# The test command. Installs what the tests need, then runs them in both tested environments:
#   A  the full suite in .venv (scripts/install.sh: Python 3.11, fairseq-fixed, hydra 1.3, torch 2.14);
#   B  the tests marked env_b (every module but the end-to-end demo and the two-process gradient test,
#      see tests/conftest.py) in the existing-fairseq environment (scripts/install_env_b.sh: Python 3.10,
#      fairseq from source, hydra 1.0.7, omegaconf 2.0.6, torch 2.4), with the project on PYTHONPATH
#      as a user of such an environment runs it.
# Environment B is built (first run on a machine: mostly downloading) while A installs and tests.
# Arguments go to pytest in both. CMD_PLUGIN_TEST_ENVS="a" or "b" runs one of them only.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
ENVS=${CMD_PLUGIN_TEST_ENVS:-a b}
VENV_B=${CMD_PLUGIN_VENV_B:-${CMD_PLUGIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cmd_plugin}/venv-b}
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

install_b_log=""
if [[ " $ENVS " == *" b "* ]]; then
  install_b_log=$(mktemp)
  ( start=$SECONDS; bash scripts/install_env_b.sh "$VENV_B"; rc=$?
    echo "install_b_seconds=$((SECONDS - start)) install_b_rc=$rc" ) > "$install_b_log" 2>&1 &
  install_b_pid=$!
fi

if [[ " $ENVS " == *" a "* ]]; then
  echo "== environment A: install (.venv), full suite"
  if timed "install A" bash scripts/install.sh; then
    timed "suite A" .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
  fi
fi

if [ -n "$install_b_log" ]; then
  echo "== environment B: install ($VENV_B), tests marked env_b"
  start=$SECONDS
  wait "$install_b_pid"
  # pip's notes about this machine's unused local index directories are left out
  grep -v "^WARNING: Location 'file:" "$install_b_log" | grep -v "^install_b_seconds="
  result=$(grep "^install_b_seconds=" "$install_b_log" | tail -1)
  rm -f "$install_b_log"
  b_seconds=${result#install_b_seconds=}; b_seconds=${b_seconds%% *}
  times+=("install B ${b_seconds:-?}s (waited $((SECONDS - start))s)")
  if [ "${result##*install_b_rc=}" = 0 ]; then
    timed "suite B" suite_b "$@"
  else
    echo "FAILED: install B" >&2
    status=1
  fi
fi

echo "times: ${times[*]}"
exit $status
