"""Frozen open_clip image tower (CLIP ViT-L/14 in the paper) as the image upstream.

Only the visual tower is kept. Weights come from a LOCAL file: a named pretrained tag would make
open_clip download, which is never wanted here (and impossible on the training machines).
"""

import os
from pathlib import Path
from typing import Tuple

import torch
from torch import nn

import open_clip
from open_clip.transformer import VisionTransformer

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
    """open_clip ViT image encoder, frozen.

    Attributes:
        embed_dim: joint image-text embedding size E (768 for ViT-L/14).
        num_patches: number of patch tokens N (256 for ViT-L/14 at 224 px).
        preprocess: open_clip's eval transform for this model (PIL image -> (3, H, W) tensor).
        visual: the open_clip VisionTransformer.
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

        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=os.path.abspath(pretrained) if pretrained else None
        )
        visual = model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ValueError(
                f"open_clip model '{model_name}' has no plain ViT image tower "
                f"({type(visual).__name__}); only open_clip VisionTransformer is supported"
            )
        if visual.proj is None:
            raise ValueError(f"open_clip model '{model_name}' has no visual projection")
        # The text tower is dropped with `model`; only the image tower is registered here.
        visual.output_tokens = True
        self.visual = visual
        self.model_name = model_name
        self.preprocess = preprocess
        self.embed_dim = int(visual.proj.shape[1])
        self.num_patches = int(visual.grid_size[0] * visual.grid_size[1])
        self.image_size = tuple(visual.image_size)
        self.freeze = freeze
        if freeze:
            self.visual.requires_grad_(False)
            self.visual.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            # fairseq calls model.train() every step; a frozen tower must stay deterministic.
            self.visual.eval()
        return self

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), preprocessed -> (pooled (B, E), patches (B, N, E)).

        pooled is the projected, un-normalised image embedding (open_clip's encode_image);
        patches are the patch tokens after ln_post, projected into the joint space with visual.proj.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            pooled, tokens = self.visual(images)
            patches = tokens @ self.visual.proj
        return pooled, patches
