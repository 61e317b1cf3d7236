#!/usr/bin/env bash
# The test command. Installs what the tests need, checks lint and formatting (ruff, configured in
# pyproject.toml; seconds), then runs the tests in both tested environments:
#   A  the full suite in .venv (scripts/install.sh: Python 3.11, fairseq-fixed, hydra 1.3, torch 2.14);
#   B  the tests marked env_b (every module but the end-to-end demo and the two-process gradient test,
#      see tests/conftest.py) in the existing-fairseq environment (scripts/install_env_b.sh: Python 3.10,
#      fairseq from source, hydra 1.0.7, omegaconf 2.0.6, torch 2.4), with the project on PYTHONPATH
#      as a user of such an environment runs it.
# Environment B is built (first run on a machine: mostly downloading) while A installs and tests.
# It is built from fairseq's source (scripts/fairseq_source.sh: CMD_PLUGIN_FAIRSEQ_SRC); when none is
# given or found, B is skipped with a message saying so, and the run passes on A alone. It fails instead
# when B was asked for (CMD_PLUGIN_TEST_ENVS naming b, or a CMD_PLUGIN_FAIRSEQ_SRC that does not exist:
# .ci/run passes the source explicitly).
# Arguments go to pytest in both. CMD_PLUGIN_TEST_ENVS="a" or "b" runs one of them only.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
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

plan_env_b() {  # decides whether environment B runs: sets ENVS, exports CMD_PLUGIN_FAIRSEQ_SRC; 1: cannot run
  [[ " $ENVS " == *" b "* ]] || return 0
  local src rc
  src=$(bash scripts/fairseq_source.sh)
  rc=$?
  if [ $rc -eq 0 ]; then
    export CMD_PLUGIN_FAIRSEQ_SRC=$src
    return 0
  fi
  if [ $rc -eq 3 ] && [ -z "${CMD_PLUGIN_TEST_ENVS:-}" ]; then
    ENVS=${ENVS//b/}
    times+=("B skipped")
    echo "== environment B SKIPPED: no fairseq source to build it from (see above). Only environment A" \
         "is tested. To test B as well: CMD_PLUGIN_FAIRSEQ_SRC=/path/to/fairseq-source bash scripts/run_tests.sh"
    return 0
  fi
  local asked=()
  [ -z "${CMD_PLUGIN_TEST_ENVS:-}" ] || asked+=("CMD_PLUGIN_TEST_ENVS=$CMD_PLUGIN_TEST_ENVS")
  [ -z "${CMD_PLUGIN_FAIRSEQ_SRC:-}" ] || asked+=("CMD_PLUGIN_FAIRSEQ_SRC=$CMD_PLUGIN_FAIRSEQ_SRC")
  echo "FAILED: environment B was asked for (${asked[*]}) but cannot be built; nothing was run" >&2
  return 1
}

lint() {  # ruff's lint and format checks over the whole checkout, as pre-commit runs them
  echo "== lint: ruff check, ruff format --check"
  .venv/bin/ruff check --no-cache . && .venv/bin/ruff format --check --no-cache .
}

suite_b() {
  env PYTHONPATH="$PWD" PATH="$VENV_B/bin:$PATH" "$VENV_B/bin/python" -m pytest -q -p no:cacheprovider -m env_b tests "$@"
  local rc=$?
  # pytest's 5 (nothing collected): the arguments named no env_b test
  if [ $rc -eq 5 ] && [ $# -gt 0 ]; then echo "(no env_b test among: $*)"; return 0; fi
  return $rc
}

main() {
  plan_env_b || exit 1

  local install_b_log="" install_b_pid start result b_seconds
  if [[ " $ENVS " == *" b "* ]]; then
    install_b_log=$(mktemp)
    ( start=$SECONDS; bash scripts/install_env_b.sh "$VENV_B"; rc=$?
      echo "install_b_seconds=$((SECONDS - start)) install_b_rc=$rc" ) > "$install_b_log" 2>&1 &
    install_b_pid=$!
  fi

  if [[ " $ENVS " == *" a "* ]]; then
    echo "== environment A: install (.venv), full suite"
    if timed "install A" bash scripts/install.sh; then
      timed "lint" lint
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
  if [[ " ${times[*]} " == *" B skipped "* ]]; then
    echo "(environment B was skipped: set CMD_PLUGIN_FAIRSEQ_SRC to test it)"
  fi
  exit $status
}

# sourced (tests/test_run_tests_script.py), only the functions are defined
[[ "${BASH_SOURCE[0]}" != "$0" ]] || main "$@"
