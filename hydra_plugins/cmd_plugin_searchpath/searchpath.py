"""Make ``fairseq-hydra-train --config-dir DIR`` read ``DIR/config.yaml``.

fairseq-hydra-train's primary config is named ``config`` and fairseq ships its own
``fairseq/config/config.yaml``, which hydra finds before anything added by ``--config-dir``.
This plugin moves the ``--config-dir`` entry to the front of the search path, so the user's
``config.yaml`` wins (hydra's supported way to change the search path).

It also registers the OmegaConf resolver ``${cmd_plugin_dir:}``, the directory of the installed
``cmd_plugin`` package, so configs can set ``common.user_dir`` from any working directory.
"""

import importlib.util
import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf


def cmd_plugin_dir() -> str:
    spec = importlib.util.find_spec("cmd_plugin")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("cmd_plugin is not installed in this environment: run scripts/install.sh")
    return os.path.abspath(list(spec.submodule_search_locations)[0])


if not OmegaConf.has_resolver("cmd_plugin_dir"):
    OmegaConf.register_new_resolver("cmd_plugin_dir", cmd_plugin_dir)


class ConfigDirFirstSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        entries = search_path.get_path()
        user_dirs = [e for e in entries if e.provider == "command-line"]
        for entry in user_dirs:
            entries.remove(entry)
        for entry in reversed(user_dirs):
            entries.insert(0, entry)
