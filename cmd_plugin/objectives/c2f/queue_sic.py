"""C2F's SIC: the batch scored against [batch; queue] with momentum distillation
(:func:`.losses.queue_sic_loss`), and the queue filled from the global batch after the loss.

Used in place of :class:`cmd_plugin.objectives.sic.SicObjective` when the model has a queue or
the criterion distils. At validation (no queue, no distillation) it is the in-batch SIC. The
queue is filled only by training forwards that are not fairseq's dummy batch, with this worker's
items gathered from every worker (so all workers hold the same queue), never with a non-finite
item, and only from update ``queue_start`` on. alpha_md ramps linearly from 0 over ``ramp_updates``
(:func:`.distillation.distillation_weight`).
Logs the SIC values plus ``distill_alpha`` and ``queue_negatives`` (per-item means).
"""

import math
from typing import Dict, Optional, Tuple

import torch

from ...modules.queue import enqueue_global_batch
from ..batch import GlobalBatch, present, summed
from ..sic import SicObjective, symmetric_infonce
from .distillation import distillation_weight
from .losses import queue_sic_loss

__all__ = ["QueueSicObjective", "ramp_updates_for"]


def ramp_updates_for(ramp_updates: int, epoch_batches: Optional[int], update_freq) -> int:
    """Updates over which alpha_md ramps: ``ramp_updates`` when >= 0; -1 means the first epoch,
    ceil(batches per epoch / update_freq) (ALBEF ramps over its first epoch)."""
    if ramp_updates >= 0:
        return ramp_updates
    if not epoch_batches:
        raise ValueError(
            "criterion.distill_ramp_updates=-1 ramps over the first epoch, whose length is not known "
            "here (no training iterator from task speech_image): give a number of updates"
        )
    freq = int(update_freq[0]) if hasattr(update_freq, "__getitem__") else int(update_freq)  # fairseq's list
    return max(1, math.ceil(epoch_batches / max(1, freq)))


class QueueSicObjective(SicObjective):
    def __init__(self, distill_alpha: float = 0.0, ramp_updates: int = -1, update_freq=1, queue_start: int = 0):
        """update_freq: fairseq's optimization.update_freq (an int, a list, or a callable returning one);
        queue_start: the queue is scored and filled from this update on."""
        if queue_start < 0:
            raise ValueError(f"criterion.queue_start must be >= 0 updates, got {queue_start}")
        self.queue_start = queue_start
        if not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"criterion.distill_alpha must be in [0, 1], got {distill_alpha}")
        if ramp_updates < -1:
            raise ValueError(
                f"criterion.distill_ramp_updates must be -1 (first epoch), 0 or positive, got {ramp_updates}"
            )
        self.distill_alpha, self.ramp_updates, self.update_freq = distill_alpha, ramp_updates, update_freq
        self.epoch_batches: Optional[int] = None  # this worker's training batches per epoch (set by the criterion)
        self.enqueue_enabled = True  # False for fairseq's dummy batch
        self.pending: Optional[Tuple[torch.Tensor, ...]] = None  # this worker's items, enqueued by enqueue()

    def check_model(self, model) -> None:
        if self.distill_alpha > 0 and getattr(model, "momentum_model", None) is None:
            raise ValueError("criterion.distill_alpha > 0 needs the momentum model: set model.c2f_momentum=true")

    def _queue(self, model, batch: GlobalBatch):
        """The model's queue in a training forward from ``queue_start`` on, else None."""
        if not batch.training or batch.update_num < self.queue_start:
            return None
        return getattr(model, "queue", None)

    def alpha(self, update_num: int) -> float:
        if self.distill_alpha == 0:
            return 0.0
        freq = 1
        if self.ramp_updates < 0:  # read only when needed: a callable defers an unresolved config value
            freq = self.update_freq() if callable(self.update_freq) else self.update_freq
        ramp = ramp_updates_for(self.ramp_updates, self.epoch_batches, freq)
        return distillation_weight(update_num, self.distill_alpha, ramp)

    def __call__(self, model, batch: GlobalBatch) -> Tuple[torch.Tensor, Dict[str, float]]:
        queue = self._queue(model, batch)
        alpha = self.alpha(batch.update_num) if batch.training else 0.0
        if queue is None and alpha == 0:  # validation, or neither part on: the CMD paper's in-batch SIC
            loss, s2i, i2s = symmetric_infonce(batch.scores, batch.keys, batch.keys, batch.logit_scale)
            return loss, self.logs(batch, loss, s2i, i2s)
        entries = queue.entries() if queue is not None else (None, None, None)
        loss, s2i, i2s, _ = queue_sic_loss(
            batch.speech, batch.image, batch.keys, batch.logit_scale, *entries, speech_m=batch.speech_m, alpha=alpha
        )
        logs = self.logs(batch, loss, s2i, i2s)
        logs["distill_alpha"] = alpha * batch.size
        if queue is not None:
            logs["queue_negatives"] = entries[0].size(0) * batch.size
        return loss, logs

    def enqueue(self, model, batch: GlobalBatch, local_items: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """After the loss read the queue: put this worker's (speech, image, keys) in it, gathered with
        every worker's (each worker takes part in the gather; a dummy batch contributes no rows)."""
        queue = self._queue(model, batch)
        if queue is None:
            return
        items = local_items if self.enqueue_enabled else tuple(t[:0] for t in local_items)
        # a non-finite item (a bad utterance; the task reports the batch) would poison every later loss
        finite = torch.isfinite(items[0]).all(dim=1) & torch.isfinite(items[1]).all(dim=1)
        if not bool(finite.all()):
            items = tuple(t[finite] for t in items)
        enqueue_global_batch(queue, *items, group=batch.group, world_size=batch.dp_world)

    @staticmethod
    def reduce_metrics(logs, total, log_scalar) -> None:
        SicObjective.reduce_metrics(logs, total, log_scalar)
        for key in ("distill_alpha", "queue_negatives"):
            if present(logs, key):
                log_scalar(key, summed(logs, key) / total, 0, 4)
