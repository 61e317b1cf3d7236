"""Losses of the coarse-to-fine method over tensors (no fairseq): SIC against [batch; queue] with
momentum distillation, and SIM on hard negatives mined from the SIC similarities.

Rows are the (global) batch's B items; every item has an image identity ``(split code, image id)``
(:mod:`cmd_plugin.objectives.targets`). Losses are SUMS over the B items, like :mod:`cmd_plugin.objectives.sic`
(the criterion divides by the batch size through fairseq's sample size).

SIC columns (the batch online, the queue momentum; why: docs/design.md):

    s2i logits = scale * speech   @ [image;   queue_image ]^T      (B, B + F)
    i2s logits = scale * image    @ [speech;  queue_speech]^T      (B, B + F)

With an empty queue and no distillation this is exactly the CMD paper's multi-positive SIC.
Momentum distillation replaces the targets by ``alpha * softmax(momentum logits) + (1 - alpha) * y``
with the momentum logits ``scale * speech_m @ [image; queue_image]^T`` and
``scale * image @ [speech_m; queue_speech]^T`` (the same columns with the momentum model's speech).
"""

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..sic import soft_cross_entropy
from ..targets import multi_positive_targets
from .distillation import distillation_targets
from .hard_negatives import sample_hard_negatives

__all__ = ["queue_sic_loss", "SimPairs", "sim_pairs", "sim_loss", "ranking_pairs", "binary_entropy"]


