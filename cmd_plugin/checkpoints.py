"""Checkpoint files: untrusted loading refused, interrupted saving harmless.

Loading. A checkpoint is a pickle, and ``torch.load(weights_only=False)`` runs whatever code the
file names. Every checkpoint the project reads goes through :func:`load_checkpoint_state`:
``weights_only=True`` with an explicit allow-list of the classes fairseq checkpoints pickle
(:data:`FAIRSEQ_CHECKPOINT_GLOBALS`), inside fairseq's own ``load_checkpoint_to_cpu`` (its config
handling and state upgrades, whatever fairseq version is installed). A file that pickles anything else is
refused with the class named; there is no fallback to unsafe loading. Works on torch 2.4
(``add_safe_globals`` only) as on later versions (``safe_globals`` context manager,
``get_unsafe_globals_in_checkpoint``).

Saving. fairseq writes the first checkpoint of a save atomically (``<name>.tmp`` then rename)
but makes the others (``checkpoint_best.pt``, ``checkpoint_last.pt``, ...) with
``PathManager.copy``, a plain ``shutil.copyfile``: a job killed during that copy leaves a
truncated ``checkpoint_last.pt``, and the restarted job fails to load it.
:func:`make_checkpoint_copies_atomic` makes those local copies write a temporary file in the
same directory and rename it into place, so the previous file stays whole until the new one is.
"""

import importlib
import logging
import os
import re
import zipfile
from typing import Any, Dict, List, Optional

import torch

from .files import atomic_copy

logger = logging.getLogger(__name__)

# The only classes a fairseq checkpoint may make the unpickler touch, besides tensors and plain
# containers (which torch allows by default). Each was seen in a fairseq checkpoint layout:
FAIRSEQ_CHECKPOINT_GLOBALS = (
    # task_state["dictionaries"] of HuBERT pre-training and fine-tuning checkpoints
    "fairseq.data.dictionary.Dictionary",
    # "args" of checkpoints from fairseq < 0.10 (and w2v_args of wav2vec 2.0 fine-tuned ones)
    "argparse.Namespace",
    # numpy values in metrics / extra_state
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Float32DType",
    "numpy.dtypes.Float16DType",
    "numpy.dtypes.Int64DType",
    "numpy.dtypes.Int32DType",
    "numpy.dtypes.BoolDType",
    # how pickle protocol 2 (torch.save before torch 2.5) writes the bytes of numpy values
    "_codecs.encode",
    # a "cfg" pickled as an omegaconf DictConfig instead of a plain dict
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "typing.Any",
    "collections.defaultdict",
    "builtins.dict",
    "builtins.list",
    "builtins.int",
)

_GLOBAL_IN_ERROR = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


class CheckpointError(ValueError):
    """A checkpoint that cannot be (safely) loaded or is not what was asked for; names the file."""


def _resolve(name: str):
    """The object a dotted name refers to, or None where this environment has no such name
    (e.g. ``numpy._core`` under numpy 1)."""
    module_name, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None


def _allow_list() -> List[Any]:
    """Entries for torch's safe-globals list. An object whose own dotted name differs from the
    listed one (a numpy 1 name read under numpy 2) is given as an (object, name) pair on torch
    >= 2.5; torch 2.4 takes objects only, and such a name is then not accepted."""
    pairs_supported = _torch_version() >= (2, 5)
    entries = []
    for name in FAIRSEQ_CHECKPOINT_GLOBALS:
        obj = _resolve(name)
        if obj is None:
            continue
        if f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}" == name:
            entries.append(obj)
        elif pairs_supported:
            entries.append((obj, name))
    return entries


def allow_fairseq_checkpoints_in_torch_load() -> None:
    """Let fairseq's own ``torch.load`` calls read fairseq checkpoints under torch >= 2.6.

    torch 2.6 made ``weights_only=True`` the default, and fairseq's ``load_checkpoint_to_cpu`` does
    not pass it: a HuBERT checkpoint (its ``task_state`` pickles fairseq's ``Dictionary``) then fails
    to load in fairseq's trainer -- on resume and when ``hubert_ctc`` reads its ``w2v_path``. Adding
    the allow-list above to torch's process-wide safe globals keeps the weights-only unpickler and
    admits exactly those classes. Called when fairseq imports the plugin (``common.user_dir``).
    """
    torch.serialization.add_safe_globals(_allow_list())


def _torch_version():
    return tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])


