"""What every objective reads: the (global) batch of one forward, and the objective interface.

Conventions for every objective of :mod:`cmd_plugin.objectives`:

* losses are SUMS over the B items of the global batch (the criterion's sample size is the local
  batch size, so fairseq's sum of worker gradients / total sample size is the gradient of the
  global mean);
* logged values are global sums too; the criterion logs this worker's share of them
  (``local / global`` items), so that fairseq's sum over workers counts them once;
* an objective that owns a trainable head takes it from the model (fairseq's model owns every
  parameter: data parallelism, fp16 and checkpoints see them) and wraps it with
  :func:`cmd_plugin.distributed.replicated_param` when every worker computes the same global loss.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["GlobalBatch", "Objective"]


@dataclass
class GlobalBatch:
    """One forward's embeddings, gathered over the data-parallel workers when the loss uses global
    negatives (then ``world`` is the number of workers; else 1 and the tensors are local).

    speech (B, E), image (B, E): unit-norm S_cls and I_cls of each item (with gradient where local);
    patches (B, N, E): the image's patch features; keys (B, 2): ``(split code, image id)``;
    logit_scale: scalar 1/tau (replicated); seq (B, 1+T, D) / seq_mask (B, 1+T): the speech layer's
    output and padding mask (for SIM; None when not gathered); speech_m (B, E): momentum S_cls
    (training with a momentum model); local_size: this worker's items; training: a training forward;
    update_num: optimizer updates done; group/dp_world: the data-parallel group and its size (for
    collectives such as the queue's, which take every worker's local items).
    """

    speech: torch.Tensor
    image: torch.Tensor
    patches: torch.Tensor
    keys: torch.Tensor
    logit_scale: torch.Tensor
    world: int
    local_size: int
    training: bool
    update_num: int = 0
    seq: Optional[torch.Tensor] = None
    seq_mask: Optional[torch.Tensor] = None
    speech_m: Optional[torch.Tensor] = None
    group: object = None
    dp_world: int = 1
    seq_is_global: bool = True  # seq/seq_mask/patches span every worker's items (False: this worker's only)

    @property
    def size(self) -> int:
        return self.speech.size(0)

    @cached_property
    def scores(self) -> torch.Tensor:
        """(B, B) cosine similarities s(S_i, I_j), speech rows, image columns (fp32)."""
        return self.speech.float() @ self.image.float().t()


class Objective:
    """One weighted term of the criterion's loss.

    ``check_model(model)`` raises ValueError naming the config key when the model lacks the part the
    objective needs; ``__call__(model, batch)`` returns (loss sum, logged global sums);
    ``reduce_metrics(logs, total, log_scalar)`` turns the summed logs into fairseq metrics through
    the given ``log_scalar(key, value, weight, round)``.
    """

    def check_model(self, model) -> None:
        pass

    def __call__(self, model, batch: GlobalBatch) -> Tuple[torch.Tensor, Dict[str, float]]:
        raise NotImplementedError

    @staticmethod
    def reduce_metrics(logs, total: float, log_scalar: Callable) -> None:
        pass


def summed(logs, key: str) -> float:
    """Sum of ``key`` over logging outputs (0 where absent)."""
    return sum(log.get(key, 0) for log in logs)


def present(logs, key: str) -> bool:
    return any(key in log for log in logs)
