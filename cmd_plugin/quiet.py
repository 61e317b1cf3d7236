"""Known-harmless messages of the libraries cmd_plugin calls, left out where cmd_plugin causes them.

A newcomer reads every warning as an alarm. These ones are expected and say nothing about the run:

* importing fairseq: recent torch deprecates ``torch.jit.script``, which fairseq applies to a few
  helpers at import (``FutureWarning: `torch.jit.script` is deprecated``); and fairseq's
  text-to-speech task logs ``Please install tensorboardX`` when it is imported. Only that task
  uses tensorboardX: fairseq's training curves (``common.tensorboard_logdir``) are written with
  ``torch.utils.tensorboard``, which needs the ``tensorboard`` package (``pip install tensorboard``,
  the ``tensorboard`` extra) and is tried first; tensorboardX is only its fallback.
* building fairseq's HuBERT: fairseq logs the whole task and model configuration at INFO (``current
  directory is``, ``HubertPretrainingTask Config {...}``, ``HubertModel Config: {...}``), and torch
  deprecates ``torch.nn.utils.weight_norm``, which HuBERT's positional convolution uses.
* building an open_clip model: open_clip logs each step at INFO (on the root logger); and when
  random weights are what is wanted (the tiny CLIP that make_tiny_encoders.py writes), its
  ``No pretrained weights loaded ... Model initialized randomly`` warning. When weights were asked
  for and not loaded, that warning is a real one and passes.
* fairseq's trainer lists parameters that appear under several names as shared
  (``detected shared parameter: A <- B``) and re-ties them after moving the model. torch modules
  register absent parameters as ``None`` (a bias-free convolution's ``bias``,
  ``nn.MultiheadAttention``'s ``q_proj_weight`` when it packs q, k and v in one matrix), and fairseq
  groups all of those ``None`` entries as one "shared" parameter. Lines where both names are ``None``
  entries of a cmd_plugin model are left out; a real shared parameter is still logged.

Everything is scoped: warning filters and logging filters are in place only around the call that
causes the message (the trainer's filter only drops lines naming ``None`` entries of a live
cmd_plugin model). Any other warning, and any record at WARNING or above from these loggers (except
the expected random-initialisation one above), passes unchanged.
"""

import contextlib
import logging
import os
import re
import sys
import warnings
import weakref

_JIT_SCRIPT = r"`?torch\.jit\.script`? is deprecated"
_WEIGHT_NORM = r"`?torch\.nn\.utils\.weight_norm`? is deprecated"
_TENSORBOARDX = re.compile(r"Please install tensorboardX")
_HUBERT_LOGGERS = ("fairseq.tasks.hubert_pretraining", "fairseq.models.hubert.hubert")
_RANDOM_INIT = re.compile(r"No pretrained weights loaded for model .*initialized randomly")


class _DropRecords(logging.Filter):
    """Drops the records ``drop(record)`` is true for."""

    def __init__(self, drop):
        super().__init__()
        self._drop = drop

    def filter(self, record):
        return not self._drop(record)


@contextlib.contextmanager
def _ignoring(message, category=Warning):
    """A warnings filter ignoring ``message`` (a regular expression) only while the block runs.

    Not ``warnings.catch_warnings``: that would also undo the filters that modules imported in the
    block install for themselves (numpy, scipy and torch add some when fairseq imports them)."""
    before = list(warnings.filters)
    warnings.filterwarnings("ignore", message=message, category=category)
    ours = warnings.filters[0]
    try:
        yield
    finally:
        if ours not in before and ours in warnings.filters:
            warnings.filters.remove(ours)
            mutated = getattr(warnings, "_filters_mutated", None)  # what warnings' own functions call
            if mutated is not None:
                mutated()


@contextlib.contextmanager
def _filtered(logger, drop):
    record_filter = _DropRecords(drop)
    logger.addFilter(record_filter)
    try:
        yield
    finally:
        logger.removeFilter(record_filter)


def import_fairseq():
    """``import fairseq`` (a no-op once imported), without its import-time deprecation and tensorboardX
    notes, and leaving the root logger as it was: two of fairseq's modules call ``logging.basicConfig``
    when imported (one at DEBUG), which would print every library's debug records and pre-empt the
    scripts' own ``logging.basicConfig``."""
    if "fairseq" in sys.modules:
        return sys.modules["fairseq"]
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    tts_logger = logging.getLogger("fairseq.tasks.text_to_speech")
    try:
        with (
            _ignoring(_JIT_SCRIPT, FutureWarning),
            _filtered(tts_logger, lambda r: bool(_TENSORBOARDX.search(r.getMessage()))),
        ):
            import fairseq
    finally:
        for handler in root.handlers[:]:
            if handler not in root_handlers:
                root.removeHandler(handler)
        root.setLevel(root_level)
    return fairseq


@contextlib.contextmanager
def building_hubert():
    """Around fairseq's building of a HuBERT model: no configuration dump, no weight_norm deprecation."""
    import_fairseq()
    with contextlib.ExitStack() as stack:
        for name in _HUBERT_LOGGERS:
            stack.enter_context(_filtered(logging.getLogger(name), lambda r: r.levelno < logging.WARNING))
        stack.enter_context(_ignoring(_WEIGHT_NORM))
        yield


def _from_open_clip(record):
    import open_clip

    return record.pathname.startswith(os.path.dirname(os.path.abspath(open_clip.__file__)) + os.sep)


@contextlib.contextmanager
def building_open_clip(random_weights_wanted=False):
    """Around open_clip's model creation: without its step-by-step INFO records, and without its
    random-initialisation warning when ``random_weights_wanted``."""

    def drop(record):
        if not _from_open_clip(record):
            return False
        if record.levelno < logging.WARNING:
            return True
        return random_weights_wanted and bool(_RANDOM_INIT.search(record.getMessage()))

    with _filtered(logging.getLogger(), drop):
        yield


class _NoneSharingFilter(logging.Filter):
    """fairseq.trainer's "detected shared parameter: A <- B" lines where A and B are both None entries
    of a registered model (see the module's docstring)."""

    PATTERN = re.compile(r"detected shared parameter: (\S+) <- (\S+)$")

    def __init__(self):
        super().__init__()
        self.models = weakref.WeakSet()

    def filter(self, record):
        match = self.PATTERN.match(record.getMessage())
        if not match:
            return True
        return not any(
            _is_none_parameter(m, match.group(1)) and _is_none_parameter(m, match.group(2)) for m in list(self.models)
        )


def _is_none_parameter(model, path):
    module = model
    *parents, name = path.split(".")
    for part in parents:
        module = getattr(module, "_modules", {}).get(part)
        if module is None:
            return False
    parameters = getattr(module, "_parameters", {})
    return name in parameters and parameters[name] is None


_NONE_SHARING = _NoneSharingFilter()


def without_none_sharing_lines(model):
    """Leave out fairseq.trainer's "detected shared parameter" lines that pair None entries of ``model``."""
    _NONE_SHARING.models.add(model)
    trainer_logger = logging.getLogger("fairseq.trainer")
    if _NONE_SHARING not in trainer_logger.filters:
        trainer_logger.addFilter(_NONE_SHARING)
    return model
