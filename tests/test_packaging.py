"""Packaging that respects the user's environment: `pip install -e .` into an environment that already
has fairseq adds only cmd_plugin, and importing cmd_plugin names an incompatible fairseq clearly. The
distribution installs the packages cmd_plugin and cmd_demo (the demo's and tests' scaffolding) side by
side, and cmd_plugin never imports cmd_demo."""

import ast
import glob
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from cmd_plugin import compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pip_install_into_this_environment_adds_only_cmd_plugin(tmp_path):
    # offline (--no-index): every requirement must already be satisfied by what is installed, so
    # nothing of the user's (fairseq, torch, hydra) would be replaced or added
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--no-build-isolation",
            "--report",
            str(report),
            "-e",
            REPO,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    to_install = [
        item["metadata"]["name"].replace("_", "-").lower() for item in json.loads(report.read_text())["install"]
    ]
    assert to_install == ["cmd-plugin"], to_install


def test_the_wheel_installs_cmd_plugin_and_cmd_demo_and_nothing_of_the_checkout_besides(tmp_path):
    # built outside the checkout (build, bdist and egg-info dirs in tmp_path): no stale build/ can leak in
    egg, dist = tmp_path / "egg", tmp_path / "dist"
    egg.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "egg_info",
            "--egg-base",
            str(egg),
            "build",
            "--build-base",
            str(tmp_path / "build"),
            "bdist_wheel",
            "--bdist-dir",
            str(tmp_path / "bdist"),
            "--dist-dir",
            str(dist),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = dist.glob("cmd_plugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"cmd_plugin", "cmd_demo", "hydra_plugins"}
    for package in ("cmd_plugin", "cmd_demo", "hydra_plugins"):  # every module of the checkout's packages
        modules = glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True)
        modules += glob.glob(os.path.join(REPO, package, "config", "**", "*.yaml"), recursive=True)  # method group
        assert len(modules) > 1 and sorted(n for n in names if n.startswith(package + "/")) == sorted(
            os.path.relpath(m, REPO).replace(os.sep, "/") for m in modules
        )


