"""Version shims: the one place where cmd_plugin adapts to the fairseq environment it runs in.

Two environments are tested (docs/compatibility.md):

* A, a fresh one: Python 3.11, torch 2.14, fairseq-fixed 0.12.3.1, hydra-core 1.3, omegaconf 2.3;
* B, an existing fairseq workflow: Python 3.10, torch 2.4, fairseq main installed from source
  (reports 0.12.2), hydra-core 1.0.7, omegaconf 2.0.6.

This module imports neither fairseq nor hydra at import time, so ``cmd_plugin/__init__.py`` can
check the environment before anything heavy loads.
"""

import contextlib
import importlib.metadata
import importlib.util
import os
import pickletools
import re
import zipfile
from typing import Callable, Iterable, List, Optional, Tuple

# The oldest versions cmd_plugin is tested with (environment B). fairseq main and the 0.12.2
# release both report 0.12.2; fairseq-fixed reports 0.12.3.1.
MIN_FAIRSEQ = (0, 12, 2)
MIN_HYDRA = (1, 0, 7)
MIN_OMEGACONF = (2, 0, 6)
FAIRSEQ_NEEDED = (
    "fairseq >= 0.12.2 (fairseq installed from source, e.g. `pip install --no-build-isolation -e .` in a "
    "fairseq checkout, or `pip install cmd_plugin[fairseq]` for the fairseq-fixed distribution) with "
    "hydra-core >= 1.0.7 and omegaconf >= 2.0.6"
)


class IncompatibleEnvironment(ImportError):
    """The installed fairseq (or its hydra/omegaconf) cannot run cmd_plugin; the message says why."""


