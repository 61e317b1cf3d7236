"""Which encoder is this: the fingerprint that image feature caches and search indexes record, and
the open_clip preprocessing lookup they (and the task's image transform) share.

Fingerprint: sha256 over an encoder's state as it computes with it -- each state-dict entry's name,
dtype, shape and bytes, in name order (:func:`tensors_sha256`). Equal fingerprints mean equal
weights, wherever they came from: a frozen tower loaded from a weights file (a copy of the file
elsewhere is the same encoder) or a tower fine-tuned inside a checkpoint.

An image encoder's identity (:func:`image_encoder_identity`) is that fingerprint with what else its
embeddings depend on: the open_clip model name, its model config and its eval preprocessing. The
image feature cache (:mod:`cmd_plugin.data.image_cache`) records it in ``meta.json``; an image
search index (:func:`cmd_plugin.inference.image_identity`) records the same values under its own
key names.

No fairseq import here: :func:`open_clip_model_config` imports ``cmd_plugin.models.clip_upstream``
(whose package imports fairseq) only when it has a model config file to register.
"""

import hashlib
import json
from typing import Any, Dict

import open_clip
import torch
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

__all__ = [
    "image_encoder_identity",
    "open_clip_model_config",
    "open_clip_preprocess",
    "preprocess_identity",
    "tensors_sha256",
    "update_tensor_digest",
]


def update_tensor_digest(digest, state: Dict[str, Any], prefix: str = "") -> None:
    """Feed ``state`` (name -> tensor) into ``digest``: each entry's ``prefix + name``, dtype, shape
    and bytes, in name order."""
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{prefix}{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")


def tensors_sha256(module: torch.nn.Module) -> str:
    """The fingerprint of ``module``: sha256 over its state dict (see the module docstring)."""
    digest = hashlib.sha256()
    update_tensor_digest(digest, module.state_dict())
    return digest.hexdigest()


def open_clip_model_config(model_name: str, model_config: str = "") -> Dict[str, Any]:
    """open_clip's config of ``model_name`` as JSON reads it back (tuples as lists), after
    registering ``model_config`` (a JSON file or a directory of them) when given. Raises
    ValueError for a model open_clip does not know."""
    if model_config:
        from .models.clip_upstream import register_model_config  # imports fairseq (cmd_plugin.models)

        register_model_config(model_config)
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(
            f"unknown open_clip model {model_name!r} (give its model config JSON, "
            "model.image_model_config, for a custom one)"
        )
    return json.loads(json.dumps(config))


def open_clip_preprocess(model_name: str, model_config: str = "") -> Dict[str, Any]:
    """The eval preprocessing open_clip's ``create_model_and_transforms`` builds for ``model_name``
    from a local weights file: ``PreprocessCfg``'s fields, the config's ``preprocess_cfg`` over
    their defaults, ``size`` = the vision config's ``image_size`` (as the config gives it). The
    task's transform is ``image_transform_v2(PreprocessCfg(**open_clip_preprocess(...)), is_train=False)``."""
    config = open_clip_model_config(model_name, model_config)
    preprocess = merge_preprocess_dict(PreprocessCfg(), config.get("preprocess_cfg", {}))
    preprocess["size"] = config["vision_cfg"]["image_size"]
    return preprocess


def preprocess_identity(preprocess: Dict[str, Any]) -> Dict[str, Any]:
    """A preprocessing as identities record it: every ``PreprocessCfg`` field (defaults filled in),
    ``size`` as [H, W], as JSON reads it back (so that a recorded one compares equal)."""
    merged = merge_preprocess_dict(PreprocessCfg(), dict(preprocess))
    size = merged["size"]
    merged["size"] = [int(size), int(size)] if isinstance(size, (int, float)) else [int(s) for s in size]
    return json.loads(json.dumps(merged))


def image_encoder_identity(tower) -> Dict[str, Any]:
    """What image embeddings of ``tower`` (a :class:`~cmd_plugin.models.clip_upstream.ClipImageUpstream`,
    whose model config is registered once it is built) depend on:
    {"model", "model_config", "preprocess", "weights_sha256"}."""
    return {
        "model": tower.model_name,
        "model_config": open_clip_model_config(tower.model_name),
        "preprocess": preprocess_identity(open_clip_preprocess(tower.model_name)),
        "weights_sha256": tensors_sha256(tower),
    }
