"""Make ``fairseq-hydra-train --config-dir DIR`` read ``DIR/config.yaml``.

fairseq-hydra-train's primary config is named ``config`` and fairseq ships its own
``fairseq/config/config.yaml``, which hydra finds before anything added by ``--config-dir``.
Hydra adds the ``--config-dir`` entry after search-path plugins ran, behind the app's own
config directory; so this plugin reads ``--config-dir`` with hydra's own argument parser and
puts that directory first, for fairseq's entry point only (hydra's supported way to change
the search path).

Behind that directory it puts ``cmd_plugin/config``, which holds the ``method`` config group shared
by every corpus (``method=sic|cmd|c2f|c2f_cmd``; the corpus configs select ``cmd`` by default), and
it refuses the spellings of before that group (``+method=...``, ``+ablation=no_cmd``) with the new one:
hydra's own message for them does not name it.

It also registers the OmegaConf resolver ``${cmd_plugin_dir:}``, the directory of the installed
``cmd_plugin`` package, so configs can set ``common.user_dir`` from any working directory.
"""

import importlib.util
import os
import sys

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

# spellings of before the method group -> the override that replaces them (any "+method=X" -> "method=X")
OLD_SPELLINGS = {"+ablation=no_cmd": "method=sic"}


def _package_dir():
    """The directory of the importable ``cmd_plugin`` package, found without importing it; None if none."""
    spec = importlib.util.find_spec("cmd_plugin")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.abspath(list(spec.submodule_search_locations)[0])


def cmd_plugin_dir() -> str:
    package = _package_dir()
    if package is None:
        raise RuntimeError("cmd_plugin is not installed in this environment: run scripts/install.sh")
    return package


def _register_resolver():
    # cmd_plugin.compat bridges omegaconf 2.0 (fairseq from source) and 2.1+; it is loaded from
    # its file so that this plugin, imported by hydra for every application, never imports
    # cmd_plugin itself (whose __init__ checks the fairseq installation)
    package = _package_dir()
    if package is None:
        return  # ${cmd_plugin_dir:} then fails with omegaconf's "unknown resolver" if used
    path = os.path.join(package, "compat.py")
    compat_spec = importlib.util.spec_from_file_location("_cmd_plugin_compat_for_hydra", path)
    compat = importlib.util.module_from_spec(compat_spec)
    compat_spec.loader.exec_module(compat)
    compat.register_resolver("cmd_plugin_dir", cmd_plugin_dir)


_register_resolver()


def _command_line():
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    return args


def refuse_old_spellings(overrides) -> None:
    """Exit with a message naming the new spelling of every old one among ``overrides``.

    Hydra's own messages for ``+method=c2f`` do not give the command-line spelling (1.0: "Could not
    add 'method=c2f'. 'method' is already in the defaults list"; >= 1.1: "Multiple values for method.
    To override a value use 'override method: c2f'"). Search-path plugins run outside the part of
    hydra that reports errors as one message, so this exits with its message (SystemExit: status 1,
    no traceback) rather than raising a hydra error."""
    old = [o for o in overrides if o in OLD_SPELLINGS or o.startswith("+method=")]
    if old:
        new = [OLD_SPELLINGS.get(o, o[1:]) for o in old]
        raise SystemExit(
            f"{' '.join(old)}: the method is now a config group with a default (cmd); write "
            f"{' '.join(new)} instead (method=sic|cmd|c2f|c2f_cmd, no '+'; cmd_plugin/config/method/)"
        )


class ConfigDirFirstSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        is_fairseq = any(
            e.provider == "main" and e.path.rstrip("/").endswith(os.path.join("fairseq", "config"))
            for e in search_path.get_path()
        )
        if not is_fairseq:
            return
        args = _command_line()
        refuse_old_spellings(args.overrides)
        path = search_path.get_path()
        if args.config_dir:
            path.insert(0, _element("cmd_plugin", f"file://{os.path.abspath(args.config_dir)}"))
        # the shared method group, behind the corpus config's directory (which could shadow an option)
        package = _package_dir()
        if package is not None:
            path.insert(
                1 if args.config_dir else 0, _element("cmd_plugin", f"file://{os.path.join(package, 'config')}")
            )


def _element(provider: str, path: str):
    from hydra.core.config_search_path import SearchPathElement

    return SearchPathElement(provider, path)
