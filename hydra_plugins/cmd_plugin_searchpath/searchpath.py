"""Make ``fairseq-hydra-train --config-dir DIR`` read ``DIR/config.yaml``.

fairseq-hydra-train's primary config is named ``config`` and fairseq ships its own
``fairseq/config/config.yaml``, which hydra finds before anything added by ``--config-dir``.
Hydra adds the ``--config-dir`` entry after search-path plugins ran, behind the app's own
config directory; so this plugin reads ``--config-dir`` with hydra's own argument parser and
puts that directory first, for fairseq's entry point only (hydra's supported way to change
the search path).

It also registers the OmegaConf resolver ``${cmd_plugin_dir:}``, the directory of the installed
``cmd_plugin`` package, so configs can set ``common.user_dir`` from any working directory.
"""

import importlib.util
import os
import sys

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def cmd_plugin_dir() -> str:
    spec = importlib.util.find_spec("cmd_plugin")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("cmd_plugin is not installed in this environment: run scripts/install.sh")
    return os.path.abspath(list(spec.submodule_search_locations)[0])


def _register_resolver():
    # cmd_plugin.compat bridges omegaconf 2.0 (fairseq from source) and 2.1+; it is loaded from
    # its file so that this plugin, imported by hydra for every application, never imports
    # cmd_plugin itself (whose __init__ checks the fairseq installation)
    spec = importlib.util.find_spec("cmd_plugin")
    if spec is None or not spec.submodule_search_locations:
        return  # ${cmd_plugin_dir:} then fails with omegaconf's "unknown resolver" if used
    path = os.path.join(list(spec.submodule_search_locations)[0], "compat.py")
    compat_spec = importlib.util.spec_from_file_location("_cmd_plugin_compat_for_hydra", path)
    compat = importlib.util.module_from_spec(compat_spec)
    compat_spec.loader.exec_module(compat)
    compat.register_resolver("cmd_plugin_dir", cmd_plugin_dir)


_register_resolver()


def _command_line_config_dir():
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    return args.config_dir


class ConfigDirFirstSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        is_fairseq = any(
            e.provider == "main" and e.path.rstrip("/").endswith(os.path.join("fairseq", "config"))
            for e in search_path.get_path()
        )
        config_dir = _command_line_config_dir() if is_fairseq else None
        if config_dir:
            search_path.get_path().insert(0, _element("cmd_plugin", f"file://{os.path.abspath(config_dir)}"))


def _element(provider: str, path: str):
    from hydra.core.config_search_path import SearchPathElement

    return SearchPathElement(provider, path)
