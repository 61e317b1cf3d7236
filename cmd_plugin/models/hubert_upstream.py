"""Frozen fairseq HuBERT (HuBERT-Large in the paper) as the speech upstream.

Returns every hidden state (CNN output + each transformer layer) from one forward pass, so that
a downstream model can learn a weighted sum of layers.
"""

import logging
import os
import threading
from argparse import Namespace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..quiet import building_hubert, import_fairseq

import_fairseq()  # before fairseq's modules: without its known-harmless import-time notes

from fairseq import checkpoint_utils, tasks
from fairseq.data.dictionary import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import open_dict

from ..checkpoints import load_checkpoint_state

logger = logging.getLogger(__name__)

HUBERT_SAMPLE_RATE = 16000
# superb: SUPERB/s3prl's hidden states; cnn_and_layers: the CNN output and raw layer outputs
HUBERT_STATE_CHOICES = ("superb", "cnn_and_layers")

# other speech models' fairseq names, for a message that says what a file is (cfg.model._name)
_OTHER_SPEECH_MODELS = {
    "wav2vec2": "a wav2vec 2.0 pre-trained model",
    "wav2vec_ctc": "a wav2vec 2.0 model fine-tuned with CTC",
    "wav2vec_seq2seq": "a wav2vec 2.0 model fine-tuned as seq2seq",
    "data2vec_audio": "a data2vec (audio) pre-trained model",
    "data2vec_multi": "a data2vec 2.0 pre-trained model",
    "hubert_seq2seq": "a HuBERT model fine-tuned as seq2seq",
}
_GIVE_INSTEAD = (
    "give model.hubert_path a HuBERT checkpoint: a pre-trained one as the paper uses (e.g. "
    "hubert_large_ll60k.pt) or a CTC fine-tuned one (e.g. hubert_large_ll60k_finetune_ls960.pt, "
    "whose encoder is used)"
)


def _refuse_other_model(checkpoint_path: str, model_name) -> ValueError:
    what = _OTHER_SPEECH_MODELS.get(model_name)
    if what is not None:
        # wav2vec 2.0 / data2vec share HuBERT's transformer but not its feature pipeline
        # (quantiser, normalisation, data2vec's target layers): their layers are not HuBERT's,
        # and the method is defined and tested on HuBERT only
        return ValueError(
            f"{checkpoint_path} is {what} (cfg.model._name={model_name!r}), not a HuBERT checkpoint: "
            f"cmd_plugin's speech upstream is HuBERT only; {_GIVE_INSTEAD}"
        )
    return ValueError(f"{checkpoint_path} is not a HuBERT checkpoint (cfg.model._name={model_name!r}); {_GIVE_INSTEAD}")


def _fine_tuned_encoder(checkpoint_path: str, state):
    """HuBERT encoder of a CTC fine-tuned checkpoint (fairseq ``hubert_ctc``) -> (HubertModel,
    the pre-training cfg it was built from, its task).

    Built as fairseq's ``HubertEncoder`` builds it -- fairseq's HuBERT task and model from the
    encoder's pre-training config ``w2v_args`` (only if that is missing, from the checkpoint
    ``w2v_path`` names, read with the same safe loader), pre-training heads removed -- then
    given the file's ``w2v_encoder.w2v_model.*`` weights: the HuBERT transformer as fine-tuned
    for ASR, without the CTC projection. (fairseq's own loading of ``hubert_ctc`` files fails
    on a config key HubertCtcConfig lacks, ``autoregressive``; building the encoder alone
    needs neither that nor the label dictionaries, whose sizes are taken from the weights.)
    """

    fine_tuned_cfg = state["cfg"]
    pre_cfg = fine_tuned_cfg.model.get("w2v_args")
    if pre_cfg is None:
        w2v_path = fine_tuned_cfg.model.get("w2v_path")
        if not w2v_path or not os.path.isfile(w2v_path):
            raise ValueError(
                f"{checkpoint_path} is a CTC fine-tuned HuBERT (hubert_ctc) that does not record its encoder's "
                f"configuration (no w2v_args) and names its pre-trained model w2v_path={w2v_path!r}, which is not "
                "here: give that pre-trained checkpoint as model.hubert_path instead"
            )
        pre_cfg = load_checkpoint_state(w2v_path, what="pre-trained HuBERT checkpoint")["cfg"]
    elif isinstance(pre_cfg, Namespace):
        pre_cfg = convert_namespace_to_omegaconf(pre_cfg)
    if (pre_cfg.get("model") or {}).get("_name") != "hubert":
        raise ValueError(
            f"{checkpoint_path} is fine-tuned with CTC from a {(pre_cfg.get('model') or {}).get('_name')!r} model, "
            f"not from HuBERT; {_GIVE_INSTEAD}"
        )
    prefix = "w2v_encoder.w2v_model."
    weights = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{checkpoint_path}: a hubert_ctc checkpoint without {prefix}* weights")
    with open_dict(pre_cfg):
        pre_cfg.task.data = fine_tuned_cfg.task.get("data", pre_cfg.task.get("data"))
    task = tasks.setup_task(pre_cfg.task)
    # label embeddings only serve pre-training; a placeholder dictionary of their size fits them
    num_labels = weights["label_embs_concat"].shape[0] if "label_embs_concat" in weights else 5
    labels = Dictionary()
    while len(labels) < num_labels:
        labels.add_symbol(f"<label {len(labels)}>")
    task.load_state_dict({"dictionaries": [labels]})
    model = task.build_model(pre_cfg.model, from_checkpoint=True)
    model.remove_pretraining_modules()
    model.load_state_dict(weights, strict=True)
    fine_tuning_labels = ",".join(fine_tuned_cfg.task.get("labels") or []) or "?"
    logger.warning(
        f"model.hubert_path={checkpoint_path} is a HuBERT fine-tuned with CTC on '{fine_tuning_labels}' labels: "
        "using its encoder (the transformer as fine-tuned for ASR; the CTC projection is dropped). The paper "
        "uses the pre-trained model (e.g. hubert_large_ll60k.pt), whose layers differ."
    )
    return model, pre_cfg, task