def queue_sic_loss(
    speech: torch.Tensor,
    image: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor,
    queue_speech: Optional[torch.Tensor] = None,
    queue_image: Optional[torch.Tensor] = None,
    queue_keys: Optional[torch.Tensor] = None,
    speech_m: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric multi-positive SIC over the columns [batch; queue], with momentum distillation.

    Args:
        speech: (B, E) online unit-norm speech embeddings (with gradient).
        image: (B, E) unit-norm image embeddings of the items' images.
        keys: (B, 2) image identity ``(split code, image id)`` of each item.
        logit_scale: scalar 1/tau.
        queue_speech, queue_image: (F, E) filled queue entries (momentum embeddings; no
            gradient), queue_keys (F, 2); all None (or F = 0) for no queue.
        speech_m: (B, E) momentum speech embeddings; needed when ``alpha`` > 0.
        alpha: distillation weight alpha_md in [0, 1] (0 = hard multi-positive targets).
    Returns:
        (loss_sum, s2i_sum, i2s_sum, s2i_logits (B, B + F)); loss = 0.5 * (s2i + i2s), each a
        sum over the B rows of H(target, softmax(logits)).
    """
    if queue_speech is None or queue_speech.size(0) == 0:
        queue_speech = speech.new_zeros(0, speech.size(1))
        queue_image = image.new_zeros(0, image.size(1))
        queue_keys = keys.new_zeros(0, keys.size(1))
    if alpha > 0 and speech_m is None:
        raise ValueError("momentum distillation (alpha > 0) needs the momentum speech embeddings")
    image_cols = torch.cat([image.float(), queue_image.float()])
    speech_cols = torch.cat([speech.float(), queue_speech.float()])
    col_keys = torch.cat([keys, queue_keys.to(keys.device)])
    s2i_logits = logit_scale * (speech.float() @ image_cols.t())
    i2s_logits = logit_scale * (image.float() @ speech_cols.t())
    targets = multi_positive_targets(keys, col_keys)  # the same for both directions: rows are items
    s2i_targets = i2s_targets = targets
    if alpha > 0:
        with torch.no_grad():
            scale = logit_scale.detach()
            s2i_m = scale * (speech_m.float() @ image_cols.t())
            i2s_m = scale * (image.float() @ torch.cat([speech_m.float(), queue_speech.float()]).t())
        s2i_targets = distillation_targets(s2i_m, targets, alpha)
        i2s_targets = distillation_targets(i2s_m, targets, alpha)
    s2i = soft_cross_entropy(s2i_logits, s2i_targets).sum()
    i2s = soft_cross_entropy(i2s_logits, i2s_targets).sum()
    return 0.5 * (s2i + i2s), s2i, i2s, s2i_logits


class SimPairs(NamedTuple):
    """The pairs SIM classifies: item indices into the batch, labels (1 = match) and, for each pair,
    whether it is a hard negative (False for positives and random negatives)."""

    speech_index: torch.Tensor
    image_index: torch.Tensor
    labels: torch.Tensor
    hard: torch.Tensor


def sim_pairs(
    sic_logits: torch.Tensor,
    keys: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    hard_shares: Sequence[float] = (1.0,),
) -> SimPairs:
    """The SIM pairs of a batch: its B positive pairs, then for each share in ``hard_shares`` one
    negative image per speech item and one negative speech item per image (ALBEF's ITM), hard
    with probability ``share`` (sampled from the SIC similarities), else random.

    Args:
        sic_logits: (B, B) in-batch SIC logits, speech rows x image columns (item j's image).
        keys: (B, 2) image identities; every column of a row's own image is masked out.
        generator: the sampling generator (give every data-parallel worker the same state and the
            GLOBAL batch: they then draw what one process draws).
        hard_shares: (1.0,) is ALBEF; (1.0, 0.0) adds a random negative next to the hard one
            (validation measures both).
    Returns:
        :class:`SimPairs`: the B positives first, then per share the negative images of the rows that
        have one, then the negative speech items of the images that have one (a row whose columns
        are all of its own image is skipped).
    """
    bsz = sic_logits.size(0)
    if sic_logits.shape != (bsz, bsz) or keys.shape[0] != bsz:
        raise ValueError(
            f"sic_logits must be (B, B) with B keys, got {tuple(sic_logits.shape)} and {tuple(keys.shape)}"
        )
    rows = torch.arange(bsz, device=sic_logits.device)
    speech, image, hard = [rows], [rows], [torch.zeros(bsz, dtype=torch.bool, device=rows.device)]
    for share in hard_shares:
        neg_image, has_image, hard_image = sample_hard_negatives(sic_logits, keys, keys, generator, share)
        neg_speech, has_speech, hard_speech = sample_hard_negatives(sic_logits.t(), keys, keys, generator, share)
        speech += [rows[has_image], neg_speech[has_speech]]
        image += [neg_image[has_image], rows[has_speech]]
        hard += [hard_image[has_image], hard_speech[has_speech]]
    speech_index, image_index = torch.cat(speech), torch.cat(image)
    labels = torch.zeros(speech_index.numel(), dtype=torch.long, device=rows.device)
    labels[:bsz] = 1
    return SimPairs(speech_index, image_index, labels, torch.cat(hard))


def ranking_pairs(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> Tuple[float, int]:
    """Mann-Whitney count of positives scored above negatives (ties count 1/2) and the number of
    (positive, negative) pairs: their ratio is the AUC, and both sum over batches."""
    if pos_scores.numel() == 0 or neg_scores.numel() == 0:
        return 0.0, 0
    diff = pos_scores.float()[:, None] - neg_scores.float()[None, :]
    return float((diff > 0).sum() + 0.5 * (diff == 0).sum()), int(diff.numel())


def binary_entropy(p: float) -> float:
    """H(p) in nats: the SIM loss of a head that predicts only the share of positives."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return float(-(p * math.log(p) + (1 - p) * math.log(1 - p)))


def sim_loss(match_logits: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Tuple[torch.Tensor, int]:
    """SIM cross-entropy of P pairs, scaled to a sum over the batch: ``batch_size * mean_p CE``
    (the criterion divides by the batch size, giving ALBEF's mean over the pairs).

    Args:
        match_logits: (P, 2) matching-head logits; labels: (P,) 1 = match, 0 = not.
    Returns:
        (loss, number of pairs classified correctly).
    """
    if match_logits.size(0) == 0:
        return match_logits.sum() * 0.0, 0
    ce = F.cross_entropy(match_logits.float(), labels, reduction="mean")
    correct = int((match_logits.argmax(dim=1) == labels).sum())
    return ce * batch_size, correct
