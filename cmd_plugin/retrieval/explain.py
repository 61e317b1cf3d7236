"""Why this image? Where a spoken query lands on an image, and which stretch of the query drove it.

For one (utterance, image) pair, what each kind of checkpoint can show (pure torch), in the order
:func:`explain_pair` returns them -- the order of the pointing game on a set of its own (seed 2,
docs/grounding.md), so that a page or an app showing one map shows the one that pointed best:

* **every checkpoint** whose image tower has a value path (open_clip ViTs, timm ViT-style trunks): the
  cosine of the speech embedding S_cls with each patch's own content, MaskCLIP's dense features
  (:meth:`~cmd_plugin.models.clip_upstream.ClipImageUpstream.value_path_patches`: the tower's last block
  with each token attending to itself only), with the saliency of cos(S_cls, I_cls) over the speech
  frames (:data:`EXPLANATION_KINDS` ``dense_similarity``). The plain patch tokens have been mixed
  with the whole image by the last block's attention; these have not.
* **coarse-to-fine** (a matching head): ALBEF's Grad-CAM for image-text matching, with the speech in
  the text's place -- the attention of one cross-attention layer of the multimodal encoder times the
  positive part of the match logit's gradient with respect to it, averaged over heads and over the
  speech query rows, over the image's patches (:func:`matching_gradcam`; which layer and rows:
  :data:`GRADCAM_LAYER`, :data:`GRADCAM_ROWS`); and the same logit's saliency over the speech frames (gradient
  times input of the frozen HuBERT states, summed over layers and channels). The model's own
  fine-grained evidence.
* **every checkpoint** (SIC, CMD, coarse-to-fine): the cosine of the speech embedding S_cls with each
  plain patch token in the joint space (:func:`patch_similarity`), and the saliency of cos(S_cls, I_cls)
  over the speech frames. Coarser: the contrastive loss trains I_cls, the pooled embedding, against
  the speech, never a patch, so a patch's cosine is a by-product.
* **CMD checkpoints loaded with their fusion encoder** (``keep_fusion``): the fusion encoder's
  attention of S_cls over the clean patches (:func:`fusion_attention`). Also coarser: it was trained
  on noisy patches to rebuild the image feature, not to point.

Maps are returned on the patch grid (rows x cols) and normalised to [0, 1] by their maximum (all zeros
when nothing is positive); saliencies per speech frame likewise, with the frame duration in seconds.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "Explanation",
    "EXPLANATION_KINDS",
    "normalise",
    "patch_grid",
    "patch_similarity",
    "fusion_attention",
    "matching_gradcam",
    "gradcam_map",
    "GRADCAM_LAYER",
    "GRADCAM_ROWS",
    "multimodal_forward",
    "explain_pair",
    "combine_windows",
]

EXPLANATION_KINDS = {
    "dense_similarity": "cosine of the speech embedding with each patch's own content (MaskCLIP's value path "
    "through the image tower's last block; coarser than a matching head in kind: training aligns the speech "
    "with the pooled image, never a patch)",
    "matching_gradcam": "Grad-CAM of the matching head's match logit over the multimodal encoder's "
    "cross-attention to the patches (ALBEF's map for image-text matching)",
    "patch_similarity": "cosine of the speech embedding with each patch token in the joint space "
    "(coarser: training never aligns a patch with the speech)",
    "fusion_attention": "the CMD fusion encoder's attention of the speech embedding over the clean patches "
    "(coarser: trained to rebuild the image feature from noisy patches)",
}


@dataclass
class Explanation:
    """One map of a (query, image) pair. ``image_map`` (rows, cols) in [0, 1]; ``speech_saliency``
    (frames,) in [0, 1] or None, each frame ``frame_seconds`` long; ``score`` the explained score
    (the match logit, or the cosine); ``raw`` the map before normalisation."""

    kind: str
    image_map: torch.Tensor
    score: float
    speech_saliency: Optional[torch.Tensor] = None
    frame_seconds: float = 0.02
    speech_kind: str = ""
    raw: Optional[torch.Tensor] = field(default=None, repr=False)
    raw_saliency: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return EXPLANATION_KINDS[self.kind]

    def peak(self):
        """(row, col) of the map's maximum (the pointing game's guess)."""
        flat = int(torch.argmax(self.image_map))
        return divmod(flat, self.image_map.shape[1])

    def to_dict(self) -> Dict:
        return {
            "kind": self.kind,
            "label": self.label,
            "score": self.score,
            "image_map": self.image_map.tolist(),
            "speech_saliency": None if self.speech_saliency is None else self.speech_saliency.tolist(),
            "speech_kind": self.speech_kind,
            "frame_seconds": self.frame_seconds,
        }


def normalise(values: torch.Tensor) -> torch.Tensor:
    """Negative parts to 0, then divided by the maximum (all zeros stay zeros)."""
    values = values.detach().float().clamp(min=0)
    peak = values.max()
    return values / peak if peak > 0 else values


def patch_grid(values: torch.Tensor) -> torch.Tensor:
    """(N,) values of a square grid of patches, row-major -> (side, side)."""
    side = math.isqrt(values.numel())
    if side * side != values.numel():
        raise ValueError(f"{values.numel()} patches do not form a square grid")
    return values.reshape(side, side)


def patch_similarity(speech: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """speech (E,) S_cls, patches (N, E) in the joint space -> (N,) cosines."""
    return F.cosine_similarity(patches.float(), speech.float()[None, :], dim=-1)


def fusion_attention(fusion, speech: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """The CMD fusion encoder's attention (N,) of S_cls (E,) over the clean patches (N, E)."""
    _, attention = fusion(speech[None], patches[None], all_pairs=False, return_attention=True)
    return attention[0].float()