def version_tuple(version: str) -> Tuple[int, ...]:
    """'0.12.3.1' -> (0, 12, 3, 1); '2.4.1+cu121' -> (2, 4, 1); '1.0.7.dev0' -> (1, 0, 7)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(piece):
            break
    return tuple(parts)


def _distribution_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def fairseq_distributions() -> List[str]:
    """'name version' of every installed distribution that ships the top-level ``fairseq`` package."""
    found = set()
    for dist in importlib.metadata.distributions():
        top_level = dist.read_text("top_level.txt")
        if top_level is not None:
            provides = "fairseq" in top_level.split()
        elif "fairseq" in (dist.metadata["Name"] or "").lower():
            # no top_level.txt (not built by setuptools): read its file list, only for likely ones,
            # as reading every distribution's RECORD takes ~0.5 s
            provides = any(f.parts == ("fairseq", "__init__.py") for f in dist.files or [])
        else:
            provides = False
        if provides:
            found.add(f"{dist.metadata['Name']} {dist.version}")
    return sorted(found)


def find_fairseq() -> Tuple[Optional[str], Optional[str]]:
    """(directory of the importable ``fairseq`` package, its version as ``fairseq.__version__`` gives it),
    found without importing fairseq; (None, None) when there is none."""
    spec = importlib.util.find_spec("fairseq")
    if spec is None or not spec.submodule_search_locations:
        return None, None
    location = list(spec.submodule_search_locations)[0]
    # fairseq/__init__.py takes __version__ from version.py (written by its setup.py), else
    # from version.txt (a source checkout)
    try:
        with open(os.path.join(location, "version.py"), encoding="utf-8") as f:
            match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", f.read(), re.M)
        if match:
            return location, match.group(1)
    except OSError:
        pass
    try:
        with open(os.path.join(location, "version.txt"), encoding="utf-8") as f:
            return location, f.read().strip()
    except OSError:
        return location, None


def check_environment() -> None:
    """Raise :class:`IncompatibleEnvironment` naming what was found and what is needed, unless the
    importable ``fairseq`` package and its config libraries are versions cmd_plugin runs with.

    Any distribution may provide ``fairseq`` (a source install, fairseq-fixed, a checkout on
    PYTHONPATH); only the package's own version counts. Two distributions both shipping
    ``fairseq`` overwrite each other's files, so that is refused too.
    """
    location, version = find_fairseq()
    if location is None:
        raise IncompatibleEnvironment(f"cmd_plugin needs {FAIRSEQ_NEEDED}; found: no `fairseq` package")
    if version is None or version_tuple(version) < MIN_FAIRSEQ:
        raise IncompatibleEnvironment(
            f"cmd_plugin needs {FAIRSEQ_NEEDED}; found: fairseq {version or '(no version.txt)'} at {location}"
        )
    dists = fairseq_distributions()
    if len(dists) > 1:
        raise IncompatibleEnvironment(
            f"cmd_plugin needs one installation of the `fairseq` package; found {len(dists)} distributions "
            f"installing it into the same place: {', '.join(dists)} (fairseq {version} at {location}). "
            "Uninstall all but one (`pip uninstall ...`) and reinstall the one you keep."
        )
    for dist, minimum in (("hydra-core", MIN_HYDRA), ("omegaconf", MIN_OMEGACONF)):
        found = _distribution_version(dist)
        if found is None or version_tuple(found) < minimum:
            raise IncompatibleEnvironment(
                f"cmd_plugin needs {FAIRSEQ_NEEDED}; found: fairseq {version} at {location} with "
                f"{dist} {found or '(not installed)'}"
            )


# ---------------------------------------------------------------- hydra / omegaconf


def hydra_version() -> Tuple[int, ...]:
    """(1, 0, 7) for fairseq from source; hydra < 1.1 has no ``--resolve`` for ``--cfg job``."""
    import hydra

    return version_tuple(hydra.__version__)


def omegaconf_version() -> Tuple[int, ...]:
    import omegaconf

    return version_tuple(omegaconf.__version__)


def env_resolver() -> str:
    """Name of omegaconf's environment-variable resolver: ``oc.env`` (2.1+) or ``env`` (2.0),
    as in ``distributed_training.distributed_rank=${oc.env:RANK}``."""
    return "oc.env" if omegaconf_version() >= (2, 1) else "env"


def register_resolver(name: str, resolver: Callable[[], str]) -> None:
    """Register a resolver without arguments, ``${name:}``, once per process.

    omegaconf >= 2.1: ``register_new_resolver`` (``has_resolver`` tells if it exists).
    omegaconf 2.0: only ``register_resolver``, which raises on a second registration, has no
    ``has_resolver`` (``get_resolver`` returns None instead), and calls the resolver with the
    text after the colon split on commas: no arguments for ``${name:}``.
    """
    from omegaconf import OmegaConf

    if hasattr(OmegaConf, "has_resolver"):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    elif OmegaConf.get_resolver(name) is None:
        OmegaConf.register_resolver(name, resolver)


# ---------------------------------------------------------------- torch checkpoints


def safe_globals(objects: Iterable):
    """``torch.serialization.safe_globals(objects)`` (torch >= 2.5). torch 2.4 only has the
    process-wide ``add_safe_globals``: the list is restored on exit, so the allow-list stays
    scoped as on newer torch."""
    import torch

    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(list(objects))
    return _scoped_safe_globals(list(objects))


@contextlib.contextmanager
def _scoped_safe_globals(objects: list):
    import torch

    before = list(torch.serialization.get_safe_globals())
    torch.serialization.add_safe_globals(objects)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def unsafe_globals_in_checkpoint(path: str) -> List[str]:
    """'module.name' of every class/function pickled in the torch checkpoint ``path`` that
    ``torch.load(weights_only=True)`` refuses unless allow-listed: torch >= 2.5's
    ``torch.serialization.get_unsafe_globals_in_checkpoint``, else :func:`scan_unsafe_globals`."""
    import torch

    if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    return scan_unsafe_globals(path)


def scan_unsafe_globals(path: str) -> List[str]:
    """For torch 2.4, which has no ``get_unsafe_globals_in_checkpoint``: the globals of the
    checkpoint's pickle (read without unpickling), minus those the weights-only unpickler allows
    by default and those added with ``add_safe_globals``. Sorted 'module.name' strings.
    Raises ``ValueError`` for a file that is not a zip-format torch checkpoint."""
    import torch
    from torch import _weights_only_unpickler

    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pickles:
                raise ValueError(f"{path}: no data.pkl inside: not a torch checkpoint")
            data = archive.read(pickles[0])
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path}: not a zip-format torch checkpoint ({err})") from err
    allowed = set(_weights_only_unpickler._get_allowed_globals())
    for entry in torch.serialization.get_safe_globals():
        # an entry is a class/function, or (class/function, "module.name") on newer torch
        allowed.add(entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}")
    return sorted(g for g in pickle_globals(data) if g not in allowed)


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def pickle_globals(data: bytes) -> List[str]:
    """'module.name' of every global a pickle refers to (GLOBAL, INST and STACK_GLOBAL opcodes),
    read with pickletools without executing anything."""
    found = set()
    memo, recent = {}, []  # strings only: STACK_GLOBAL takes the last two pushed
    last_string = None
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ")
            found.add(f"{module}.{attr}")
        elif name in _STRING_OPS:
            last_string = arg
            recent.append(arg)
            continue
        elif name == "MEMOIZE":
            memo[len(memo)] = last_string
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = last_string
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            value = memo.get(int(arg))
            if isinstance(value, str):
                last_string = value
                recent.append(value)
                continue
        elif name == "STACK_GLOBAL" and len(recent) >= 2:
            found.add(f"{recent[-2]}.{recent[-1]}")
        last_string = None
    return sorted(found)


def fix_hubert_ctc_config() -> bool:
    """Give fairseq's ``hubert_ctc`` config the ``autoregressive`` field its encoder reads.

    ``HubertEncoder.__init__`` reads ``cfg.autoregressive``, which only ``HubertSeq2SeqConfig``
    declares, so fairseq's own CTC fine-tuning recipe (``examples/hubert/config/finetune``) and any
    load of a ``hubert_ctc`` checkpoint stop with "Key 'autoregressive' not in 'HubertCtcConfig'"
    (fairseq issue 4916; the fix proposed there, PR 4917, was never merged). This registers a
    subclass of the config with the field, default False (CTC is not autoregressive), under the
    same model name. Returns True if it patched, False where fairseq already has the field.
    """
    import dataclasses

    from fairseq.models import MODEL_DATACLASS_REGISTRY
    from fairseq.models.hubert import hubert_asr

    original = MODEL_DATACLASS_REGISTRY.get("hubert_ctc")
    if original is None or "autoregressive" in original.__dataclass_fields__:
        return False

    @dataclasses.dataclass
    class HubertCtcConfig(original):
        autoregressive: bool = dataclasses.field(
            default=False, metadata={"help": "always False for CTC (added by cmd_plugin: fairseq issue 4916)"}
        )

    HubertCtcConfig.__module__ = original.__module__
    MODEL_DATACLASS_REGISTRY["hubert_ctc"] = HubertCtcConfig
    hubert_asr.HubertCtc.__dataclass = HubertCtcConfig
    return True
