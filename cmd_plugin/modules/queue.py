"""Embedding queue of the coarse-to-fine method: momentum features of past batches as extra SIC
negatives (the paper's "embedding queue"; ALBEF's ``image_queue``/``text_queue``/``idx_queue``).

A ring buffer of Q slots, each holding one caption's momentum speech embedding, its image's
momentum embedding, and the image's identity ``(split code, image id)``. Pure torch (no
fairseq): an ``nn.Module`` whose state is registered buffers, so it is saved in checkpoints with
the model that owns it and restored on resume.

Empty slots are never negatives; identities are split-aware; any batch size; every worker holds the
same queue (filled from the global batch). How this differs from ALBEF/BLIP: docs/design.md.
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..distributed import data_parallel_group_and_size, gather_with_local_grad

__all__ = [
    "EmbeddingQueue",
    "check_queue_size",
    "enqueue_global_batch",
    "gather_global",
]


def check_queue_size(queue_size: int, num_train_items: int, split: str = "train") -> None:
    """Refuse a queue that cannot hold distinct items: ``queue_size`` > training captions.

    A queue larger than the training split only repeats stale copies of items it already holds
    (a caption's older momentum embedding next to its newer one), costs memory in every
    checkpoint, and never fills with new information. Call it when the training split is known
    (e.g. the task's ``load_dataset``).

    Raises ValueError naming the split and both sizes.
    """
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
        raise ValueError(f"queue size must be a non-negative int, got {queue_size!r}")
    if queue_size > num_train_items:
        raise ValueError(
            f"queue size {queue_size} is larger than the {num_train_items} captions of training split "
            f"{split!r}: the queue would hold stale duplicates of the same captions. Choose a queue size "
            f"<= {num_train_items} (ALBEF's 65,536 is for millions of captions)"
        )


class EmbeddingQueue(nn.Module):
    """Ring buffer of the last Q (speech, image, identity) momentum entries.

    Buffers (all in ``state_dict``):
        speech (Q, Ds), image (Q, Di): embeddings (stored as given, normally L2-normalised
            momentum features; dtype follows the module, e.g. ``.half()``).
        image_key (Q, 2) int64: ``(split code, image id)``; -1 in empty slots.
        valid (Q,) bool: slot filled.
        ptr () int64: next slot to write.
        num_enqueued () int64: items written since creation (for logging).
    """

    def __init__(self, size: int, speech_dim: int, image_dim: Optional[int] = None):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"queue size must be a positive int, got {size!r}")
        image_dim = speech_dim if image_dim is None else image_dim
        self.size = size
        self.register_buffer("speech", torch.zeros(size, speech_dim))
        self.register_buffer("image", torch.zeros(size, image_dim))
        self.register_buffer("image_key", torch.full((size, 2), -1, dtype=torch.long))
        self.register_buffer("valid", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_enqueued", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"size={self.size}, speech_dim={self.speech.size(1)}, image_dim={self.image.size(1)}"

    def __len__(self) -> int:
        """Number of filled slots."""
        return int(self.valid.sum())

    @torch.no_grad()
    def enqueue(self, speech: torch.Tensor, image: torch.Tensor, image_key: torch.Tensor) -> None:
        """Write a batch of n items: item t to slot ``(ptr + t) % Q``; ptr advances by n.

        Args:
            speech: (n, Ds), image: (n, Di) embeddings (detached here).
            image_key: (n, 2) integer ``(split code, image id)``.
        Any n >= 0; with n > Q only the last Q items are kept (as if written one by one).
        """
        n = speech.size(0)
        if speech.dim() != 2 or speech.size(1) != self.speech.size(1):
            raise ValueError(f"speech must be (n, {self.speech.size(1)}), got {tuple(speech.shape)}")
        if image.dim() != 2 or image.shape != (n, self.image.size(1)):
            raise ValueError(f"image must be ({n}, {self.image.size(1)}), got {tuple(image.shape)}")
        if image_key.shape != (n, 2) or image_key.is_floating_point():
            raise ValueError(
                f"image_key must be ({n}, 2) integers (split code, image id), got "
                f"{image_key.dtype} {tuple(image_key.shape)}"
            )
        if n == 0:
            return
        start = max(0, n - self.size)
        slots = (int(self.ptr) + torch.arange(start, n, device=self.ptr.device)) % self.size
        self.speech[slots] = speech[start:].detach().to(self.speech.dtype)
        self.image[slots] = image[start:].detach().to(self.image.dtype)
        self.image_key[slots] = image_key[start:].to(self.image_key.device, torch.long)
        self.valid[slots] = True
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.num_enqueued.add_(n)

    def entries(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Filled slots only, as copies (enqueueing later never changes them, so a loss built
        on them can still run backward after the next enqueue):
        (speech (F, Ds), image (F, Di), image_key (F, 2)), F = number of filled slots, in slot order."""
        index = self.valid.nonzero(as_tuple=False)[:, 0]
        return (
            self.speech.index_select(0, index),
            self.image.index_select(0, index),
            self.image_key.index_select(0, index),
        )

    @torch.no_grad()
    def clear(self) -> None:
        self.speech.zero_()
        self.image.zero_()
        self.image_key.fill_(-1)
        self.valid.fill_(False)
        self.ptr.zero_()
        self.num_enqueued.zero_()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # a clearer message than torch's size mismatch when the configured size changed
        for name in ("speech", "image"):
            key = prefix + name
            if key in state_dict and tuple(state_dict[key].shape) != tuple(getattr(self, name).shape):
                raise ValueError(
                    f"checkpoint queue {key} has shape {tuple(state_dict[key].shape)} but the model's queue is "
                    f"{tuple(getattr(self, name).shape)} (size, dim): resume with the queue size and embedding "
                    "dim the checkpoint was trained with"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def gather_global(tensor: torch.Tensor, group=None, world_size: int = 1) -> torch.Tensor:
    """Detached concatenation of ``tensor`` (n_r, ...) over the data-parallel ranks, in rank
    order (ranks may hold different n_r); ``tensor`` itself when ``world_size`` is 1."""
    tensor = tensor.detach()
    if world_size <= 1:
        return tensor
    return gather_with_local_grad(tensor, group)


@torch.no_grad()
def enqueue_global_batch(
    queue: EmbeddingQueue,
    speech: torch.Tensor,
    image: torch.Tensor,
    image_key: torch.Tensor,
    group=None,
    world_size: Optional[int] = None,
) -> None:
    """Enqueue this worker's items together with every other worker's, in rank order.

    Every worker calls it with its LOCAL batch (n_r items, sizes may differ) and ends with the
    same queue: the one a single process would hold after enqueueing the concatenated global
    batch. ``group``/``world_size`` default to fairseq's data-parallel group
    (:func:`cmd_plugin.distributed.data_parallel_group_and_size`); a single process needs no
    process group. Call it after the loss has read :meth:`EmbeddingQueue.entries`, so a batch
    is never its own queue negative.
    """
    if world_size is None:
        group, world_size = data_parallel_group_and_size(group)
    queue.enqueue(
        gather_global(speech, group, world_size),
        gather_global(image, group, world_size),
        gather_global(image_key.to(torch.long), group, world_size),
    )
