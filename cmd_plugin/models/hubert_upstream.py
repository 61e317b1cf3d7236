"""Frozen fairseq HuBERT (HuBERT-Large in the paper) as the speech upstream.

Returns every hidden state (CNN output + each transformer layer) from one forward pass, so that
a downstream model can learn a weighted sum of layers.
"""

import importlib
import os
import pickle
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import compat

HUBERT_SAMPLE_RATE = 16000


# Module prefixes whose pickled classes may appear in fairseq checkpoints (Dictionary in
# task_state, meters in extra_state, Namespace in old "args", numpy scalars in metrics).
_TRUSTED_PICKLE_MODULES = ("fairseq.", "numpy.", "argparse.")


def _resolve_global(name: str):
    module_name, _, attr = name.rpartition(".")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


def _checkpoint_safe_globals(checkpoint_path: str, extra: bool = False) -> list:
    """Objects to allow-list for torch.load(weights_only=True) of a fairseq checkpoint.

    torch>=2.6 refuses the pickled fairseq Dictionary of task_state unless allow-listed.
    With extra=True, other globals from trusted modules found in the file are added too.
    """
    from fairseq.data.dictionary import Dictionary

    allowed = [Dictionary]
    if extra:
        unsafe = compat.unsafe_globals_in_checkpoint(checkpoint_path)
        untrusted = [g for g in unsafe if not g.startswith(_TRUSTED_PICKLE_MODULES)]
        if untrusted:
            raise RuntimeError(
                f"HuBERT checkpoint {checkpoint_path} pickles objects outside fairseq/numpy: "
                f"{untrusted}; refusing to unpickle them"
            )
        allowed += [_resolve_global(g) for g in unsafe]
    return allowed


def _load_state(checkpoint_path: str):
    from fairseq import checkpoint_utils

    try:
        with compat.safe_globals(_checkpoint_safe_globals(checkpoint_path)):
            return checkpoint_utils.load_checkpoint_to_cpu(checkpoint_path)
    except pickle.UnpicklingError:
        pass
    with compat.safe_globals(_checkpoint_safe_globals(checkpoint_path, extra=True)):
        try:
            return checkpoint_utils.load_checkpoint_to_cpu(checkpoint_path)
        except pickle.UnpicklingError as err:
            raise RuntimeError(
                f"could not unpickle HuBERT checkpoint {checkpoint_path}: {err}"
            ) from err


def load_hubert_checkpoint(checkpoint_path: str):
    """Load a fairseq HuBERT checkpoint -> (HubertModel, cfg, task), with clear errors."""
    from fairseq import checkpoint_utils

    if not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"HuBERT checkpoint not found: {checkpoint_path}")
    try:
        state = _load_state(checkpoint_path)
    except (KeyError, TypeError, AttributeError) as err:
        # fairseq's state upgrade fails on files that are not fairseq checkpoints
        raise ValueError(
            f"{checkpoint_path} is not a fairseq checkpoint ({type(err).__name__}: {err})"
        ) from err
    cfg = state.get("cfg") if isinstance(state, dict) else None
    if cfg is None:
        raise ValueError(f"{checkpoint_path} is not a fairseq HuBERT checkpoint (no 'cfg')")
    model_cfg = cfg.get("model")
    model_name = model_cfg.get("_name") if model_cfg is not None else None
    if model_name != "hubert":
        raise ValueError(
            f"{checkpoint_path} is not a HuBERT checkpoint (cfg.model._name={model_name!r})"
        )
    task_cfg = cfg.get("task") or {}
    sample_rate = task_cfg.get("sample_rate", None)
    if sample_rate != HUBERT_SAMPLE_RATE:
        raise ValueError(
            f"{checkpoint_path}: task.sample_rate={sample_rate}, expected {HUBERT_SAMPLE_RATE}"
        )
    # task_state already holds the dictionaries, so no label file is read here.
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint_path], state=state)
    return models[0], cfg, task


def normalize_waveform(
    source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, eps: float = 1e-5
) -> torch.Tensor:
    """Per-utterance zero-mean unit-variance waveform, over unpadded samples only.

    Matches fairseq's audio datasets (F.layer_norm(wav, wav.shape) on each unpadded
    utterance before collation). source (B, T); padding_mask (B, T) bool, True = padding.
    Padded samples are zero in the output. Computed in float32, returned in source's dtype.
    """
    x = source.float()
    if padding_mask is None:
        return F.layer_norm(x, x.shape[-1:], eps=eps).to(source.dtype)
    valid = (~padding_mask).to(x.dtype)
    count = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (x * valid).sum(dim=1, keepdim=True) / count
    centred = (x - mean) * valid
    var = centred.pow(2).sum(dim=1, keepdim=True) / count
    return (centred * torch.rsqrt(var + eps)).to(source.dtype)


