"""Cross-modal denoising noise: swap a share of each image's patches with other images' patches.

Pure tensor functions (no fairseq). The plan (which positions, taken from which items) is drawn
for a whole batch from a ``torch.Generator`` so that every data-parallel worker, seeded alike,
draws the same plan for the same global batch.
"""

from typing import Tuple

import torch


def num_noised_patches(num_patches: int, ratio: float) -> int:
    """Number of patch positions replaced per image: round(ratio * N)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"patch noise ratio must be in [0, 1], got {ratio}")
    return int(round(ratio * num_patches))


def draw_patch_noise(
    image_ids: torch.Tensor, num_patches: int, ratio: float, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw which patches of each item are replaced, and by which other item's patch.

    Args:
        image_ids: (B,) image identity of each item; sources are drawn only among items whose
            image differs (captions of the same image share an image, which would be no noise).
        num_patches: N patches per image.
        ratio: share of the N positions replaced in every item.
        generator: CPU generator; the same state gives the same plan.
    Returns:
        positions (B, k) distinct patch positions per item, sources (B, k) item index whose
        patch at the same position replaces it; k = round(ratio * N). Items whose image is the
        only one in the batch have no possible source: their row of ``sources`` is -1.
    """
    image_ids = image_ids.detach().cpu()
    batch = image_ids.numel()
    k = num_noised_patches(num_patches, ratio)
    scores = torch.rand(batch, num_patches, generator=generator)
    positions = scores.argsort(dim=1)[:, :k]
    others = image_ids[None, :] != image_ids[:, None]  # (B, B) allowed sources per item
    num_others = others.sum(dim=1)
    # uniform choice among the allowed sources: the r-th allowed item, r ~ U{0..count-1}
    pick = torch.floor(torch.rand(batch, k, generator=generator) * num_others.clamp(min=1)[:, None]).long()
    sources = torch.full((batch, k), -1, dtype=torch.long)
    for b in range(batch):
        if num_others[b] > 0:
            candidates = torch.nonzero(others[b], as_tuple=False)[:, 0]
            sources[b] = candidates[pick[b]]
    return positions, sources


def apply_patch_noise(patches: torch.Tensor, positions: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Return a copy of ``patches`` (B, N, D) with ``patches[b, p] = patches[sources[b, i], p]``
    for each ``p = positions[b, i]``; rows with source -1 are left clean."""
    positions = positions.to(patches.device)
    sources = sources.to(patches.device)
    valid = sources >= 0
    rows = torch.arange(patches.size(0), device=patches.device)[:, None].expand_as(positions)
    noisy = patches.clone()
    noisy[rows[valid], positions[valid]] = patches[sources[valid], positions[valid]]
    return noisy
