"""Multimodal encoder and matching head of the coarse-to-fine method's SIM task.

    speech sequence (B, 1+T, D): the speech encoder's output, CLS then frames, padding mask
        └─ L x [ x + SelfAttn(LN(x)) ; x + CrossAttn(LN(x), image tokens) ; x + FFN(LN(x)) ]
           ─ LN ─ fused sequence (B, 1+T, D) ─ fused CLS (B, D) ─ MatchingHead ─ (B, 2) logits
    image tokens (B, 1+N, E): image CLS (pooled) + N patch tokens in the joint space
        └─ LN ─ Linear(E -> D)   (keys/values of every cross-attention)

The seed paper's Fig. 1 feeds speech and image embeddings to "the multimodal encoder"; its
layer layout follows ALBEF's fusion encoder (each layer: self-attention, cross-attention to the
image, feed-forward; the text side is the query stream), with the speech sequence taking
the text's place. Pre-LN layers (LayerNorm before each block, a final LayerNorm) as the speech
encoder of this project. Plain ``nn.Module`` built on ``torch.nn.TransformerDecoderLayer``
(self-attention + cross-attention + FFN is exactly its structure, without a causal mask here).
"""

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["MultimodalEncoder", "SpeechSummary", "MatchingHead", "image_tokens", "match_score", "pool_patch_grid"]


