"""Who is a positive of whom: image identities and multi-positive targets (pure torch).

An item (a spoken caption) is tied to its image by an identity. Image ids are unique within a
split only, so the identity used by the losses is the pair ``(split code, image id)``, shape
(B, 2) int64: a worker that runs fairseq's dummy batch (a training batch) during validation
never makes a train image a positive of a valid one. Every function also takes plain (B,) ids.
"""

import zlib

import torch

__all__ = ["split_code", "item_keys", "same_image", "multi_positive_targets"]


def split_code(split: str) -> int:
    """A split name as an integer that can travel in a tensor collective (CRC-32 of its name)."""
    return zlib.crc32(split.encode("utf-8"))


def item_keys(split_codes: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """(B,) split codes and (B,) image ids -> (B, 2) int64 identities ``(split code, image id)``."""
    return torch.stack([split_codes.long(), image_ids.long()], dim=1)


def same_image(row_keys: torch.Tensor, col_keys: torch.Tensor) -> torch.Tensor:
    """(R,) or (R, k) and (C,) or (C, k) identities -> (R, C) bool: row and column share the image."""
    if row_keys.dim() == 1 and col_keys.dim() == 1:
        return row_keys[:, None] == col_keys[None, :].to(row_keys.device)
    if row_keys.dim() != 2 or col_keys.dim() != 2 or row_keys.size(1) != col_keys.size(1):
        raise ValueError(
            f"image keys must be (N,) or (N, k) with the same k, got {tuple(row_keys.shape)} and {tuple(col_keys.shape)}"
        )
    return (row_keys[:, None, :] == col_keys[None, :, :].to(row_keys.device)).all(dim=-1)


def multi_positive_targets(row_keys: torch.Tensor, col_keys: torch.Tensor) -> torch.Tensor:
    """The paper's multi-positive targets: (R, C) float, ``1 / n_r`` on the n_r columns of row r's
    image and 0 elsewhere, so each row sums to 1. Columns may be the batch followed by queue
    entries (ALBEF's ``sim_targets``).

    Raises ValueError when a row has no column of its image.
    """
    same = same_image(row_keys, col_keys).float()
    counts = same.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        missing = row_keys[counts[:, 0] == 0].tolist()
        raise ValueError(f"rows with image keys {missing[:5]} have no positive column (no column of their image)")
    return same / counts
