"""The CMD fusion encoder Ω (training only): attentive pooling of image patches with speech as
the query, then FC + residual + LayerNorm (the paper's Eq. 1-2)."""

import math

import torch
import torch.nn as nn


class FusionEncoder(nn.Module):
    def __init__(self, dim: int, qkv_projections: bool = False):
        """dim: joint embedding size E (768 for ViT-L/14). With ``qkv_projections`` False the
        pooling is plain scaled dot-product attention (queries and keys/values are the inputs);
        the only weights are the FC (E x E) and the LayerNorm, as in the paper's Table 1."""
        super().__init__()
        self.dim = dim
        if qkv_projections:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        else:
            self.q_proj = self.k_proj = self.v_proj = nn.Identity()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, patches: torch.Tensor, all_pairs: bool = True) -> torch.Tensor:
        """Reconstruct image features F' from (noisy) patches, attended by speech queries.

        Args:
            queries: (Q, E) speech embeddings S_cls.
            patches: (P, N, E) noisy patch features of P images.
            all_pairs: True -> every query attends every image: returns (Q, P, E);
                False -> query i attends image i only (Q == P): returns (Q, E).
        """
        q = self.q_proj(queries)
        k = self.k_proj(patches)
        v = self.v_proj(patches)
        scale = 1.0 / math.sqrt(self.dim)
        if all_pairs:
            attn = torch.einsum("qe,pne->qpn", q, k).mul(scale).softmax(dim=-1)
            pooled = torch.einsum("qpn,pne->qpe", attn, v)
        else:
            if q.size(0) != k.size(0):
                raise ValueError(f"paired fusion needs as many queries as images, got {q.size(0)} and {k.size(0)}")
            attn = torch.einsum("be,bne->bn", q, k).mul(scale).softmax(dim=-1)
            pooled = torch.einsum("bn,bne->be", attn, v)
        return self.norm(self.fc(pooled) + pooled)
