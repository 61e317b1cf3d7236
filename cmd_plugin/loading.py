"""Loading a trained ``cmd_speech_image`` checkpoint for inference: the one loader that scoring
(:mod:`cmd_plugin.retrieval.evaluate`), search (:mod:`cmd_plugin.inference`) and the examples use.

    model, task = load_cmd_checkpoint("checkpoint_best.pt", data="manifests/flickr8k")
    model, task = load_cmd_checkpoint(ckpt, data=..., keep_matching=True)   # re-ranking

Checkpoints are fairseq trainer checkpoints ({"cfg", "model", ...}), read weights-only through
:func:`cmd_plugin.checkpoints.load_checkpoint_state`. Frozen upstreams are not in them: they are
rebuilt from the files the config names (``model.hubert_path``, ``model.image_pretrained``,
``model.image_model_config``), which can be re-pointed when the files have moved; ``task.data`` is
re-pointed to the manifest directory to score, so a model trained on one corpus scores another
(zero-shot) with the same call. The loaded model keeps only what inference uses
(``model.remove_pretraining_modules``): the CMD fusion encoder, the momentum copies and the queue
are dropped, and so are the SIM encoder and matching head unless ``keep_matching`` (re-ranking).

fairseq is imported when a checkpoint is loaded, not when this module is: callers configure
logging first, and :func:`cmd_plugin.quiet.import_fairseq` must be fairseq's first import.
"""

import argparse
import os
from typing import Any, Dict, Optional

import torch

from .checkpoints import CheckpointError, load_checkpoint_state

MODEL_NAME = "cmd_speech_image"
TASK_NAME = "speech_image"

# Model-config fields that name upstream files, re-pointable when files moved, with the option
# of the command-line tools that re-points each.
UPSTREAM_FILE_FIELDS = ("hubert_path", "image_pretrained", "image_model_config")
UPSTREAM_FILE_OPTIONS = {
    "hubert_path": "--hubert-path",
    "image_pretrained": "--image-pretrained",
    "image_model_config": "--image-model-config",
}
UPSTREAM_FILE_HELP = {
    "hubert_path": "new location of the HuBERT checkpoint named by the checkpoint",
    "image_pretrained": "new location of the image encoder weights",
    "image_model_config": "new location of the open_clip model JSON",
}


def add_loading_options(parser: argparse.ArgumentParser) -> None:
    """The options of every command-line tool that loads a checkpoint: the upstream files' new
    locations (``--hubert-path``, ``--image-pretrained``, ``--image-model-config``), ``--device``
    and ``--fp16``; :func:`upstream_paths` collects the first three for :func:`load_cmd_checkpoint`."""
    for key in UPSTREAM_FILE_FIELDS:
        parser.add_argument(UPSTREAM_FILE_OPTIONS[key], help=UPSTREAM_FILE_HELP[key])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--fp16", action="store_true", help="encode under float16 autocast (CUDA only)")


def upstream_paths(args: argparse.Namespace) -> Dict[str, Optional[str]]:
    """{"hubert_path", "image_pretrained", "image_model_config"} from :func:`add_loading_options`' options."""
    return {key: getattr(args, key) for key in UPSTREAM_FILE_FIELDS}


def _cfg_get(cfg, group: str, key: str, default=None):
    section = cfg.get(group) if cfg is not None else None
    if section is None:
        return default
    return section.get(key, default)


def build_arg_overrides(
    data: Optional[str] = None,
    hubert_path: Optional[str] = None,
    image_pretrained: Optional[str] = None,
    image_model_config: Optional[str] = None,
    image_feature_cache: str = "",
) -> Dict[str, Any]:
    """Overrides for ``load_model_ensemble_and_task``. fairseq's ``overwrite_args_by_name``
    applies each one to EVERY config key of that name, in every group, and only where the key
    exists: ``image_model_config`` thus re-points ``model.`` and ``task.image_model_config``
    together, ``data`` re-points ``task.data``. Paths are made absolute. ``task.image_feature_cache``
    is replaced by ``image_feature_cache`` ("" = encode pixels): a training-time cache may not
    hold the scored images, so scoring uses a cache only when asked to."""
    overrides = {"image_feature_cache": os.path.abspath(image_feature_cache) if image_feature_cache else ""}
    # scoring reads waveforms: a training-time cache of upstream states holds the training splits only
    overrides["speech_feature_cache"] = ""
    for key, value in (
        ("data", data),
        ("hubert_path", hubert_path),
        ("image_pretrained", image_pretrained),
        ("image_model_config", image_model_config),
    ):
        if value is not None:
            overrides[key] = os.path.abspath(value) if value else value
    return overrides