class HubertUpstream(nn.Module):
    """fairseq HuBERT returning all hidden states, frozen.

    Attributes:
        model: the fairseq HubertModel.
        normalize: cfg.task.normalize of the checkpoint (True for Large): waveforms are
            layer-normalised per utterance inside forward.
        sample_rate: 16000.
        num_states: transformer layers + 1 (25 for Large).
        embed_dim: encoder_embed_dim D (1024 for Large).
    """

    def __init__(self, checkpoint_path: str, freeze: bool = True):
        super().__init__()
        model, cfg, _ = load_hubert_checkpoint(checkpoint_path)
        # final_proj / target_glu only serve the pre-training loss
        model.remove_pretraining_modules()
        self.model = model
        self.checkpoint_path = checkpoint_path
        self.normalize = bool(cfg.task.get("normalize", False))
        self.sample_rate = int(cfg.task.sample_rate)
        self.num_layers = len(model.encoder.layers)
        self.num_states = self.num_layers + 1
        self.embed_dim = int(cfg.model.encoder_embed_dim)
        self.freeze = freeze
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()
        else:
            # the layer-weighted sum needs every layer's state: no layer-drop when fine-tuning
            self.model.encoder.layerdrop = 0.0

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            # fairseq calls model.train() every step: keep dropout and layer-drop off.
            self.model.eval()
        return self

    def frame_lengths(self, num_samples: torch.Tensor) -> torch.Tensor:
        """(B,) unpadded sample counts -> (B,) frame counts the conv stack gives each utterance."""
        frames = num_samples
        for block in self.model.feature_extractor.conv_layers:
            conv = next(mod for mod in block if isinstance(mod, nn.Conv1d))
            frames = torch.div(frames - conv.kernel_size[0], conv.stride[0], rounding_mode="floor") + 1
        return frames.clamp(min=0)

    def frame_padding_mask(self, padding_mask: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B, T) sample padding -> (B, T') frame padding from each utterance's exact frame count.

        fairseq's ``forward_padding_mask`` cuts the samples into T' equal chunks and keeps a frame
        unless all its samples are padding, so an utterance's states would change with the padding
        of its batch; exact lengths make embeddings independent of batching.
        """
        frames = self.frame_lengths((~padding_mask).sum(dim=1))
        positions = torch.arange(num_frames, device=padding_mask.device)
        return positions[None, :] >= frames[:, None]

    def forward(
        self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """source (B, T) waveform; padding_mask (B, T) bool, True = padding, or None.

        Returns (states (num_states, B, T', D), frame_padding_mask (B, T') bool or None).
        states[0] is the CNN output after layer_norm and post_extract_proj; states[k], k >= 1,
        equals model.extract_features(source, mask=False, output_layer=k)[0] of each utterance
        alone (no final encoder LayerNorm, as in fairseq with output_layer set); frames past an
        utterance's own length are padding (see frame_padding_mask).
        """
        if source.dim() != 2:
            raise ValueError(f"source must be (B, T), got {tuple(source.shape)}")
        if padding_mask is not None and padding_mask.shape != source.shape:
            raise ValueError(
                f"padding_mask {tuple(padding_mask.shape)} does not match source {tuple(source.shape)}"
            )
        if padding_mask is not None:
            padding_mask = padding_mask.bool()
        if self.normalize:
            source = normalize_waveform(source, padding_mask)

        m = self.model
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            # Same steps as HubertModel.forward(mask=False, features_only=True), but keeping
            # every layer's output from a single pass through the encoder.
            features = m.forward_features(source).transpose(1, 2)
            features = m.layer_norm(features)
            frame_padding_mask = None
            if padding_mask is not None:
                frame_padding_mask = self.frame_padding_mask(padding_mask, features.size(1))
            if m.post_extract_proj is not None:
                features = m.post_extract_proj(features)
            features = m.dropout_input(features)
            _, layer_results = m.encoder.extract_features(features, frame_padding_mask)
            if len(layer_results) != self.num_layers:
                raise RuntimeError(
                    f"HuBERT returned {len(layer_results)} of {self.num_layers} layers "
                    "(layer-drop active? keep the upstream in eval mode)"
                )
            # layer results are time-first (T', B, D)
            states = [features] + [result[0].transpose(0, 1) for result in layer_results]
            states = torch.stack(states, dim=0)
        return states, frame_padding_mask
