"""The CMD fusion encoder Ω (training only): attentive pooling of image patches with speech as
the query, then FC + residual + LayerNorm (the paper's Eq. 1-2):

    Attn(I* | s) = softmax(logits(Q_s, K_I*)) V_I*          F' = LN(FC(Attn) + Attn)

How the attention logits are formed is the ``attention`` choice (the paper gives Eq. 1 only):

* ``literal``: logits = S_cls · patchᵀ / √E, queries/keys/values the inputs themselves. S_cls is unit
  norm, so |logit| ≤ |patch| / √E: at E = 768 the pooling stays near-uniform unless patch norms
  approach 100, and L_cmd degenerates to a contrastive loss on mean-pooled noisy patches.
  Kept for the record.
* ``cosine``: logits = s · cos(S_cls, patch), one learnable scale s = 1/τ_Ω (initialised and clamped
  like the contrastive temperature): sharp whatever the patch norms; adds one parameter.
* ``qkv``: learned query/key/value projections (E x E each; the key has no bias, which softmax
  would cancel), logits = Q·Kᵀ / √E as in a transformer's attention; adds 3E² + 2E parameters.
* ``uniform``: a control, not a method: every patch weighs 1/N whatever the speech (F' of the
  mean-pooled noisy patches), with ``qkv``'s value projection, FC and LayerNorm (the query and key
  projections would get no gradient, so they are not built). It separates "a second contrastive
  head on noisy patches" from "speech-guided attention".
"""

import math
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

FUSION_ATTENTION_CHOICES = ("literal", "cosine", "qkv", "uniform")


class FusionEncoder(nn.Module):
    def __init__(
        self, dim: int, attention: str = "qkv", temperature_init: float = 0.07, max_logit_scale: float = 100.0
    ):
        """dim: joint embedding size E (768 for ViT-L/14); attention: one of
        FUSION_ATTENTION_CHOICES; temperature_init / max_logit_scale: initial value and upper
        clamp of 1/τ_Ω for ``cosine``."""
        super().__init__()
        if attention not in FUSION_ATTENTION_CHOICES:
            raise ValueError(f"fusion attention must be one of {FUSION_ATTENTION_CHOICES}, got {attention!r}")
        self.dim = dim
        self.attention = attention
        self.max_logit_scale = max_logit_scale
        if attention == "uniform":
            self.q_proj = self.k_proj = nn.Identity()
            self.v_proj = nn.Linear(dim, dim)
        elif attention == "qkv":
            # no key bias: q·b_k is the same for every patch of an image, so softmax cancels it
            # (its gradient is exactly zero)
            self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.k_proj = nn.Linear(dim, dim, bias=False)
        else:
            self.q_proj = self.k_proj = self.v_proj = nn.Identity()
        if attention == "cosine":
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def attention_logits(self, queries: torch.Tensor, keys: torch.Tensor, all_pairs: bool) -> torch.Tensor:
        """queries (Q, E), keys (P, N, E) -> logits (Q, P, N) if all_pairs else (Q, N) with Q == P."""
        if self.attention == "uniform":
            shape = (queries.size(0), keys.size(0), keys.size(1)) if all_pairs else (keys.size(0), keys.size(1))
            return keys.new_zeros(shape)
        if self.attention == "cosine":
            queries, keys = F.normalize(queries, dim=-1), F.normalize(keys, dim=-1)
            scale = self.logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()
        else:
            scale = 1.0 / math.sqrt(self.dim)
        if all_pairs:
            return torch.einsum("qe,pne->qpn", queries, keys) * scale
        if queries.size(0) != keys.size(0):
            raise ValueError(f"paired fusion needs as many queries as images, got {queries.size(0)} and {keys.size(0)}")
        return torch.einsum("be,bne->bn", queries, keys) * scale

    def output(self, pooled: torch.Tensor) -> torch.Tensor:
        """FC + residual + LayerNorm of pooled features (..., E) (the paper's Eq. 2)."""
        return self.norm(self.fc(pooled) + pooled)

    def forward(
        self, queries: torch.Tensor, patches: torch.Tensor, all_pairs: bool = True, return_attention: bool = False
    ):
        """Reconstruct image features F' from (noisy) patches, attended by speech queries.

        Args:
            queries: (Q, E) speech embeddings S_cls.
            patches: (P, N, E) noisy patch features of P images.
            all_pairs: True -> every query attends every image: F' (Q, P, E), attention (Q, P, N);
                False -> query i attends image i only (Q == P): F' (Q, E), attention (Q, N).
            return_attention: also return the attention weights.
        """
        q = self.q_proj(queries)
        k = self.k_proj(patches)
        v = self.v_proj(patches)
        attn = self.attention_logits(q, k, all_pairs).float().softmax(dim=-1).to(v.dtype)
        if all_pairs:
            pooled = torch.einsum("qpn,pne->qpe", attn, v)
        else:
            pooled = torch.einsum("bn,bne->be", attn, v)
        out = self.output(pooled)
        return (out, attn) if return_attention else out

    def mean_pooled(self, patches: torch.Tensor) -> torch.Tensor:
        """F' of plainly mean-pooled patches (P, N, E) -> (P, E): what uniform attention gives."""
        return self.output(self.v_proj(patches).mean(dim=1))


def attention_statistics(
    attention: torch.Tensor, recon: torch.Tensor, recon_mean_pooled: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Summaries that show whether the fusion attends (sums over rows, for summable logging).

    Args:
        attention: (R, N) attention of R (query, image) pairs over N patches.
        recon: (R, E) F' of those pairs; recon_mean_pooled: (R, E) F' of the same images' mean-pooled patches.
    Returns sums over the R rows of: ``attn_entropy`` (entropy / log N: 1 = uniform, 0 = one patch),
    ``attn_max`` (largest weight; uniform = 1/N) and ``attn_cos_mean_pool`` (cos(F', F'_mean):
    1 = the attention changes nothing).
    """
    p = attention.detach().float()
    num_patches = p.size(-1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=-1) / math.log(max(num_patches, 2))
    cos = F.cosine_similarity(recon.detach().float(), recon_mean_pooled.detach().float(), dim=-1)
    return {
        "attn_entropy": entropy.sum(),
        "attn_max": p.max(dim=-1).values.sum(),
        "attn_cos_mean_pool": cos.sum(),
    }


def diagonal_pairs(attention: torch.Tensor, recon: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """From all-pairs outputs (Q, P, N) / (Q, P, E) with Q == P keep each query's own image:
    (Q, N), (Q, E)."""
    idx = torch.arange(attention.size(0), device=attention.device)
    return attention[idx, idx], recon[idx, idx]
