"""Frozen open_clip image tower as the image upstream: CLIP ViT-L/14 (the CMD paper) or a tower
built on a timm trunk, such as EVA-CLIP ViT-g/14 (``EVA01-g-14``, BLIP-2's image encoder, the
coarse-to-fine paper).

Only the visual tower is kept. Weights come from a LOCAL file: a named pretrained tag would make
open_clip download, which is never wanted here (and impossible on the training machines).

Both kinds of tower return the pooled embedding (open_clip's ``encode_image``) and the patch
tokens mapped into the same joint space by the map that produces the pooled embedding:

* open_clip ``VisionTransformer``: tokens after ``ln_post``, times ``proj``.
* open_clip ``TimmModel`` (a timm ViT-style trunk): timm pools the trunk's final tokens
  (``forward_features``, after the trunk's ``norm``) and projects only that pooled vector:
  ``fc_norm -> head_drop -> trunk.head`` (the joint-space Linear for EVA configs, whose
  ``timm_proj`` is null), then open_clip's own ``head`` (the Linear/MLP when ``timm_proj`` is
  "linear"/"mlp"; empty otherwise). That chain has no token-wise counterpart in timm, so this
  module MAKES ONE: the same chain is applied to every patch token,
  ``patches = head(trunk.head(fc_norm(tokens[:, num_prefix_tokens:])))``. With token pooling
  (EVA's ``timm_pool: token``, ``fc_norm`` = Identity) the CLS token and the patches then go
  through exactly the same LayerNorm + Linear, as in the VisionTransformer path; with average
  pooling the pooled vector is ``fc_norm(mean(tokens))`` while each patch is ``fc_norm(token)``.
  Prefix tokens (CLS, register tokens) are never patches. Attention pooling (timm ``map``,
  open_clip ``abs_attn``/``rot_attn``) has no per-token counterpart and is refused.

  BLIP-2 itself feeds its Q-Former the penultimate layer's 1,408-dim tokens, unprojected; here
  the patches are in the joint space like the CLIP path, so the CMD fusion and the C2F
  multimodal encoder see one kind of input whatever the tower.
"""

import inspect
import os
from pathlib import Path
from typing import Tuple

import open_clip
import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

from ..quiet import building_open_clip

# open_clip keeps a global list of config paths and rescans all of them on every
# add_model_config call: register each path once.
_REGISTERED_CONFIG_PATHS = set()


def register_model_config(model_config: str) -> None:
    """Make an open_clip model JSON (a file, or a directory of them) known to open_clip."""
    path = Path(model_config).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"open_clip model config not found: {model_config}")
    if path not in _REGISTERED_CONFIG_PATHS:
        open_clip.add_model_config(path)
        _REGISTERED_CONFIG_PATHS.add(path)


