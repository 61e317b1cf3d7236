"""Momentum distillation of the coarse-to-fine method (ALBEF Sec. 3.3, "momentum distillation").

The momentum model's similarity distribution over the columns ``[batch; queue]`` is a soft
pseudo-target mixed into the hard multi-positive target, so that a plausible but unpaired
image (noisy supervision) is not pushed away as hard as a true negative:

    y~ = alpha_md * softmax(s_m / tau) + (1 - alpha_md) * y

with ``s_m`` the momentum similarities of a row against the same columns the online logits use,
``tau`` the (shared, learnable) temperature, and ``y`` the multi-positive targets. The loss is
the cross-entropy H(y~, softmax(s / tau)) of the online logits; at alpha_md = 0 it is the plain
multi-positive SIC loss. ALBEF writes the objective as (1 - alpha) * H(y, p) + alpha * KL(q || p)
(q the momentum distribution, p the online one); H(y~, p) equals it up to the entropy of q, which
has no gradient, and is what ALBEF's code computes. alpha_md is ramped linearly from 0 (ALBEF:
over the first epoch).
"""

import torch
import torch.nn.functional as F

__all__ = ["distillation_targets", "distillation_weight"]


def distillation_targets(momentum_logits: torch.Tensor, hard_targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Soft targets ``alpha * softmax(momentum_logits) + (1 - alpha) * hard_targets``.

    Args:
        momentum_logits: (R, C) momentum similarities already divided by the temperature
            (``s_m / tau``); computed without gradient (detached here). Columns the loss must
            never see (none, when empty queue slots are left out) may be -inf.
        hard_targets: (R, C) multi-positive targets, each row summing to 1
            (:func:`cmd_plugin.objectives.targets.multi_positive_targets`).
        alpha: alpha_md in [0, 1].
    Returns:
        (R, C) float32 targets, each row summing to 1 (no gradient). At ``alpha == 0`` they equal
        ``hard_targets`` exactly (the momentum logits are not even read).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation weight alpha must be in [0, 1], got {alpha}")
    if momentum_logits.shape != hard_targets.shape:
        raise ValueError(
            f"momentum logits {tuple(momentum_logits.shape)} and targets {tuple(hard_targets.shape)} differ in shape"
        )
    hard = hard_targets.detach().float()
    if alpha == 0.0:
        return hard.clone()
    soft = F.softmax(momentum_logits.detach().float(), dim=1)
    return alpha * soft + (1.0 - alpha) * hard


def distillation_weight(num_updates: int, alpha: float, ramp_updates: int) -> float:
    """alpha_md at ``num_updates``: linear from 0 to ``alpha`` over the first ``ramp_updates``
    updates, then constant (ALBEF: ``alpha * min(1, step / steps_in_first_epoch)`` in epoch 0).

    ``ramp_updates`` = 0 uses ``alpha`` from the first update. To ramp over the first epoch, pass
    the number of optimizer updates in one epoch (batches per epoch / update_freq).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation weight alpha must be in [0, 1], got {alpha}")
    if ramp_updates < 0:
        raise ValueError(f"ramp_updates must be >= 0, got {ramp_updates}")
    if num_updates < 0:
        raise ValueError(f"num_updates must be >= 0, got {num_updates}")
    if ramp_updates == 0:
        return float(alpha)
    return float(alpha) * min(1.0, num_updates / ramp_updates)