def _unsafe_globals(path: str) -> Optional[List[str]]:
    """Every global the file names that torch does not allow by default (torch >= 2.5), or None."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return None
    try:
        return list(finder(path))
    except Exception:  # not a zip checkpoint: the load below reports it
        return None


def safe_torch_load(path: str, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with the fairseq allow-list, on the CPU.

    Raises :class:`CheckpointError` naming ``path``: for a file that is not a torch checkpoint,
    and for one that pickles a class outside :data:`FAIRSEQ_CHECKPOINT_GLOBALS` (named).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    allowed = _allow_list()
    allowed_names = set(FAIRSEQ_CHECKPOINT_GLOBALS)
    unsafe = _unsafe_globals(path)
    if unsafe is not None:
        outside = [g for g in unsafe if g not in allowed_names]
        if outside:
            raise CheckpointError(_refusal(path, what, outside))
    context = getattr(torch.serialization, "safe_globals", None)
    try:
        if context is not None:
            with context(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        # torch 2.4: no context manager; the list only ever holds these explicit entries
        torch.serialization.add_safe_globals(allowed)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        named = _GLOBAL_IN_ERROR.findall(text)
        if named:
            raise CheckpointError(_refusal(path, what, named)) from None
        # a zip file is torch.save output whose content was rejected; anything else that fails
        # (text, a raw pickle, a truncated file) is simply not a PyTorch checkpoint
        if zipfile.is_zipfile(path) and ("weights_only" in text or "WeightsUnpickler" in text):
            raise CheckpointError(
                f"{path}: refusing to load this {what}: it holds pickled content that weights-only loading "
                f"rejects ({_short(text)}); fairseq checkpoints hold tensors, plain containers and "
                f"{', '.join(FAIRSEQ_CHECKPOINT_GLOBALS[:2])}"
            ) from None
        raise CheckpointError(
            f"{path} is not a fairseq checkpoint: not a readable PyTorch file ({type(err).__name__}: "
            f"{_short(text)}); expected a {what} written by torch.save (a truncated copy gives this error too)"
        ) from None


def _short(text: str) -> str:
    """The informative part of a torch.load error: torch's own advice to load unsafely is dropped."""
    text = text.split("WeightsUnpickler error:", 1)[-1].strip()
    first = text.splitlines()[0] if text else ""
    return first.split(". ")[0][:200]


def _refusal(path: str, what: str, names: List[str]) -> str:
    return (
        f"{path}: refusing to load this {what}: it pickles {', '.join(sorted(set(names)))}, which fairseq "
        "checkpoints do not hold, and unpickling it could run code from the file. Only tensors, plain "
        "containers and these classes are accepted: "
        + ", ".join(FAIRSEQ_CHECKPOINT_GLOBALS[:2])
        + ", numpy arrays/scalars, omegaconf configs"
    )


def _check_fairseq_layout(path: str, state) -> None:
    if not isinstance(state, dict) or "model" not in state or not ({"cfg", "args"} & set(state)):
        keys = sorted(map(str, state))[:8] if isinstance(state, dict) else []
        shown = f"a {type(state).__name__} with keys {keys}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CheckpointError(
            f"{path} is not a fairseq checkpoint: it holds {shown}, expected a dict with 'model' "
            "and 'cfg' (or 'args'), as fairseq's trainer writes"
        )


class _TorchWithSafeLoad:
    """Stands in for the ``torch`` module inside fairseq.checkpoint_utils: ``load`` is
    :func:`safe_torch_load` of one known file, everything else is torch's."""

    def __init__(self, path: str, what: str):
        self._path, self._what = path, what

    def __getattr__(self, name):
        return getattr(torch, name)

    def load(self, *args, **kwargs):
        state = safe_torch_load(self._path, self._what)
        _check_fairseq_layout(self._path, state)
        return state


def load_checkpoint_state(path: str, arg_overrides: Optional[Dict[str, Any]] = None, what: str = "checkpoint"):
    """``fairseq.checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides)`` -- fairseq's own
    config handling and state upgrades, for its installed version -- with its ``torch.load``
    replaced by :func:`safe_torch_load`. Raises :class:`CheckpointError` naming ``path`` for a
    file that is not a fairseq checkpoint (a plain state dict, an open_clip weights file, ...) or
    that pickles classes outside the allow-list."""
    from .quiet import import_fairseq

    import_fairseq()
    from fairseq import checkpoint_utils

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    real_torch = checkpoint_utils.torch
    checkpoint_utils.torch = _TorchWithSafeLoad(path, what)
    try:
        return checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides)
    except (KeyError, TypeError, AttributeError, IndexError) as err:  # fairseq's upgrade of a foreign dict
        raise CheckpointError(f"{path} is not a usable fairseq checkpoint ({type(err).__name__}: {err})") from err
    finally:
        checkpoint_utils.torch = real_torch


# ---------------------------------------------------------------- atomic copies


def _atomic_local_copy(src: str, dst: str) -> str:
    # <dst>.tmp, fairseq's own temporary name for checkpoint writes: a stale one is overwritten
    atomic_copy(src, dst, stable_temp=True)
    return dst


def make_checkpoint_copies_atomic() -> None:
    """Make fairseq's ``PathManager.copy`` of local files write-then-rename (idempotent).

    Remote paths (handled by iopath) keep fairseq's behaviour.
    """
    from fairseq.file_io import PathManager

    if getattr(PathManager.copy, "_cmd_plugin_atomic", False):
        return
    original = PathManager.copy

    def copy(src_path: str, dst_path: str, overwrite: bool = False):
        if PathManager.path_requires_pathmanager(dst_path) or PathManager.path_requires_pathmanager(src_path):
            return original(src_path, dst_path, overwrite=overwrite)
        if not overwrite and os.path.exists(dst_path):
            raise FileExistsError(dst_path)
        return _atomic_local_copy(src_path, dst_path)

    copy._cmd_plugin_atomic = True
    PathManager.copy = staticmethod(copy)