def imported_modules(source: str, filename: str):
    """(line, module name) of every absolute import in ``source``, and of every ``import_module`` /
    ``__import__`` / ``find_spec`` call on a literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__", "find_spec") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_imported_modules_sees_every_way_of_importing_a_module():
    source = (
        "import os, cmd_demo.demo as d\nfrom cmd_demo import scene_corpus\nfrom . import quiet\n"
        "def f():\n    importlib.import_module('cmd_demo.ablation')\n    __import__('cmd_demo')\n"
    )
    assert imported_modules(source, "x.py") == [
        (1, "os"),
        (1, "cmd_demo.demo"),
        (2, "cmd_demo"),
        (5, "cmd_demo.ablation"),
        (6, "cmd_demo"),
    ]


def test_the_installed_plugin_never_imports_cmd_demo():
    # cmd_demo is the demo's and the tests' scaffolding: it may import cmd_plugin, never the reverse
    files = sorted(
        glob.glob(os.path.join(REPO, "cmd_plugin", "**", "*.py"), recursive=True)
        + glob.glob(os.path.join(REPO, "hydra_plugins", "**", "*.py"), recursive=True)
    )
    assert len(files) > 20
    offenders = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        offenders += [
            f"{os.path.relpath(path, REPO)}:{line}: imports {name}"
            for line, name in imported_modules(source, path)
            if name == "cmd_demo" or name.startswith("cmd_demo.")
        ]
    assert not offenders, "\n".join(offenders)


def _import_cmd_plugin(tmp_path, extra_path):
    """`import cmd_plugin` in a fresh interpreter with ``extra_path`` first on sys.path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(extra_path), REPO]))
    return subprocess.run(
        [sys.executable, "-c", "import cmd_plugin"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_an_old_fairseq_is_refused_naming_what_was_found_and_what_is_needed(tmp_path):
    old = tmp_path / "site" / "fairseq"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text("raise RuntimeError('the check must not import fairseq')\n")
    (old / "version.py").write_text('__version__ = "0.10.2"\n')
    proc = _import_cmd_plugin(tmp_path, tmp_path / "site")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "IncompatibleEnvironment" in last
    assert f"found: fairseq 0.10.2 at {old}" in last and "fairseq >= 0.12.2" in last


def test_two_distributions_of_the_fairseq_package_are_refused(tmp_path):
    # a second distribution that also installs the `fairseq` package (as fairseq-fixed over a source
    # install would): their files overwrite each other
    site = tmp_path / "site"
    info = site / "fairseq_other-0.12.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fairseq-other\nVersion: 0.12.9\n")
    (info / "top_level.txt").write_text("fairseq\nfairseq_cli\n")
    proc = _import_cmd_plugin(tmp_path, site)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "fairseq-other 0.12.9" in last and "Uninstall all but one" in last
    assert any(d in last for d in ("fairseq 0.12.2", "fairseq-fixed 0.12.3.1")), last


def test_this_environment_passes_the_check():
    location, version = compat.find_fairseq()
    import fairseq

    assert os.path.dirname(fairseq.__file__) == location and fairseq.__version__ == version
    compat.check_environment()


def test_version_tuple():
    assert compat.version_tuple("0.12.3.1") == (0, 12, 3, 1)
    assert compat.version_tuple("2.4.1+cu121") == (2, 4, 1)
    assert compat.version_tuple("1.0.7.dev0") == (1, 0, 7)
    assert compat.version_tuple("2.1.0rc1") == (2, 1, 0)


def test_resolver_registration_is_idempotent_in_this_omegaconf():
    from omegaconf import OmegaConf

    calls = []
    compat.register_resolver("cmd_plugin_test_dir", lambda: calls.append(1) or "/somewhere")
    compat.register_resolver("cmd_plugin_test_dir", lambda: "/elsewhere")  # kept: first one wins
    cfg = OmegaConf.create({"a": "${cmd_plugin_test_dir:}", "b": "${cmd_plugin_test_dir:}/tb"})
    assert OmegaConf.to_container(cfg, resolve=True) == {"a": "/somewhere", "b": "/somewhere/tb"}
    assert calls


def test_env_resolver_gives_an_int_rank(monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setenv("CMD_PLUGIN_TEST_RANK", "1")
    cfg = OmegaConf.create({"rank": "${%s:CMD_PLUGIN_TEST_RANK}" % compat.env_resolver()})
    assert OmegaConf.to_container(cfg, resolve=True)["rank"] in (1, "1")


class _Untrusted:
    pass


def test_safe_globals_is_scoped_and_lets_weights_only_load_an_allowed_class(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"x": _Untrusted(), "w": torch.ones(2)}, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    with compat.safe_globals([_Untrusted]):
        assert isinstance(torch.load(path, weights_only=True)["x"], _Untrusted)
    with pytest.raises(Exception):  # the allow-list did not outlive the block
        torch.load(path, weights_only=True)


def test_unsafe_globals_scan_agrees_with_torch(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"x": _Untrusted(), "d": {1: [torch.zeros(3)]}, "n": torch.nn.Linear(2, 2).state_dict()}, path)
    name = f"{__name__}._Untrusted"
    assert compat.scan_unsafe_globals(str(path)) == [name]
    assert compat.unsafe_globals_in_checkpoint(str(path)) == [name]
    if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == [name]
    with compat.safe_globals([_Untrusted]):
        assert compat.scan_unsafe_globals(str(path)) == []


def test_unsafe_globals_scan_refuses_a_file_that_is_not_a_torch_zip(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a zip-format torch checkpoint"):
        compat.scan_unsafe_globals(str(path))
    with zipfile.ZipFile(tmp_path / "y.pt", "w") as z:
        z.writestr("archive/other.txt", "x")
    with pytest.raises(ValueError, match="no data.pkl"):
        compat.scan_unsafe_globals(str(tmp_path / "y.pt"))


def test_pickle_globals_reads_stack_global_of_newer_protocols():
    import collections
    import pickle

    data = pickle.dumps([collections.OrderedDict(), textwrap.dedent, textwrap.dedent], protocol=4)
    assert compat.pickle_globals(data) == ["collections.OrderedDict", "textwrap.dedent"]


def test_pre_commit_runs_the_ruff_version_the_test_command_pins():
    with open(os.path.join(REPO, "constraints", "env-a.txt")) as f:
        pinned = next(line.split("==")[1].strip() for line in f if line.startswith("ruff=="))
    with open(os.path.join(REPO, ".pre-commit-config.yaml")) as f:
        hook = f.read()
    assert "astral-sh/ruff-pre-commit" in hook and f"rev: v{pinned}\n" in hook
