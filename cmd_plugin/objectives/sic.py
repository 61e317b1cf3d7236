"""Contrastive losses over tensors (no fairseq): multi-positive symmetric InfoNCE.

Rows are speech items and columns are image items of one (global) batch. Items are tied to
an image identity; every column whose image is the row's image is a positive. A row with n
positives gets the target 1/n on each of them (the paper's multi-positive targets).
"""

from typing import Tuple

import torch
import torch.nn.functional as F


def multi_positive_targets(row_image_ids: torch.Tensor, col_image_ids: torch.Tensor) -> torch.Tensor:
    """(R,) and (C,) image ids -> (R, C) float targets, each row summing to 1.

    Raises ValueError when a row has no positive column (its image is absent from the columns).
    """
    same = (row_image_ids[:, None] == col_image_ids[None, :]).float()
    counts = same.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        missing = row_image_ids[(counts[:, 0] == 0)].tolist()
        raise ValueError(f"image ids {missing[:5]} of rows have no positive column")
    return same / counts


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row H(targets, softmax(logits)): (R, C), (R, C) -> (R,)."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


def symmetric_infonce(
    scores: torch.Tensor, row_image_ids: torch.Tensor, col_image_ids: torch.Tensor, logit_scale: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's Eq. 5 / Eq. 6 with multi-positive targets, summed (not averaged) over items.

    Args:
        scores: (B, B) similarities s(S_i, I_j) (cosine), speech rows, image columns.
        row_image_ids, col_image_ids: (B,) image identity of each row / column.
        logit_scale: scalar 1/temperature.
    Returns:
        (loss_sum, speech_to_image_sum, image_to_speech_sum): the loss is
        0.5 * (sum_i H(y_i, p^{s2i}_i) + sum_j H(y_j, p^{i2s}_j)); divide by B for the mean.
    """
    logits = scores * logit_scale
    s2i = soft_cross_entropy(logits, multi_positive_targets(row_image_ids, col_image_ids)).sum()
    i2s = soft_cross_entropy(logits.t(), multi_positive_targets(col_image_ids, row_image_ids)).sum()
    return 0.5 * (s2i + i2s), s2i, i2s


def in_batch_accuracy(scores: torch.Tensor, row_image_ids: torch.Tensor, col_image_ids: torch.Tensor) -> int:
    """Number of rows whose best-scoring column is one of their positives (ties: first index wins)."""
    best = scores.argmax(dim=1)
    return int((col_image_ids[best] == row_image_ids).sum())