class ClipImageUpstream(nn.Module):
    """open_clip image tower (its own ViT, or a timm ViT-style trunk), frozen.

    Attributes:
        embed_dim: joint image-text embedding size E (768 for ViT-L/14, 1024 for EVA01-g-14).
        num_patches: number of patch tokens N (256 for ViT-L/14 and EVA01-g-14 at 224 px).
        preprocess: open_clip's eval transform for this model (PIL image -> (3, H, W) tensor).
        visual: the open_clip VisionTransformer or TimmModel.
        tower: "open_clip_vit" or "timm".
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14-quickgelu",
        pretrained: str = "",
        model_config: str = "",
        freeze: bool = True,
    ):
        super().__init__()
        if model_config:
            register_model_config(model_config)
        if model_name not in open_clip.list_models():
            where = f" (after registering {model_config})" if model_config else ""
            raise ValueError(f"unknown open_clip model '{model_name}'{where}")
        if pretrained and not os.path.isfile(pretrained):
            raise FileNotFoundError(
                f"open_clip weights file not found: {pretrained} (pretrained must be a local "
                "file such as open_clip_pytorch_model.bin; named tags would download)"
            )

        # no pretrained file: random weights, and open_clip's warning saying so passes
        with building_open_clip():
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=os.path.abspath(pretrained) if pretrained else None
            )
        visual = model.visual
        if isinstance(visual, VisionTransformer):
            self.tower = "open_clip_vit"
            if visual.attn_pool is not None:
                raise ValueError(
                    f"open_clip model '{model_name}' pools its image tokens by attention: its patch "
                    "tokens have no projection into the joint space; only plain ViT towers are supported"
                )
            if visual.proj is None:
                raise ValueError(f"open_clip model '{model_name}' has no visual projection")
            visual.output_tokens = True
            self.embed_dim = int(visual.proj.shape[1])
            self.num_patches = int(visual.grid_size[0] * visual.grid_size[1])
        elif isinstance(visual, TimmModel):
            self.tower = "timm"
            self.embed_dim = _timm_output_dim(visual)
            self.num_patches = _timm_num_patches(model_name, visual)
        else:
            raise ValueError(
                f"open_clip model '{model_name}' has an image tower of type {type(visual).__name__}; "
                "supported: open_clip VisionTransformer, or TimmModel on a timm ViT-style trunk"
            )
        # The text tower is dropped with `model`; only the image tower is registered here.
        self.visual = visual
        self.model_name = model_name
        self.preprocess = preprocess
        self.image_size = tuple(visual.image_size)
        self.freeze = freeze
        if freeze:
            self.visual.requires_grad_(False)
            self.visual.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            # fairseq calls model.train() every step: a frozen tower must stay deterministic.
            self.visual.eval()
        return self

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), preprocessed -> (pooled (B, E), patches (B, N, E)).

        pooled is the projected, un-normalised image embedding (open_clip's encode_image);
        patches are the patch tokens mapped into the joint space by the pooled embedding's own
        map (module docstring): ``ln_post`` then ``proj`` for open_clip's ViT,
        ``fc_norm -> trunk.head -> head`` token-wise for a timm trunk. The trunk runs once.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            if self.tower == "timm":
                trunk = self.visual.trunk
                tokens = trunk.forward_features(images)  # (B, prefix + N, C), after the trunk's norm
                pooled = self.visual.head(trunk.forward_head(tokens))
                patches = self._timm_patches_to_joint(tokens)
            else:
                pooled, tokens = self.visual(images)
                patches = tokens @ self.visual.proj
        return pooled, patches

    def _timm_patches_to_joint(self, tokens: torch.Tensor) -> torch.Tensor:
        """A timm trunk's tokens after its final norm (B, prefix + N, C) -> patches (B, N, E)."""
        trunk = self.visual.trunk
        patches = tokens[:, trunk.num_prefix_tokens :]
        return self.visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(patches))))

    @property
    def has_value_path(self) -> bool:
        """Whether :meth:`value_path_patches` can run: an open_clip ViT, or a timm trunk whose last block
        has ``norm1`` and an ``attn`` taking ``attn_mask`` (timm's VisionTransformer and Eva blocks)."""
        if self.tower != "timm":
            return True
        blocks = getattr(self.visual.trunk, "blocks", None)
        last = blocks[-1] if blocks is not None and len(blocks) else None
        if last is None or not hasattr(last, "norm1") or not hasattr(last, "attn"):
            return False
        return "attn_mask" in inspect.signature(last.attn.forward).parameters

    @torch.no_grad()
    def value_path_patches(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> (pooled, patches, value-path patches (B, N, E)), the tower run once.

        The value-path patches are MaskCLIP's dense features (Zhou et al., ECCV 2022): the last
        block's self-attention with every token attending to itself only (so its output is the value
        projection then the output projection of the token itself), without that block's residual and
        MLP, then the same final norm and joint-space map as the patches. The last block's query-key
        attention mixes every patch token with the whole image, which is why the plain patch tokens
        localise poorly; the value path keeps each token's own content. Used only to explain
        (:mod:`cmd_plugin.retrieval.explain`), never to train.
        """
        if self.tower == "timm":
            last = self.visual.trunk.blocks[-1]
            norm, attention = last.norm1, lambda x, mask: last.attn(x, attn_mask=mask)
        else:
            last = self.visual.transformer.resblocks[-1]
            norm, attention = last.ln_1, lambda x, mask: last.attention(q_x=x, attn_mask=mask)
        seen = []
        handle = last.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            pooled, patches = self.forward(images)
        finally:
            handle.remove()
        x = seen[-1]
        length = x.shape[1]
        itself = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device)
        itself.fill_diagonal_(0.0)
        values = attention(norm(x), itself)
        if self.tower == "timm":
            dense = self._timm_patches_to_joint(self.visual.trunk.norm(values))
        else:
            visual = self.visual
            if not visual.final_ln_after_pool:
                values = visual.ln_post(values)
            dense = visual._global_pool(values)[1] @ visual.proj
        return pooled, patches, dense


def _timm_output_dim(visual) -> int:
    """Width of the tower's output: the last Linear of the trunk's head and open_clip's head, or
    the trunk's width when neither projects (``timm_proj: none``)."""
    head = [m for m in list(visual.trunk.head.modules()) + list(visual.head.modules()) if isinstance(m, nn.Linear)]
    if not head:
        return int(visual.trunk.num_features)
    return int(head[-1].out_features)


def _timm_num_patches(model_name: str, visual) -> int:
    """Number of patch tokens of a timm ViT-style trunk at open_clip's image size; refuses
    trunks whose tokens cannot be mapped into the joint space one by one."""
    trunk = visual.trunk
    name = f"open_clip model '{model_name}' (timm trunk {type(trunk).__name__})"
    required = ("forward_features", "forward_head", "num_prefix_tokens", "patch_embed", "fc_norm", "head_drop", "head")
    missing = [a for a in required if not hasattr(trunk, a)]
    if missing:
        raise ValueError(
            f"{name} is not a ViT-style trunk (no {', '.join(missing)}): only trunks whose "
            "forward_features returns a token sequence (timm VisionTransformer, Eva, ...) are supported"
        )
    if getattr(trunk, "attn_pool", None) is not None or any(n == "pool" for n, _ in visual.head.named_children()):
        raise ValueError(
            f"{name} pools its tokens by attention: patch tokens have no per-token projection "
            "into the joint space; use token or average pooling"
        )
    if getattr(trunk, "global_pool", "token") not in ("token", "avg"):
        raise ValueError(f"{name} pools with {trunk.global_pool!r}; supported: 'token' or 'avg'")
    patch = trunk.patch_embed.patch_size
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    height, width = tuple(visual.image_size)
    if not getattr(trunk, "dynamic_img_size", False):
        built = tuple(trunk.patch_embed.img_size)
        if built != (height, width):
            raise ValueError(
                f"{name} is built for {built[0]}x{built[1]} px images but the config's image_size is "
                f"{height}x{width}: set vision_cfg.image_size to {built[0]}"
            )
    return int((height // patch[0]) * (width // patch[1]))
