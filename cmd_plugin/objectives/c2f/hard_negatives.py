"""Hard negatives for speech-image matching (SIM), mined from the SIC similarities.

For every speech item one negative image, and for every image one negative speech item, drawn
with probability proportional to ``softmax`` of the SIC logits over the global batch, where
every column of the row's own image (the pair itself and every other caption of that image) has
probability 0 (ALBEF's ITM negatives, Sec. 3.2):

    P(c | r) = exp(l[r, c]) / sum_{c' : img(c') != img(r)} exp(l[r, c'])   if img(c) != img(r), else 0

Sampling is in fp32 with same-image columns masked before the softmax; a row without usable weights falls
back to a uniform choice; a row with no non-positive column is skipped (``valid`` False, index -1); an
explicit generator makes every worker draw alike. Why: docs/design.md.
"""

from typing import Optional, Tuple

import torch

from ..targets import same_image

__all__ = ["sample_hard_negatives", "negative_probabilities", "hard_negative_share"]


def negative_probabilities(
    logits: torch.Tensor, row_ids: torch.Tensor, col_ids: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sampling distribution of hard negatives.

    Args:
        logits: (R, C) SIC similarities divided by the temperature (any float dtype; computed
            in fp32 here, without gradient).
        row_ids: (R,) or (R, k) image identity of each row; col_ids: (C,) or (C, k) of each
            column (e.g. image id, or ``(split code, image id)``).
    Returns:
        probs (R, C) float32, each row summing to 1 over non-positive columns (0 on same-image
        columns); for a row with no usable weight the uniform distribution over its
        non-positive columns; a row without any non-positive column is all zeros.
        has_negative (R,) bool: the row has at least one non-positive column.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (R, C), got {tuple(logits.shape)}")
    rows, cols = logits.shape
    if row_ids.size(0) != rows or col_ids.size(0) != cols:
        raise ValueError(
            f"logits {tuple(logits.shape)} need {rows} row ids and {cols} column ids, "
            f"got {tuple(row_ids.shape)} and {tuple(col_ids.shape)}"
        )
    with torch.no_grad():
        positive = same_image(row_ids.to(logits.device), col_ids)
        negative = ~positive
        has_negative = negative.any(dim=1)
        masked = logits.detach().float().masked_fill(positive, float("-inf"))
        # a NaN or +inf logit, or no finite one, gives no distribution: uniform fallback below
        broken = torch.isnan(masked).any(dim=1) | torch.isposinf(masked).any(dim=1)
        usable = has_negative & ~broken & torch.isfinite(masked).any(dim=1)
        probs = torch.zeros(rows, cols, dtype=torch.float32, device=logits.device)
        if bool(usable.any()):
            probs[usable] = torch.softmax(masked[usable], dim=1)
        fallback = has_negative & ~usable
        if bool(fallback.any()):
            uniform = negative[fallback].float()
            probs[fallback] = uniform / uniform.sum(dim=1, keepdim=True)
        # belt and braces: positives are exactly 0 whatever the arithmetic did
        probs.masked_fill_(positive, 0.0)
    return probs, has_negative


def sample_hard_negatives(
    logits: torch.Tensor,
    row_ids: torch.Tensor,
    col_ids: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    hard_share: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One negative column per row: hard (drawn from :func:`negative_probabilities`) with probability
    ``hard_share``, else random (uniform over the row's non-positive columns).

    Speech -> negative image: ``logits`` = speech-to-image SIC logits (B_rows, B_global) with
    ``row_ids`` the speech items' image ids and ``col_ids`` the global batch's image ids.
    Image -> negative speech: the image-to-speech logits (the transpose), rows = images of
    the batch items.

    Args:
        logits: (R, C) SIC logits (fp16/bf16/fp32; sampled in fp32).
        row_ids, col_ids: (R,)/(R, k) and (C,)/(C, k) image identities.
        generator: torch.Generator (on the device sampled on; a CPU generator moves the weights
            to the CPU for sampling). None uses torch's global generator.
        hard_share: share of rows that draw a hard negative, in [0, 1] (the SIM curriculum's
            :func:`hard_negative_share`); at 1 the generator is used exactly as without it.
    Returns:
        index (R,) int64 column of each row's negative (on ``logits.device``), -1 for skipped
        rows; valid (R,) bool, False for rows with no non-positive column; hard (R,) bool, the
        row's negative was drawn from the hard distribution.
    """
    if not 0.0 <= hard_share <= 1.0:
        raise ValueError(f"hard_share must be in [0, 1], got {hard_share}")
    probs, valid = negative_probabilities(logits, row_ids, col_ids)
    device = logits.device
    hard = torch.ones(probs.size(0), dtype=torch.bool, device=device)
    if hard_share < 1.0:
        draw = torch.rand(probs.size(0), generator=generator, device=generator.device if generator else "cpu")
        hard = (draw < hard_share).to(device)
        negative = ~same_image(row_ids.to(device), col_ids)
        uniform = negative.float() / negative.sum(dim=1, keepdim=True).clamp(min=1)
        probs = torch.where(hard[:, None], probs, uniform)
    index = torch.full((probs.size(0),), -1, dtype=torch.long, device=device)
    if bool(valid.any()):
        weights = probs[valid]
        if generator is not None and weights.device != generator.device:
            weights = weights.to(generator.device)
        drawn = torch.multinomial(weights, 1, generator=generator)[:, 0]
        index[valid] = drawn.to(device)
    return index, valid, hard & valid


def hard_negative_share(num_updates: int, start: int, ramp: int) -> float:
    """The SIM negative curriculum: share of hard negatives after ``num_updates`` updates. Random
    negatives only before ``start``; then the share rises linearly to 1 over ``ramp`` updates
    (``ramp`` = 0: all hard from ``start`` on). start = ramp = 0 is ALBEF (hard from update 0)."""
    if start < 0 or ramp < 0:
        raise ValueError(f"hard-negative start and ramp must be >= 0 updates, got {start} and {ramp}")
    if num_updates < start:
        return 0.0
    if ramp == 0:
        return 1.0
    return min(1.0, (num_updates - start) / ramp)
