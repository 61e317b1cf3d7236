"""The Cross-Modal Denoising (CMD) speech-image model, registered as ``cmd_speech_image``.

    waveform ─ HuBERT (frozen) ─ 25 SUPERB states ─ softmax(layer_weights)·states ─┐
                                               [CLS] + frames ─ 1 transformer layer ─ CLS
                                               ─ Linear(D_hubert → E) ─ L2 ─ S_cls  (B, E)
    image ─ CLIP ViT (frozen) ─ pooled ─ L2 ─ I_cls (B, E);  patch tokens @ proj ─ (B, N, E)
    training only (cmd_fusion): fusion encoder Ω(noisy patches | S_cls) ─ F' (B, E)   (objectives/cmd/)

Coarse-to-fine alignment (the second paper), each part optional and off by default:

    momentum model (c2f_momentum): EMA copies of layer_weights, cls_token, speech_encoder and
        speech_proj, run on the SAME HuBERT states ─ S_cls^m (B, E); training only
    queue (queue_size > 0): momentum speech/image embeddings of past global batches
    multimodal encoder (multimodal_layers > 0): the speech layer's output sequence (B, 1+T', D) (or its
        summary tokens, multimodal_speech_tokens) attends to [I_cls; patches] (B, 1+N, E) ─ fused CLS ─
        matching head ─ (B, 2)   (objectives/c2f/)

Each part is built only when its switch is on; the objectives that train them are in
:mod:`cmd_plugin.objectives`, and :meth:`CmdSpeechImageModel.remove_pretraining_modules` drops the
training-only ones for inference.

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

from ..quiet import import_fairseq, without_none_sharing_lines

import_fairseq()  # before fairseq's modules: without its known-harmless import-time notes

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import MISSING

from ..modules.fusion import FUSION_ATTENTION_CHOICES, FusionEncoder
from ..modules.momentum import MomentumCopies
from ..modules.multimodal import MatchingHead, MultimodalEncoder
from ..modules.queue import EmbeddingQueue
from .clip_upstream import ClipImageUpstream
from .hubert_upstream import HUBERT_STATE_CHOICES, HubertUpstream

logger = logging.getLogger(__name__)

HUBERT_PREFIX = "hubert."
IMAGE_PREFIX = "image_encoder."
# the trainable speech side: what the momentum model copies
MOMENTUM_PARTS = ("layer_weights", "cls_token", "speech_encoder", "speech_proj")


@dataclass
class CmdSpeechImageConfig(FairseqDataclass):
    hubert_path: str = field(
        default=MISSING,
        metadata={"help": "fairseq HuBERT checkpoint in the released format, e.g. hubert_large_ll60k.pt"},
    )
    image_model: str = field(
        default="ViT-L-14-quickgelu",
        metadata={"help": "open_clip model name; ViT-L-14-quickgelu is CLIP ViT-L/14 with OpenAI weights"},
    )
    image_pretrained: str = field(
        default="",
        metadata={
            "help": "LOCAL weights file for image_model (open_clip_pytorch_model.bin/.safetensors "
            "or a saved state dict); empty = random init (tests only); nothing is downloaded"
        },
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
    cmd_fusion: bool = field(
        default=True,
        metadata={"help": "build the CMD fusion encoder (training only; needed by criterion.cmd_weight > 0)"},
    )
    fusion_attention: ChoiceEnum(FUSION_ATTENTION_CHOICES) = field(
        default="qkv",
        metadata={
            "help": "how Ω's speech query scores the patches (a choice; modules/fusion.py): literal, "
            "cosine (1 parameter), qkv (3E^2+2E parameters); uniform: a control with qkv's value projection"
        },
    )
    hubert_layer_states: ChoiceEnum(HUBERT_STATE_CHOICES) = field(
        default="superb",
        metadata={
            "help": "which HuBERT states the layer weights mix: superb (transformer input, each layer, encoder "
            "output; s3prl's) or cnn_and_layers"
        },
    )
    temperature_init: float = field(
        default=0.07,
        metadata={
            "help": "initial contrastive temperature tau (a choice: CLIP's value); also "
            "the fusion encoder's initial tau for fusion_attention=cosine"
        },
    )
    max_logit_scale: float = field(
        default=100.0, metadata={"help": "upper clamp of 1/tau (a choice: CLIP's value), for both temperatures"}
    )

    # ---- coarse-to-fine alignment (second paper); off by default ----
    c2f_momentum: bool = field(
        default=False,
        metadata={
            "help": "build the momentum model: EMA copies of the trainable speech side (frozen upstreams "
            "shared); needed by criterion.distill_alpha > 0"
        },
    )
    momentum: float = field(
        default=0.995,
        metadata={
            "help": "EMA decay of the momentum model, applied once per optimizer update "
            "(a choice: ALBEF's 0.995; the paper gives none)"
        },
    )
    momentum_dropout: bool = field(
        default=True,
        metadata={
            "help": "the momentum copies run in train mode during training, dropout on "
            "(a choice: ALBEF's momentum encoders are ordinary train-mode modules); false: "
            "always eval mode"
        },
    )
    queue_size: int = field(
        default=0,
        metadata={
            "help": "embedding queue slots of momentum embeddings of past global batches (0 = no "
            "queue; refused if larger than the training split)"
        },
    )
    multimodal_layers: int = field(
        default=0,
        metadata={
            "help": "depth of the SIM multimodal encoder: self-attention, cross-attention to the "
            "image tokens, FFN per layer (0 = no SIM parts)"
        },
    )
    multimodal_heads: int = field(default=8, metadata={"help": "attention heads of the multimodal encoder (a choice)"})
    multimodal_ffn_dim: int = field(default=4096, metadata={"help": "FFN size of the multimodal encoder (a choice)"})
    multimodal_dropout: float = field(default=0.1, metadata={"help": "dropout in the multimodal encoder (a choice)"})
    multimodal_frame_pool: int = field(
        default=1,
        metadata={
            "help": "SIM input: every k speech frames averaged, padding excluded, CLS kept (1 = every frame, the paper)"
        },
    )
    multimodal_speech_tokens: int = field(
        default=0,
        metadata={
            "help": "SIM input: the speech summarised once per utterance by this many learned query "
            "tokens after its CLS (0 = every frame)"
        },
    )
    multimodal_patch_pool: int = field(
        default=1,
        metadata={
            "help": "SIM input: the image's patch grid averaged in k x k blocks, CLS kept (1 = every "
            "patch). A choice that cuts SIM and re-ranking cost"
        },
    )


def pool_frames(seq: torch.Tensor, mask: Optional[torch.Tensor], k: int):
    """Average every ``k`` frames of a speech sequence, the CLS kept: seq (B, 1+T, D), mask (B, 1+T) True
    at padding (or None) -> (B, 1+ceil(T/k), D), (B, 1+ceil(T/k)). Padded frames are left out of each
    average; a window of padding only is padding."""
    cls, frames = seq[:, :1], seq[:, 1:]
    bsz, length, dim = frames.shape
    valid = frames.new_ones(bsz, length) if mask is None else (~mask[:, 1:]).to(frames.dtype)
    extra = (-length) % k
    frames = F.pad(frames * valid[..., None], (0, 0, 0, extra)).view(bsz, -1, k, dim).sum(dim=2)
    count = F.pad(valid, (0, extra)).view(bsz, -1, k).sum(dim=2)
    pooled = frames / count.clamp(min=1.0)[..., None]
    cls_mask = torch.zeros(bsz, 1, dtype=torch.bool, device=seq.device)
    return torch.cat([cls, pooled], dim=1), torch.cat([cls_mask, count == 0], dim=1)


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
        self.fusion = None
        if cfg.cmd_fusion:
            self.fusion = FusionEncoder(
                embed_dim,
                attention=cfg.fusion_attention,
                temperature_init=cfg.temperature_init,
                max_logit_scale=cfg.max_logit_scale,
            )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature_init)))

        # coarse-to-fine parts (None when off)
        self.multimodal = self.matching_head = None
        if cfg.multimodal_layers > 0:
            self.multimodal = MultimodalEncoder(
                dim,
                embed_dim,
                layers=cfg.multimodal_layers,
                heads=cfg.multimodal_heads,
                ffn_dim=cfg.multimodal_ffn_dim,
                dropout=cfg.multimodal_dropout,
                speech_tokens=cfg.multimodal_speech_tokens,
                patch_pool=cfg.multimodal_patch_pool,
            )
            self.matching_head = MatchingHead(dim)
            if cfg.multimodal_frame_pool < 1:
                raise ValueError(f"model.multimodal_frame_pool must be >= 1, got {cfg.multimodal_frame_pool}")
        elif cfg.multimodal_layers < 0:
            raise ValueError(f"model.multimodal_layers must be >= 0, got {cfg.multimodal_layers}")
        self.queue = None
        if cfg.queue_size > 0:
            self.queue = EmbeddingQueue(cfg.queue_size, embed_dim, embed_dim)
        elif cfg.queue_size < 0:
            raise ValueError(f"model.queue_size must be >= 0, got {cfg.queue_size}")
        self.momentum_model = None
        if cfg.c2f_momentum:
            if not 0.0 <= cfg.momentum <= 1.0:
                raise ValueError(f"model.momentum must be in [0, 1], got {cfg.momentum}")
            # created last: the copies start equal to the online weights just initialised
            self.momentum_model = MomentumCopies(
                {name: getattr(self, name) for name in MOMENTUM_PARTS}, dropout=cfg.momentum_dropout
            )

    @classmethod
    def build_model(cls, cfg: CmdSpeechImageConfig, task=None):
        # a frozen upstream keeps itself in eval mode and out of autograd (fairseq calls train())
        hubert = HubertUpstream(cfg.hubert_path, freeze=cfg.freeze_hubert, layer_states=cfg.hubert_layer_states)
        image_encoder = ClipImageUpstream(
            cfg.image_model, cfg.image_pretrained, cfg.image_model_config, freeze=cfg.freeze_image_encoder
        )
        # fairseq's trainer would list the model's None parameters as one shared parameter
        return without_none_sharing_lines(cls(cfg, hubert, image_encoder))

    # ---- frozen upstreams stay out of checkpoints ----
    def _frozen_prefixes(self):
        return tuple(
            p
            for p, frozen in ((HUBERT_PREFIX, self.cfg.freeze_hubert), (IMAGE_PREFIX, self.cfg.freeze_image_encoder))
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
        # a checkpoint without a part this model builds (C2F started from a SIC or CMD checkpoint with
        # checkpoint.restore_file: the two-stage recipe) keeps that part as initialised; momentum copies
        # then start from the loaded online weights
        fresh = []
        for part in self.OPTIONAL_PARTS:
            keys = [k for k in own if k.startswith(part + ".")]
            if getattr(self, part) is not None and keys and not any(k in full for k in keys):
                full.update({k: own[k] for k in keys})
                fresh.append(part)
        if fresh:
            logger.warning(f"the checkpoint has no {', '.join(fresh)}: initialised fresh (two-stage recipe)")
        result = super().load_state_dict(full, strict=strict, model_cfg=model_cfg, args=args)
        if "momentum_model" in fresh:
            self.momentum_model.copy_from_online()
        return result

    # parts built only when switched on, and the switch that builds each (for upgrade_state_dict_named)
    OPTIONAL_PARTS = {
        "fusion": "model.cmd_fusion",
        "multimodal": "model.multimodal_layers",
        "matching_head": "model.multimodal_layers",
        "queue": "model.queue_size",
        "momentum_model": "model.c2f_momentum",
    }

    def upgrade_state_dict_named(self, state_dict, name):
        """Checkpoints of earlier versions: the state of a part this model does not build (e.g. the
        fusion encoder of a SIC checkpoint written when every model built one, or training-only parts
        of a checkpoint loaded for inference with them switched off) is dropped, naming the switch.
        No key has been renamed since the first release (checked against a checkpoint of main
        484aea9, tests/data/)."""
        prefix = name + "." if name else ""
        for part, switch in self.OPTIONAL_PARTS.items():
            if getattr(self, part) is not None:
                continue
            dropped = [k for k in state_dict if k.startswith(prefix + part + ".")]
            for key in dropped:
                del state_dict[key]
            if dropped:
                logger.info(f"checkpoint: {len(dropped)} tensors of {part} not loaded ({switch} leaves it unbuilt)")
        super().upgrade_state_dict_named(state_dict, name)

    # ---- encoders ----
    def layer_weight_probs(self) -> torch.Tensor:
        """(num_states,) softmax-normalised weights of HuBERT's states (see hubert_layer_states)."""
        return F.softmax(self.layer_weights, dim=0)

    @staticmethod
    def _speech_head(states, frame_mask, layer_weights, cls_token, speech_encoder, speech_proj):
        """HuBERT states (L+1, B, T', D) -> (S_cls (B, E) unit norm, sequence (B, 1+T', D), mask (B, 1+T')
        True at padding or None), with the given (online or momentum) trainable parts."""
        weights = F.softmax(layer_weights, dim=0).to(states.dtype)
        frames = torch.einsum("l,lbtd->btd", weights, states)
        bsz = frames.size(0)
        x = torch.cat([cls_token.expand(bsz, -1, -1).to(frames.dtype), frames], dim=1)
        mask = None
        if frame_mask is not None:
            mask = torch.cat([frame_mask.new_zeros(bsz, 1), frame_mask], dim=1)
        x = speech_encoder(x, src_key_padding_mask=mask)
        return F.normalize(speech_proj(x[:, 0]), dim=-1), x, mask

    def encode_speech_sequence(
        self,
        source: Optional[torch.Tensor],
        padding_mask: Optional[torch.Tensor] = None,
        momentum: bool = False,
        speech_states: Optional[torch.Tensor] = None,
        speech_frame_mask: Optional[torch.Tensor] = None,
    ):
        """source (B, T) waveform, padding_mask (B, T) True at padding -> dict with
        ``speech`` S_cls (B, E) unit norm, ``speech_seq`` the speech layer's output (B, 1+T', D)
        (CLS first: the multimodal encoder's input), ``speech_mask`` (B, 1+T') True at padding
        (or None); with ``momentum`` (needs c2f_momentum) also ``speech_m`` (B, E), the momentum
        model's S_cls from the same HuBERT states, without gradient. With ``speech_states``
        (L+1, B, T', D) and ``speech_frame_mask`` (B, T') -- the frozen upstream's states read from
        a cache (:mod:`cmd_plugin.data.speech_cache`) -- the upstream is skipped (``source`` None)."""
        if speech_states is not None:
            if not self.hubert.freeze:
                raise ValueError("cached speech states need a frozen upstream (model.freeze_hubert=true)")
            states, frame_mask = speech_states, speech_frame_mask
        else:
            states, frame_mask = self.hubert(source, padding_mask)  # (L+1, B, T', D), (B, T')
        speech, seq, mask = self._speech_head(
            states, frame_mask, self.layer_weights, self.cls_token, self.speech_encoder, self.speech_proj
        )
        if self.cfg.multimodal_frame_pool > 1:
            seq, mask = pool_frames(seq, mask, self.cfg.multimodal_frame_pool)
        if self.multimodal is not None and self.multimodal.summary is not None:
            seq, mask = self.multimodal.summary(seq, mask)  # once per utterance, not per pair
        out = {"speech": speech, "speech_seq": seq, "speech_mask": mask}
        if momentum:
            if self.momentum_model is None:
                raise ValueError("momentum embeddings need model.c2f_momentum=true")
            m = self.momentum_model
            with torch.no_grad():  # fp32 copies (MomentumCopies keep_fp32): run them in fp32
                speech_m, _, _ = self._speech_head(
                    states.detach().float(),
                    frame_mask,
                    m["layer_weights"],
                    m["cls_token"],
                    m["speech_encoder"],
                    m["speech_proj"],
                )
            out["speech_m"] = speech_m.to(speech.dtype)
        return out

    def encode_speech(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """source (B, T) waveform, padding_mask (B, T) True at padding -> S_cls (B, E), unit norm."""
        return self.encode_speech_sequence(source, padding_mask)["speech"]

    # ---- coarse-to-fine: matching head, momentum, inference ----
    def match_logits(
        self, speech_seq: torch.Tensor, speech_mask: Optional[torch.Tensor], image_tok: torch.Tensor
    ) -> torch.Tensor:
        """SIM logits of P (speech, image) pairs: speech_seq (P, 1+T', D), speech_mask (P, 1+T') or None,
        image_tok (P, 1+N, E) (:func:`image_tokens`) -> (P, 2), class 1 = match."""
        if self.multimodal is None:
            raise ValueError("this model has no matching head (model.multimodal_layers=0)")
        return self.matching_head(self.multimodal.fused_cls(speech_seq, speech_mask, image_tok))

    def set_num_updates(self, num_updates):
        """fairseq calls this before every forward of a training step with the number of
        optimizer updates done (twice or more per update under update_freq > 1, and once when a
        checkpoint is loaded): the momentum model takes one EMA step per new update count."""
        super().set_num_updates(num_updates)
        if self.momentum_model is not None:
            self.momentum_model.step(num_updates, self.cfg.momentum)

    def remove_pretraining_modules(self, keep_matching: bool = False, keep_fusion: bool = False) -> None:
        """Remove what only training uses, as fairseq's models name it: the CMD fusion encoder unless
        ``keep_fusion`` (its attention explains a pair), the momentum copies, the queue, and the SIM
        encoder and matching head unless ``keep_matching`` (re-ranking scores with them)."""
        if not keep_fusion:
            self.fusion = None
        self.momentum_model = None
        self.queue = None
        if not keep_matching:
            self.multimodal = self.matching_head = None

    def encode_image(self, images: torch.Tensor):
        """images (U, 3, H, W) -> (I_cls (U, E) unit norm, patches (U, N, E) in the joint space)."""
        pooled, patches = self.image_encoder(images)
        return F.normalize(pooled, dim=-1), patches

    def clamped_logit_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def forward(
        self,
        source: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        image_index: Optional[torch.Tensor] = None,
        images: Optional[torch.Tensor] = None,
        image_cls: Optional[torch.Tensor] = None,
        image_patches: Optional[torch.Tensor] = None,
        speech_states: Optional[torch.Tensor] = None,
        speech_frame_mask: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Encode a batch of B utterances and the U distinct images they describe.

        ``image_index`` (B,) maps each utterance to its image. Speech comes as waveforms ``source``
        / ``padding_mask``, or as the frozen upstream's cached states ``speech_states`` /
        ``speech_frame_mask`` (:meth:`encode_speech_sequence`). Images come either as pixels
        ``images`` (U, 3, H, W), or as cached encoder outputs ``image_cls`` (U, E) (un-normalised
        pooled embedding) and ``image_patches`` (U, N, E).
        Returns speech (B, E), image (B, E) unit-norm embeddings and patches (B, N, E); also
        ``speech_seq`` (B, 1+T', D) / ``speech_mask`` (the speech layer's output, for SIM) and, in
        training with c2f_momentum, ``speech_m`` (B, E) momentum embeddings.
        """
        if source is None and speech_states is None:
            raise ValueError("forward needs speech: a waveform batch (source) or cached states (speech_states)")
        out = self.encode_speech_sequence(
            source,
            padding_mask,
            momentum=self.training and self.momentum_model is not None,
            speech_states=speech_states,
            speech_frame_mask=speech_frame_mask,
        )
        speech = out["speech"]
        if images is not None:
            image, patches = self.encode_image(images)
        elif image_cls is not None and image_patches is not None:
            image, patches = F.normalize(image_cls.float(), dim=-1), image_patches.float()
        else:
            raise ValueError("forward needs either images or cached image_cls + image_patches")
        if image_index is None:
            image_index = torch.arange(speech.size(0), device=speech.device)
        out.update(
            {
                "image": image[image_index].to(speech.dtype),
                "patches": patches[image_index].to(speech.dtype),
            }
        )
        return out
