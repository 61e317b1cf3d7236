"""scripts/run_tests.sh without environment B's fairseq source: A alone with a message, unless B was asked for.

The scripts run for real in a copy of the clone's scripts in a temporary directory (so that nothing
lies beside it); every case decides before anything is installed.
"""

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_NAME = "fairseq-main-3d262bb.tar.gz"


@pytest.fixture
def clone(tmp_path):
    """A clone's scripts and .ci in tmp_path/clone, with nothing beside it; caches in tmp_path/cache."""
    root = tmp_path / "clone"
    shutil.copytree(os.path.join(REPO, "scripts"), root / "scripts")
    shutil.copytree(os.path.join(REPO, ".ci"), root / ".ci")
    shutil.copytree(os.path.join(REPO, "constraints"), root / "constraints")
    (tmp_path / "cache").mkdir()
    return root


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMD_PLUGIN_") and k != "CI"}
    env.update(CMD_PLUGIN_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path), **extra)
    return env


def _plan(clone, env):
    """run_tests.sh's decision, sourced: ENVS, the source it exports, and the times line so far."""
    script = (
        "source scripts/run_tests.sh; plan_env_b; rc=$?; "
        'echo "rc=$rc"; echo "ENVS=$ENVS"; echo "SRC=${CMD_PLUGIN_FAIRSEQ_SRC:-}"; echo "times=${times[*]}"'
    )
    proc = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=60)
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line and not line.startswith("=="))
    return proc, values


def _nothing_installed(clone, tmp_path):
    assert not (clone / ".venv").exists()
    assert os.listdir(tmp_path / "cache") == []


def test_without_a_fairseq_source_b_is_skipped_with_a_message_naming_the_variable(clone, tmp_path):
    proc, plan = _plan(clone, _env(tmp_path))
    assert plan["rc"] == "0", proc.stderr
    assert plan["ENVS"].split() == ["a"] and plan["SRC"] == ""
    assert "environment B SKIPPED" in proc.stdout and "CMD_PLUGIN_FAIRSEQ_SRC=" in proc.stdout
    assert "no fairseq source for environment B" in proc.stderr
    # the times line says so, and claims no install of B
    assert plan["times"] == "B skipped"
    _nothing_installed(clone, tmp_path)


def test_a_source_beside_the_clone_or_named_runs_b(clone, tmp_path):
    vendor = tmp_path / "shared" / "vendor"
    vendor.mkdir(parents=True)
    (vendor / SOURCE_NAME).write_bytes(b"")
    proc, plan = _plan(clone, _env(tmp_path))
    assert plan["rc"] == "0" and plan["ENVS"].split() == ["a", "b"], proc.stderr
    assert plan["SRC"] == str(vendor / SOURCE_NAME) and "SKIPPED" not in proc.stdout

    checkout = tmp_path / "src" / "fairseq"  # a checkout directory, named by a relative path
    checkout.mkdir(parents=True)
    proc, plan = _plan(clone, _env(tmp_path, CMD_PLUGIN_FAIRSEQ_SRC="../src/fairseq"))
    assert plan["rc"] == "0" and plan["ENVS"].split() == ["a", "b"], proc.stderr
    assert plan["SRC"] == str(checkout)  # absolute: install_env_b.sh runs elsewhere


@pytest.mark.parametrize(
    "asked",
    [
        {"CMD_PLUGIN_TEST_ENVS": "b"},
        {"CMD_PLUGIN_TEST_ENVS": "a b"},
        {"CMD_PLUGIN_FAIRSEQ_SRC": "/no/such/fairseq.tar.gz"},
    ],
)
def test_b_asked_for_without_its_source_fails_before_installing_anything(clone, tmp_path, asked):
    proc = subprocess.run(
        ["bash", "scripts/run_tests.sh"],
        cwd=clone,
        env=_env(tmp_path, **asked),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "environment B was asked for" in proc.stderr and "nothing was run" in proc.stderr
    if "CMD_PLUGIN_FAIRSEQ_SRC" in asked:
        assert "/no/such/fairseq.tar.gz: no such file or directory" in proc.stderr
    assert "== environment A" not in proc.stdout
    _nothing_installed(clone, tmp_path)


def test_ci_run_fails_without_the_source_beside_the_clone(clone, tmp_path):
    proc = subprocess.run(
        ["bash", ".ci/run"], cwd=clone, env=_env(tmp_path, CI="true"), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert f"{tmp_path}/clone/../shared/vendor/{SOURCE_NAME}: no such file or directory" in proc.stderr
    _nothing_installed(clone, tmp_path)


def test_ci_run_calls_exactly_the_readme_test_command():
    with open(os.path.join(REPO, ".ci", "run")) as f:
        commands = [
            line for line in f.read().splitlines() if line and not line.startswith(("#", "set ", "cd ", "export "))
        ]
    assert commands == ["bash scripts/run_tests.sh"]
    with open(os.path.join(REPO, "README.md")) as f:
        assert "bash scripts/run_tests.sh" in f.read().split("\n## ", 1)[0]


def test_install_env_b_without_a_source_names_the_variable_and_builds_nothing(clone, tmp_path):
    proc = subprocess.run(
        ["bash", "scripts/install_env_b.sh", str(tmp_path / "cache" / "venv-b")],
        cwd=clone,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "set CMD_PLUGIN_FAIRSEQ_SRC" in proc.stderr and "environment B not built" in proc.stderr
    _nothing_installed(clone, tmp_path)