def image_tokens(image_cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """(B, E) pooled image embedding and (B, N, E) patch tokens -> (B, 1+N, E), CLS first."""
    if (
        image_cls.dim() != 2
        or patches.dim() != 3
        or patches.shape[0] != image_cls.shape[0]
        or patches.shape[2] != image_cls.shape[1]
    ):
        raise ValueError(
            f"image_cls (B, E) and patches (B, N, E) expected, got {tuple(image_cls.shape)} and {tuple(patches.shape)}"
        )
    return torch.cat([image_cls[:, None, :].to(patches.dtype), patches], dim=1)


class MultimodalEncoder(nn.Module):
    """Speech queries attend to image tokens through cross-attention; depth ``layers``.

    Args:
        dim: width D of the speech sequence (the speech encoder's width, 1024 for HuBERT-Large).
        image_dim: width E of the image tokens (the joint space, 768 for ViT-L/14).
        layers: number of layers (>= 1).
        heads: attention heads (D % heads == 0).
        ffn_dim: feed-forward size.
        dropout: dropout inside the layers.
    """

    def __init__(
        self,
        dim: int,
        image_dim: int,
        layers: int = 2,
        heads: int = 8,
        ffn_dim: int = 4096,
        dropout: float = 0.1,
        speech_tokens: int = 0,
        patch_pool: int = 1,
    ):
        super().__init__()
        if speech_tokens < 0 or patch_pool < 1:
            raise ValueError(f"speech_tokens must be >= 0 and patch_pool >= 1, got {speech_tokens} and {patch_pool}")
        self.patch_pool = patch_pool
        self.summary = None
        if speech_tokens > 0:
            self.summary = SpeechSummary(dim, speech_tokens, heads, dropout)
        if layers < 1:
            raise ValueError(f"the multimodal encoder needs at least 1 layer, got {layers}")
        if dim % heads != 0:
            raise ValueError(f"multimodal encoder width {dim} is not divisible by {heads} heads")
        self.dim, self.image_dim = dim, image_dim
        self.image_norm = nn.LayerNorm(image_dim)
        self.image_proj = nn.Linear(image_dim, dim)
        layer = nn.TransformerDecoderLayer(
            d_model=dim,
            nhead=heads,
            dim_feedforward=ffn_dim,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerDecoder(layer, num_layers=layers, norm=nn.LayerNorm(dim))

    def forward(
        self,
        speech: torch.Tensor,
        speech_padding_mask: Optional[torch.Tensor],
        image: torch.Tensor,
        image_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Fuse each speech sequence with its paired image.

        Args:
            speech: (B, 1+T, D) speech encoder output, CLS first.
            speech_padding_mask: (B, 1+T) bool, True at padded frames (never the CLS), or None.
            image: (B, M, E) image tokens (:func:`image_tokens`: CLS + N patches, M = 1+N).
            image_padding_mask: (B, M) bool, True at tokens to ignore, or None.
        Returns:
            (B, 1+T, D) fused sequence; ``[:, 0]`` is the fused CLS.
        """
        if speech.dim() != 3 or speech.size(2) != self.dim:
            raise ValueError(f"speech must be (B, 1+T, {self.dim}), got {tuple(speech.shape)}")
        if image.dim() != 3 or image.size(2) != self.image_dim or image.size(0) != speech.size(0):
            raise ValueError(f"image must be ({speech.size(0)}, M, {self.image_dim}), got {tuple(image.shape)}")
        if self.patch_pool > 1:
            if image_padding_mask is not None:
                raise ValueError("patch pooling does not take an image padding mask")
            image = pool_patch_grid(image, self.patch_pool)
        memory = self.image_proj(self.image_norm(image.to(self.image_proj.weight.dtype)))
        return self.layers(
            speech,
            memory,
            tgt_key_padding_mask=speech_padding_mask,
            memory_key_padding_mask=image_padding_mask,
        )

    def fused_cls(self, speech, speech_padding_mask, image, image_padding_mask=None) -> torch.Tensor:
        """(B, D) fused CLS; arguments as :meth:`forward`."""
        return self.forward(speech, speech_padding_mask, image, image_padding_mask)[:, 0]


class SpeechSummary(nn.Module):
    """A fixed number of learned query tokens that summarise a speech sequence by cross-attention
    (BLIP-2's Q-Former idea, for the speech side): (B, 1+T, D) -> (B, 1+Q, D), the CLS kept first.
    Runs once per utterance, so the multimodal encoder's cost per (speech, image) pair no longer
    grows with the utterance's length."""

    def __init__(self, dim: int, tokens: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, seq: torch.Tensor, mask: Optional[torch.Tensor]):
        """seq (B, 1+T, D) CLS first, mask (B, 1+T) True at padding or None -> (B, 1+Q, D), None."""
        frames = self.norm(seq)
        queries = self.queries.expand(seq.size(0), -1, -1).to(seq.dtype)
        summary, _ = self.attention(queries, frames, frames, key_padding_mask=mask, need_weights=False)
        return torch.cat([seq[:, :1], queries + summary], dim=1), None


def pool_patch_grid(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Image tokens (B, 1+N, E), CLS first and N patches of a square grid -> (B, 1+N/k^2, E): every k x k
    block of patches averaged (the grid side must be divisible by k)."""
    bsz, length, dim = tokens.shape
    side = int(round((length - 1) ** 0.5))
    if side * side != length - 1 or side % k:
        raise ValueError(
            f"patch pooling by {k} needs a square grid of patches with a side divisible by {k}, "
            f"got {length - 1} patches"
        )
    grid = tokens[:, 1:].reshape(bsz, side // k, k, side // k, k, dim).mean(dim=(2, 4))
    return torch.cat([tokens[:, :1], grid.reshape(bsz, -1, dim)], dim=1)


class MatchingHead(nn.Module):
    """SIM head: fused CLS (B, D) -> (B, 2) logits, class 1 = "the speech describes the image"
    (ALBEF's ``itm_head``; trained with cross-entropy, label 1 for pairs, 0 for hard negatives)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2)

    def forward(self, fused_cls: torch.Tensor) -> torch.Tensor:
        return self.proj(fused_cls)


def match_score(logits: torch.Tensor, kind: str = "logit") -> torch.Tensor:
    """(P, 2) matching logits -> (P,) score used to rank candidates.

    kind: "logit" -- the match-class logit ``logits[:, 1]`` (what ALBEF and BLIP rank by);
          "log_prob" -- ``log_softmax(logits)[:, 1]`` (the log-probability of a match).
    """
    if kind == "logit":
        return logits[:, 1].float()
    if kind == "log_prob":
        return torch.log_softmax(logits.float(), dim=1)[:, 1]
    raise ValueError(f"match score kind must be 'logit' or 'log_prob', got {kind!r}")