def _cross_attention_with_weights(mha, query, memory, key_padding_mask):
    """``nn.MultiheadAttention`` (batch_first, one in-projection) step by step, keeping the
    softmaxed attention (B, heads, Lq, Lk) in the graph: -> (output, attention)."""
    dim, heads = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = F.linear(query, w[:dim], None if b is None else b[:dim])
    k = F.linear(memory, w[dim : 2 * dim], None if b is None else b[dim : 2 * dim])
    v = F.linear(memory, w[2 * dim :], None if b is None else b[2 * dim :])

    def split(x):
        return x.reshape(x.size(0), x.size(1), heads, dim // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim // heads)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    attention = scores.softmax(dim=-1)
    out = (attention @ v).transpose(1, 2).reshape(query.size(0), query.size(1), dim)
    return mha.out_proj(out), attention


def multimodal_forward(multimodal, speech, speech_mask, image, layer: int = -1):
    """:meth:`MultimodalEncoder.forward` (eval mode), with the cross-attention of ``layer`` computed step
    by step so that its attention weights stay in the graph -> (fused (B, 1+T, D), attention (B, heads,
    1+T, keys))."""
    if multimodal.patch_pool > 1:
        from ..modules.multimodal import pool_patch_grid

        image = pool_patch_grid(image, multimodal.patch_pool)
    memory = multimodal.image_proj(multimodal.image_norm(image.to(multimodal.image_proj.weight.dtype)))
    layers = multimodal.layers.layers
    target = layer % len(layers)
    x, attention = speech, None
    for i, mod in enumerate(layers):
        if i != target:
            x = mod(x, memory, tgt_key_padding_mask=speech_mask)
            continue
        if not mod.norm_first:
            raise ValueError("the explanation follows the pre-LN layers the multimodal encoder builds")
        x = x + mod._sa_block(mod.norm1(x), None, speech_mask)
        crossed, attention = _cross_attention_with_weights(mod.multihead_attn, mod.norm2(x), memory, None)
        x = x + mod.dropout2(crossed)
        x = x + mod._ff_block(mod.norm3(x))
    if multimodal.layers.norm is not None:
        x = multimodal.layers.norm(x)
    return x, attention


# Which cross-attention and which query rows the Grad-CAM reads: a choice, made on a pointing-game set
# of its own (seed 2) with a coarse-to-fine checkpoint of the demo corpus: the first layer averaged over
# every query token (CLS and the speech tokens) hit 45.1 % of 144 trials (chance 23.9 %); the last layer,
# CLS row (ALBEF reads a middle layer's rows, per word) 34.7 %; the first layer, CLS row 16.0 %
# (docs/grounding.md). ALBEF's maps come from one of its fusion layers too, not necessarily the last.
GRADCAM_LAYER = 0
GRADCAM_ROWS = "all"  # "all": mean over the query rows; "cls": the fused CLS row only


def gradcam_map(
    multimodal, matching_head, seq, mask, tokens, layer: int = GRADCAM_LAYER, rows: str = GRADCAM_ROWS, inputs=()
):
    """ALBEF's Grad-CAM for matching, with speech as the query stream: (seq (1, L, D), mask, image tokens
    (1, 1+N, E)) -> (match logit, cam (keys without the image CLS,), the logit's gradients with respect
    to ``inputs``): attention x positive part of its gradient, at ``layer``'s cross-attention, mean over
    heads, then the fused CLS query's row (``rows="cls"``) or the mean of every unpadded query row
    (``"all"``). Gradients go to the attention and ``inputs`` only (never into the weights' ``.grad``:
    safe beside other requests on a shared model)."""
    if rows not in ("all", "cls"):
        raise ValueError(f"rows must be 'all' or 'cls', got {rows!r}")
    fused, attention = multimodal_forward(multimodal, seq, mask, tokens, layer)
    logit = matching_head(fused[:, 0])[0, 1]
    grads = torch.autograd.grad(logit, [attention, *inputs])
    cam = (attention.detach() * grads[0].clamp(min=0)).mean(dim=1)[0, :, 1:]  # (queries, keys)
    if rows == "cls":
        cam = cam[0]
    else:
        keep = torch.ones(cam.size(0), dtype=torch.bool) if mask is None else ~mask[0].cpu()
        cam = cam[keep.to(cam.device)].mean(dim=0)
    return logit.detach(), cam, list(grads[1:])


def _speech_saliency(states: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|gradient x input| of the HuBERT states (S, 1, T', D), summed over layers and channels -> (T',)."""
    return (grad * states.detach()).abs().sum(dim=(0, 1, 3))


def matching_gradcam(
    model, states, frame_mask, image_cls, patches, layer: int = GRADCAM_LAYER, rows: str = GRADCAM_ROWS
):
    """Grad-CAM of the match logit of one pair. ``states`` (S, 1, T', D) the frozen upstream's states of
    the utterance, ``frame_mask`` (1, T') or None, ``image_cls`` (1, E) unit-norm I_cls and ``patches``
    (1, N, E) -> (logit, cam over the encoder's keys without the image CLS (N, or N / pool^2 when the
    encoder pools the patch grid), speech saliency (T',): gradient x input of the states)."""
    from ..modules.multimodal import image_tokens

    states = states.detach().float().requires_grad_(True)
    with torch.enable_grad():
        _, seq, mask = model._speech_head(
            states, frame_mask, model.layer_weights, model.cls_token, model.speech_encoder, model.speech_proj
        )
        if model.cfg.multimodal_frame_pool > 1:
            from ..models.cmd_speech_image import pool_frames

            seq, mask = pool_frames(seq, mask, model.cfg.multimodal_frame_pool)
        if model.multimodal.summary is not None:
            seq, mask = model.multimodal.summary(seq, mask)
        tokens = image_tokens(image_cls.float(), patches.float())
        logit, cam, (states_grad,) = gradcam_map(
            model.multimodal, model.matching_head, seq, mask, tokens, layer, rows, inputs=(states,)
        )
    return float(logit), cam, _speech_saliency(states, states_grad)


def _cosine_and_saliency(model, states, frame_mask, image_emb):
    states = states.detach().float().requires_grad_(True)
    with torch.enable_grad():
        speech, _, _ = model._speech_head(
            states, frame_mask, model.layer_weights, model.cls_token, model.speech_encoder, model.speech_proj
        )
        cosine = (speech[0] * image_emb.float()).sum()
        (grad,) = torch.autograd.grad(cosine, [states])
    return speech[0].detach(), float(cosine.detach()), _speech_saliency(states, grad)


def frame_seconds(model) -> float:
    """Seconds per HuBERT frame (the product of the conv strides over the sample rate: 0.02 s)."""
    stride = 1
    for block in model.hubert.model.feature_extractor.conv_layers:
        conv = next(m for m in block if isinstance(m, torch.nn.Conv1d))
        stride *= conv.stride[0]
    return stride / float(model.hubert.sample_rate)


def combine_windows(per_window: List[List[Explanation]]) -> List[Explanation]:
    """The explanations of a clip embedded in several windows (each window's :func:`explain_pair`, in
    order): per kind, the mean of the windows' maps and scores (as the clip's embedding is the mean of
    its windows'), and their saliencies side by side in time."""
    if len(per_window) == 1:
        return per_window[0]
    out = []
    for group in zip(*per_window):
        raw = torch.stack([e.raw for e in group]).mean(dim=0)
        saliency = None
        if group[0].raw_saliency is not None:
            saliency = torch.cat([e.raw_saliency for e in group])
        out.append(
            Explanation(
                group[0].kind,
                normalise(raw),
                float(sum(e.score for e in group) / len(group)),
                None if saliency is None else normalise(saliency),
                group[0].frame_seconds,
                group[0].speech_kind,
                raw=raw,
                raw_saliency=saliency,
            )
        )
    return out


def explain_pair(model, states, frame_mask, pixels, first_only: bool = False) -> List[Explanation]:
    """Every explanation ``model`` can give of one pair: the HuBERT ``states`` (S, 1, T', D) and
    ``frame_mask`` of one utterance (``model.hubert(source)``), ``pixels`` (1, 3, H, W) of one image
    (the model's transform). In the module's order: the value-path cosine (towers that have one), the
    matching head's Grad-CAM (coarse-to-fine checkpoints loaded with their head), the cosine with each
    plain patch (all), the fusion attention (CMD checkpoints loaded with their fusion encoder);
    ``first_only``: the first of them only (what a results page shows). Eval mode; gradients reach the
    inputs only, never the weights' ``.grad`` (safe beside concurrent requests on one model)."""
    was_training = model.training
    model.eval()
    try:
        seconds = frame_seconds(model)
        tower = model.image_encoder
        dense = None
        with torch.no_grad():
            if tower.has_value_path:
                pooled, patches, dense = tower.value_path_patches(pixels)
            else:
                pooled, patches = tower(pixels)
        image_emb = F.normalize(pooled, dim=-1)  # unit-norm I_cls, as model.encode_image gives it
        speech, cosine, cos_saliency = _cosine_and_saliency(model, states, frame_mask, image_emb[0])
        out = []

        def cosine_map(kind, tokens):
            sims = patch_grid(patch_similarity(speech, tokens[0]))
            return Explanation(
                kind,
                normalise(sims),
                cosine,
                normalise(cos_saliency),
                seconds,
                "gradient x input of cos(S_cls, I_cls)",
                raw=sims,
                raw_saliency=cos_saliency,
            )

        if dense is not None:
            out.append(cosine_map("dense_similarity", dense))
            if first_only:
                return out
        if getattr(model, "multimodal", None) is not None and getattr(model, "matching_head", None) is not None:
            logit, cam, saliency = matching_gradcam(model, states, frame_mask, image_emb, patches)
            out.append(
                Explanation(
                    "matching_gradcam",
                    normalise(patch_grid(cam)),
                    logit,
                    normalise(saliency),
                    seconds,
                    "gradient x input of the match logit",
                    raw=patch_grid(cam),
                    raw_saliency=saliency,
                )
            )
            if first_only:
                return out
        out.append(cosine_map("patch_similarity", patches))
        if getattr(model, "fusion", None) is not None and not first_only:
            with torch.no_grad():
                attention = patch_grid(fusion_attention(model.fusion, speech, patches[0]))
            out.append(Explanation("fusion_attention", normalise(attention), cosine, None, seconds, raw=attention))
        return out
    finally:
        model.train(was_training)
