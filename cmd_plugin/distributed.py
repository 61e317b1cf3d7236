"""Global-batch helpers for data-parallel contrastive losses (plain torch.distributed).

Each worker gathers every worker's features so that negatives come from the global batch.
Only the local slice keeps its autograd graph; because every worker evaluates the same global
loss, the local slice still receives its complete gradient, and fairseq's sum of gradients
over workers equals the gradient of one process on the global batch. Parameters used directly
by the global loss on every worker (temperature, fusion encoder) would be counted once per
worker: :func:`replicated_param` scales their gradient by 1/world_size.
"""

from typing import List

import torch
import torch.distributed as dist


def gather_with_local_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``tensor`` (B_r, ...) from every rank along dim 0, in rank order.

    Ranks may hold different batch sizes. The returned slice of this rank is ``tensor`` itself
    (keeps its graph); the other slices are detached copies.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    size = torch.tensor([tensor.size(0)], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = tensor.detach()
    if tensor.size(0) < longest:
        pad = tensor.new_zeros((longest - tensor.size(0),) + tuple(tensor.shape[1:]))
        padded = torch.cat([padded, pad], dim=0)
    chunks: List[torch.Tensor] = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded.contiguous(), group=group)
    parts = [chunk[:n] for chunk, n in zip(chunks, sizes)]
    parts[rank] = tensor
    return torch.cat(parts, dim=0)


def replicated_param(param: torch.Tensor, world_size: int) -> torch.Tensor:
    """Same value as ``param``; gradient scaled by 1/world_size (see module docstring)."""
    if world_size <= 1:
        return param
    return param / world_size + param.detach() * (1.0 - 1.0 / world_size)


def data_parallel_group_and_size(group=None):
    """(group, world_size) of fairseq's data-parallel group, or (None, 1) when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    if group is None:
        from fairseq.distributed import (
            utils as distributed_utils,
        )  # lazy: the objectives import this module without fairseq

        group = distributed_utils.get_data_parallel_group()
    return group, dist.get_world_size(group)


def gather_sequences_with_local_grad(seq: torch.Tensor, mask, group=None):
    """Concatenate padded sequences (B_r, T_r, D) and their padding masks (B_r, T_r) (True at
    padding, or None) from every rank, in rank order: each rank pads to the longest T first
    (padding marked in the mask). Only this rank's slice keeps its graph.
    Returns (sequences (sum B_r, T_max, D), masks (sum B_r, T_max) bool)."""
    if mask is None:
        mask = torch.zeros(seq.shape[:2], dtype=torch.bool, device=seq.device)
    longest = torch.tensor([seq.size(1)], device=seq.device, dtype=torch.long)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
    extra = int(longest) - seq.size(1)
    if extra > 0:
        seq = torch.nn.functional.pad(seq, (0, 0, 0, extra))
        mask = torch.nn.functional.pad(mask, (0, extra), value=True)
    gathered_mask = gather_with_local_grad(mask.to(torch.uint8), group).bool()
    return gather_with_local_grad(seq, group), gathered_mask
