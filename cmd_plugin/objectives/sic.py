"""Speech-image contrastive loss (SIC): multi-positive symmetric InfoNCE (the CMD paper's Eq. 3-5).

Rows are speech items and columns image items of one (global) batch; every column showing the
row's image is a positive, with target ``1/n`` for a row of n positives
(:func:`cmd_plugin.objectives.targets.multi_positive_targets`). Losses are sums over the items.
"""

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .batch import GlobalBatch, Objective, present, summed
from .targets import multi_positive_targets, same_image

__all__ = ["soft_cross_entropy", "symmetric_infonce", "in_batch_accuracy", "SicObjective"]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row H(targets, softmax(logits)): (R, C), (R, C) -> (R,)."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


def symmetric_infonce(
    scores: torch.Tensor, row_keys: torch.Tensor, col_keys: torch.Tensor, logit_scale: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's Eq. 5 / Eq. 6 with multi-positive targets, summed over items.

    Args:
        scores: (B, B) similarities s(S_i, I_j) (cosine), speech rows, image columns.
        row_keys, col_keys: (B,) or (B, k) image identity of each row / column.
        logit_scale: scalar 1/temperature.
    Returns:
        (loss_sum, speech_to_image_sum, image_to_speech_sum): the loss is
        0.5 * (sum_i H(y_i, p^{s2i}_i) + sum_j H(y_j, p^{i2s}_j)); divide by B for the mean.
    """
    logits = scores * logit_scale
    s2i = soft_cross_entropy(logits, multi_positive_targets(row_keys, col_keys)).sum()
    i2s = soft_cross_entropy(logits.t(), multi_positive_targets(col_keys, row_keys)).sum()
    return 0.5 * (s2i + i2s), s2i, i2s


def in_batch_accuracy(scores: torch.Tensor, row_keys: torch.Tensor, col_keys: torch.Tensor) -> int:
    """Number of rows whose best-scoring column is one of their positives (ties: first index wins)."""
    best = scores.argmax(dim=1)
    rows = torch.arange(scores.size(0), device=scores.device)
    return int(same_image(row_keys, col_keys)[rows, best].sum())


class SicObjective(Objective):
    """L_sic over the batch's own pairs. Logs ``sic_loss`` (and per direction) and the in-batch
    retrieval accuracies ``s2i_acc`` / ``i2s_acc``."""

    def __call__(self, model, batch: GlobalBatch) -> Tuple[torch.Tensor, Dict[str, float]]:
        loss, s2i, i2s = symmetric_infonce(batch.scores, batch.keys, batch.keys, batch.logit_scale)
        return loss, self.logs(batch, loss, s2i, i2s)

    @staticmethod
    def logs(batch: GlobalBatch, loss, s2i, i2s) -> Dict[str, float]:
        return {
            "sic_loss": loss.item(),
            "sic_s2i_loss": s2i.item(),
            "sic_i2s_loss": i2s.item(),
            "s2i_correct": in_batch_accuracy(batch.scores, batch.keys, batch.keys),
            "i2s_correct": in_batch_accuracy(batch.scores.t(), batch.keys, batch.keys),
        }

    @staticmethod
    def reduce_metrics(logs, total, log_scalar) -> None:
        for key in ("sic_loss", "sic_s2i_loss", "sic_i2s_loss"):
            if present(logs, key):
                log_scalar(key, summed(logs, key) / total, total, 4)
        for key in ("s2i_correct", "i2s_correct"):
            if present(logs, key):
                log_scalar(key.replace("correct", "acc"), 100.0 * summed(logs, key) / total, total, 2)