def load_cmd_checkpoint(
    checkpoint: str,
    data: Optional[str] = None,
    hubert_path: Optional[str] = None,
    image_pretrained: Optional[str] = None,
    image_model_config: Optional[str] = None,
    image_feature_cache: str = "",
    keep_matching: bool = False,
    keep_fusion: bool = False,
):
    """Load a trained ``cmd_speech_image`` checkpoint -> (model in eval mode on CPU, task).

    ``data`` re-points ``task.data`` (the manifest directory to score); the other arguments
    re-point the frozen upstreams' files. ``keep_matching`` keeps the SIM encoder and matching
    head (re-ranking), ``keep_fusion`` a CMD checkpoint's fusion encoder (its attention explains a pair);
    everything else that only training uses is dropped. Raises
    :class:`FileNotFoundError` naming a missing checkpoint or upstream file (and the option that
    re-points it), :class:`~cmd_plugin.checkpoints.CheckpointError` for a file that is not a
    ``cmd_speech_image`` checkpoint.
    """
    # fairseq first (quietly): then importing the plugin's fairseq modules registers them
    from .quiet import import_fairseq

    import_fairseq()
    from fairseq import checkpoint_utils

    import cmd_plugin.models  # noqa: F401  (registers cmd_speech_image)
    import cmd_plugin.tasks  # noqa: F401  (registers speech_image)

    # The checkpoint's common.user_dir is not imported: it may name another machine's path, and
    # fairseq refuses a second package called cmd_plugin; the imports above register everything.
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    overrides = build_arg_overrides(data, hubert_path, image_pretrained, image_model_config, image_feature_cache)
    state = load_checkpoint_state(checkpoint, overrides, what=f"{MODEL_NAME} checkpoint")
    cfg = state.get("cfg")
    if cfg is None or "model" not in state:
        raise CheckpointError(
            f"{checkpoint} is not a {MODEL_NAME} checkpoint: no fairseq 'cfg' and 'model' (keys: {sorted(state)})"
        )
    model_name = _cfg_get(cfg, "model", "_name")
    if model_name != MODEL_NAME:
        raise CheckpointError(f"{checkpoint} is not a {MODEL_NAME} checkpoint (its model is {model_name!r})")
    task_name = _cfg_get(cfg, "task", "_name")
    if task_name != TASK_NAME:
        raise CheckpointError(f"{checkpoint}: task {task_name!r}, expected {TASK_NAME!r}")

    for key in UPSTREAM_FILE_FIELDS:
        path = _cfg_get(cfg, "model", key, "")
        if path and not os.path.isfile(path):
            raise FileNotFoundError(
                f"model.{key} file not found: {path} (named by {checkpoint}; "
                f"give its new location with {UPSTREAM_FILE_OPTIONS[key]})"
            )
    task_data = _cfg_get(cfg, "task", "data")
    if not task_data or not os.path.isdir(task_data):
        raise FileNotFoundError(f"manifest directory not found: {task_data} (give it with --data)")

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides=overrides, state=state)
    model = models[0]
    model.remove_pretraining_modules(keep_matching=keep_matching, keep_fusion=keep_fusion)
    return model.eval(), task


def has_matching_head(model) -> bool:
    """True when ``model`` holds the SIM encoder and matching head (re-ranking can use it)."""
    return getattr(model, "multimodal", None) is not None and getattr(model, "matching_head", None) is not None


def why_no_matching_head(model, checkpoint: str) -> Optional[str]:
    """None when ``model`` can re-rank; else why not: trained without the head, or loaded without it."""
    if has_matching_head(model):
        return None
    if int(getattr(model.cfg, "multimodal_layers", 0) or 0) > 0:
        return (
            f"{checkpoint or 'the checkpoint'} was loaded without its matching head: load it with "
            "keep_matching=True to re-rank"
        )
    return (
        f"{checkpoint or 'this checkpoint'} has no matching head (trained with model.multimodal_layers=0, "
        "e.g. the CMD recipe): re-ranking needs a coarse-to-fine checkpoint "
        "(fairseq-hydra-train ... method=c2f or method=c2f_cmd)"
    )


def resolve_device(device: str, fp16: bool) -> torch.device:
    """``device`` (cpu, cuda, cuda:N) as a torch device, refused when CUDA is asked for and absent
    or ``fp16`` is asked for off CUDA (ValueError naming the option)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if fp16 and dev.type != "cuda":
        raise ValueError("--fp16 needs --device cuda")
    return dev


def autocast(device: torch.device, fp16: bool):
    """The context inference encodes under: float16 autocast with ``fp16``, else autocast off
    (so that an enclosing autocast does not change the model's precision)."""
    if fp16:
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return torch.autocast(device_type=device.type, enabled=False)