@building_hubert()  # without fairseq's configuration dump and torch's weight_norm deprecation
def load_hubert_checkpoint(checkpoint_path: str):
    """Load a fairseq HuBERT checkpoint -> (HubertModel, cfg, task), with clear errors.

    Accepted: a pre-trained HuBERT (``hubert``, e.g. hubert_large_ll60k.pt) and a CTC fine-tuned
    one (``hubert_ctc``, e.g. hubert_large_ll60k_finetune_ls960.pt: its encoder, see
    :func:`_fine_tuned_encoder`; cfg is then the encoder's pre-training config). wav2vec 2.0 and
    data2vec checkpoints are refused, saying what they are; so is any file that is not a fairseq
    checkpoint, or that pickles classes fairseq checkpoints do not hold
    (:func:`cmd_plugin.checkpoints.safe_torch_load`).
    """

    if not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"HuBERT checkpoint not found: {checkpoint_path}")
    state = load_checkpoint_state(checkpoint_path, what="HuBERT checkpoint")
    cfg = state.get("cfg")
    if cfg is None:
        raise ValueError(f"{checkpoint_path} is not a fairseq HuBERT checkpoint (no 'cfg')")
    model_cfg = cfg.get("model")
    model_name = model_cfg.get("_name") if model_cfg is not None else None
    if model_name == "hubert_ctc":
        model, pre_cfg, task = _fine_tuned_encoder(checkpoint_path, state)
        _check_sample_rate(checkpoint_path, pre_cfg)
        return model, pre_cfg, task
    if model_name != "hubert":
        raise _refuse_other_model(checkpoint_path, model_name)
    _check_sample_rate(checkpoint_path, cfg)
    # task_state already holds the dictionaries, so no label file is read here.
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint_path], state=state)
    return models[0], cfg, task


def _check_sample_rate(checkpoint_path: str, cfg) -> None:
    sample_rate = (cfg.get("task") or {}).get("sample_rate", None)
    if sample_rate != HUBERT_SAMPLE_RATE:
        raise ValueError(f"{checkpoint_path}: task.sample_rate={sample_rate}, expected {HUBERT_SAMPLE_RATE}")


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

    def __init__(self, checkpoint_path: str, freeze: bool = True, layer_states: str = "superb"):
        super().__init__()
        if layer_states not in HUBERT_STATE_CHOICES:
            raise ValueError(f"layer_states must be one of {HUBERT_STATE_CHOICES}, got {layer_states!r}")
        self.layer_states = layer_states
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

        Returns (states (num_states, B, T', D), frame_padding_mask (B, T') bool or None); frames past
        an utterance's own length are padding (see frame_padding_mask). With layer_states:

        * ``superb`` (SUPERB / s3prl): states[0] is the transformer's input (CNN features after
          the positional convolution, i.e. what layer 1 receives); states[k], 1 <= k < L, is layer
          k's output = ``extract_features(output_layer=k)``; states[L] is the encoder's output =
          ``extract_features()`` without output_layer (the final LayerNorm of layer_norm_first
          models such as HuBERT-Large is applied).
        * ``cnn_and_layers``: states[0] is the CNN output after layer_norm and post_extract_proj
          (before the positional convolution); states[k] = ``extract_features(output_layer=k)``
          for every k, the last one without the final LayerNorm.
        """
        if source.dim() != 2:
            raise ValueError(f"source must be (B, T), got {tuple(source.shape)}")
        if padding_mask is not None and padding_mask.shape != source.shape:
            raise ValueError(f"padding_mask {tuple(padding_mask.shape)} does not match source {tuple(source.shape)}")
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
            captured = {}
            # the hook is seen by every thread running this module: keep only this call's input
            # (concurrent requests of a server would otherwise swap their layer-0 states)
            caller = threading.get_ident()

            def keep_layer_input(module, args, kwargs):
                if threading.get_ident() == caller:
                    captured["x"] = args[0] if args else kwargs["x"]

            hook = m.encoder.layers[0].register_forward_pre_hook(keep_layer_input, with_kwargs=True)
            try:
                _, layer_results = m.encoder.extract_features(features, frame_padding_mask)
            finally:
                hook.remove()
            if len(layer_results) != self.num_layers:
                raise RuntimeError(
                    f"HuBERT returned {len(layer_results)} of {self.num_layers} layers "
                    "(layer-drop active? keep the upstream in eval mode)"
                )
            # layer results are time-first (T', B, D)
            layers = [result[0].transpose(0, 1) for result in layer_results]
            if self.layer_states == "superb":
                # the encoder may pad time to a multiple internally: keep the first T' frames
                first = captured["x"].transpose(0, 1)[:, : features.size(1)]
                if m.encoder.layer_norm_first:
                    layers[-1] = m.encoder.layer_norm(layers[-1])
                states = [first] + layers
            else:
                states = [features] + layers
            states = torch.stack(states, dim=0)
        return states, frame_padding_mask
