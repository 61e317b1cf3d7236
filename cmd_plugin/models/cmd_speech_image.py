"""The Cross-Modal Denoising (CMD) speech-image model, registered as ``cmd_speech_image``.

    waveform ─ HuBERT (frozen) ─ 25 SUPERB states ─ softmax(layer_weights)·states ─┐
                                               [CLS] + frames ─ 1 transformer layer ─ CLS
                                               ─ Linear(D_hubert → E) ─ L2 ─ S_cls  (B, E)
    image ─ CLIP ViT (frozen) ─ pooled ─ L2 ─ I_cls (B, E);  patch tokens @ proj ─ (B, N, E)
    training only: fusion encoder Ω(noisy patches | S_cls) ─ F' (B, E)   (see FusionEncoder)

Only trained weights go into checkpoints: frozen upstreams are rebuilt from their files
(``hubert_path``, ``image_pretrained``), which the checkpoint's config names.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import MISSING

from .clip_upstream import ClipImageUpstream
from .fusion import FUSION_ATTENTION_CHOICES, FusionEncoder
from .hubert_upstream import HUBERT_STATE_CHOICES, HubertUpstream

logger = logging.getLogger(__name__)

HUBERT_PREFIX = "hubert."
IMAGE_PREFIX = "image_encoder."


@dataclass
class CmdSpeechImageConfig(FairseqDataclass):
    hubert_path: str = field(
        default=MISSING, metadata={"help": "fairseq HuBERT checkpoint in the released format, e.g. hubert_large_ll60k.pt"}
    )
    image_model: str = field(
        default="ViT-L-14-quickgelu",
        metadata={"help": "open_clip model name; ViT-L-14-quickgelu is CLIP ViT-L/14 with OpenAI weights"},
    )
    image_pretrained: str = field(
        default="",
        metadata={"help": "LOCAL weights file for image_model (open_clip_pytorch_model.bin/.safetensors "
                  "or a saved state dict); empty = random init (tests only); nothing is downloaded"},
    )
    image_model_config: str = field(
        default="", metadata={"help": "optional open_clip model JSON registered before building image_model"}
    )
    freeze_hubert: bool = field(
        default=True, metadata={"help": "keep HuBERT frozen (eval mode, no grads, not in checkpoints)"}
    )
    freeze_image_encoder: bool = field(
        default=True, metadata={"help": "keep the image encoder frozen (eval mode, no grads, not in checkpoints)"}
    )
    speech_encoder_heads: int = field(default=8, metadata={"help": "attention heads of the speech transformer layer"})
    speech_encoder_ffn_dim: int = field(default=4096, metadata={"help": "FFN size of the speech transformer layer"})
    speech_encoder_dropout: float = field(default=0.1, metadata={"help": "dropout in the speech transformer layer"})
    fusion_attention: ChoiceEnum(FUSION_ATTENTION_CHOICES) = field(
        default="qkv",
        metadata={"help": "how the fusion encoder's speech query scores the patches (a choice: the paper "
                  "gives Eq. 1 only). literal: S_cls.patch/sqrt(E), near-uniform at ViT-L sizes; cosine: "
                  "cos(S_cls, patch) x a learnable scale (1 parameter); qkv: learned Q/K/V projections "
                  "(3E^2+3E parameters). The default had the best valid mean R@1 of the three in the "
                  "ablation on the generated corpus (README: 2 seeds so far, within the seed spread)"},
    )
    hubert_layer_states: ChoiceEnum(HUBERT_STATE_CHOICES) = field(
        default="superb",
        metadata={"help": "which HuBERT states the layer weights mix. superb: the transformer input after the "
                  "positional convolution, each layer's output, and the encoder output (final LayerNorm for "
                  "layer_norm_first models), as SUPERB/s3prl; cnn_and_layers: the CNN output (before the "
                  "positional convolution) and each layer's output without the final LayerNorm"},
    )
    temperature_init: float = field(
        default=0.07, metadata={"help": "initial contrastive temperature tau (a choice: CLIP's value); also "
                                "the fusion encoder's initial tau for fusion_attention=cosine"})
    max_logit_scale: float = field(
        default=100.0, metadata={"help": "upper clamp of 1/tau (a choice: CLIP's value), for both temperatures"})


@register_model("cmd_speech_image", dataclass=CmdSpeechImageConfig)
class CmdSpeechImageModel(BaseFairseqModel):
    def __init__(self, cfg: CmdSpeechImageConfig, hubert: HubertUpstream, image_encoder: ClipImageUpstream):
        super().__init__()
        self.cfg = cfg
        self.hubert = hubert
        self.image_encoder = image_encoder
        dim, embed_dim = hubert.embed_dim, image_encoder.embed_dim
        self.layer_weights = nn.Parameter(torch.zeros(hubert.num_states))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.speech_encoder = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=cfg.speech_encoder_heads,
            dim_feedforward=cfg.speech_encoder_ffn_dim,
            dropout=cfg.speech_encoder_dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.speech_proj = nn.Linear(dim, embed_dim)
        self.fusion = FusionEncoder(
            embed_dim, attention=cfg.fusion_attention,
            temperature_init=cfg.temperature_init, max_logit_scale=cfg.max_logit_scale,
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature_init)))

    @classmethod
    def build_model(cls, cfg: CmdSpeechImageConfig, task=None):
        # a frozen upstream keeps itself in eval mode and out of autograd (fairseq calls train())
        hubert = HubertUpstream(cfg.hubert_path, freeze=cfg.freeze_hubert, layer_states=cfg.hubert_layer_states)
        image_encoder = ClipImageUpstream(
            cfg.image_model, cfg.image_pretrained, cfg.image_model_config, freeze=cfg.freeze_image_encoder
        )
        return cls(cfg, hubert, image_encoder)

    # ---- frozen upstreams stay out of checkpoints ----
    def _frozen_prefixes(self):
        return tuple(
            p for p, frozen in ((HUBERT_PREFIX, self.cfg.freeze_hubert), (IMAGE_PREFIX, self.cfg.freeze_image_encoder))
            if frozen
        )

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        frozen = tuple(prefix + p for p in self._frozen_prefixes())
        for key in [k for k in state if k.startswith(frozen)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        # frozen upstream weights are not in checkpoints: take them from the files just loaded
        full = dict(state_dict)
        own = super().state_dict()
        for key, value in own.items():
            if key.startswith(self._frozen_prefixes()) and key not in full:
                full[key] = value
        return super().load_state_dict(full, strict=strict, model_cfg=model_cfg, args=args)

    # ---- encoders ----
    def layer_weight_probs(self) -> torch.Tensor:
        """(num_states,) softmax-normalised weights of HuBERT's states (see hubert_layer_states)."""
        return F.softmax(self.layer_weights, dim=0)

    def encode_speech(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """source (B, T) waveform, padding_mask (B, T) True at padding -> S_cls (B, E), unit norm."""
        states, frame_mask = self.hubert(source, padding_mask)  # (L+1, B, T', D), (B, T')
        weights = self.layer_weight_probs().to(states.dtype)
        frames = torch.einsum("l,lbtd->btd", weights, states)
        bsz = frames.size(0)
        x = torch.cat([self.cls_token.expand(bsz, -1, -1).to(frames.dtype), frames], dim=1)
        mask = None
        if frame_mask is not None:
            mask = torch.cat([frame_mask.new_zeros(bsz, 1), frame_mask], dim=1)
        x = self.speech_encoder(x, src_key_padding_mask=mask)
        return F.normalize(self.speech_proj(x[:, 0]), dim=-1)

    def encode_image(self, images: torch.Tensor):
        """images (U, 3, H, W) -> (I_cls (U, E) unit norm, patches (U, N, E) in the joint space)."""
        pooled, patches = self.image_encoder(images)
        return F.normalize(pooled, dim=-1), patches

    def clamped_logit_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def forward(
        self,
        source: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        image_index: Optional[torch.Tensor] = None,
        images: Optional[torch.Tensor] = None,
        image_cls: Optional[torch.Tensor] = None,
        image_patches: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Encode a batch of B utterances and the U distinct images they describe.

        ``image_index`` (B,) maps each utterance to its image. Images come either as pixels
        ``images`` (U, 3, H, W), or as cached encoder outputs ``image_cls`` (U, E) (un-normalised
        pooled embedding) and ``image_patches`` (U, N, E).
        Returns speech (B, E), image (B, E) unit-norm embeddings and patches (B, N, E).
        """
        speech = self.encode_speech(source, padding_mask)
        if images is not None:
            image, patches = self.encode_image(images)
        elif image_cls is not None and image_patches is not None:
            image, patches = F.normalize(image_cls.float(), dim=-1), image_patches.float()
        else:
            raise ValueError("forward needs either images or cached image_cls + image_patches")
        if image_index is None:
            image_index = torch.arange(speech.size(0), device=speech.device)
        return {
            "speech": speech,
            "image": image[image_index].to(speech.dtype),
            "patches": patches[image_index].to(speech.dtype),
        }
