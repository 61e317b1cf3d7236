"""Embedding queue (coarse-to-fine): a ring buffer that takes any batch size, never offers empty
slots as negatives, gives multi-positive targets by split-aware image identity, checkpoints as
buffers, and holds the same entries on every data-parallel worker."""

import os
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cmd_plugin.modules.queue import (
    EmbeddingQueue,
    check_queue_size,
    enqueue_global_batch,
)
from cmd_plugin.objectives.targets import multi_positive_targets

DIM_S, DIM_I = 3, 5


def _batch(n, start, split=7):
    """n items whose embeddings encode their running number (start + t), for exact checks."""
    numbers = torch.arange(start, start + n, dtype=torch.float32)
    speech = numbers[:, None].repeat(1, DIM_S)
    image = -numbers[:, None].repeat(1, DIM_I)
    keys = torch.stack([torch.full((n,), split), (numbers // 2).long()], dim=1)
    return speech, image, keys


class _ListQueue:
    """Reference: a Python list of the last Q items, written one by one into slots."""

    def __init__(self, size):
        self.size, self.slots, self.ptr = size, [None] * size, 0

    def push(self, speech, image, keys):
        for t in range(speech.size(0)):
            self.slots[self.ptr] = (speech[t], image[t], keys[t])
            self.ptr = (self.ptr + 1) % self.size


def _assert_same(queue, ref):
    assert int(queue.ptr) == ref.ptr
    for slot, item in enumerate(ref.slots):
        assert bool(queue.valid[slot]) == (item is not None)
        if item is not None:
            assert torch.equal(queue.speech[slot], item[0])
            assert torch.equal(queue.image[slot], item[1])
            assert torch.equal(queue.image_key[slot], item[2])


def test_ring_buffer_wraps_around_with_odd_batch_sizes():
    queue, ref = EmbeddingQueue(7, DIM_S, DIM_I), _ListQueue(7)
    start = 0
    # odd sizes, a zero, sizes that straddle the end, one equal to and two larger than the queue
    for n in [3, 5, 1, 0, 6, 7, 2, 9, 4, 15, 1]:
        batch = _batch(n, start)
        queue.enqueue(*batch)
        ref.push(*batch)
        start += n
        _assert_same(queue, ref)
    assert int(queue.num_enqueued) == start


def test_empty_slots_are_never_entries_and_entries_are_copies():
    queue = EmbeddingQueue(10, DIM_S, DIM_I)
    assert len(queue) == 0 and queue.entries()[0].shape == (0, DIM_S)
    queue.enqueue(*_batch(4, 100))
    speech, image, keys = queue.entries()
    assert speech.shape == (4, DIM_S) and image.shape == (4, DIM_I) and keys.shape == (4, 2)
    assert torch.equal(speech[:, 0], torch.arange(100, 104, dtype=torch.float32))

    # a loss built on the entries still runs backward after the next enqueue (ALBEF clones)
    online = torch.randn(2, DIM_S, requires_grad=True)
    loss = (online @ queue.entries()[0].T).logsumexp(dim=1).sum()
    queue.enqueue(*_batch(9, 200))
    loss.backward()
    assert online.grad is not None and torch.equal(speech[:, 0], torch.arange(100, 104, dtype=torch.float32))


def test_multi_positive_targets_span_batch_and_queue_and_respect_split():
    # batch: items of images 1, 2, 1 in split A; queue: image 1 of A, image 1 of split B, image 3 of A
    a, b = 11, 22
    batch_keys = torch.tensor([[a, 1], [a, 2], [a, 1]])
    queue_keys = torch.tensor([[a, 1], [b, 1], [a, 3]])
    targets = multi_positive_targets(batch_keys, torch.cat([batch_keys, queue_keys]))
    expected = torch.tensor(
        [
            [1 / 3, 0, 1 / 3, 1 / 3, 0, 0],  # image 1 of B (column 4) is another image
            [0, 1, 0, 0, 0, 0],
            [1 / 3, 0, 1 / 3, 1 / 3, 0, 0],
        ]
    )
    torch.testing.assert_close(targets, expected)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="no column of their image"):
        multi_positive_targets(batch_keys, queue_keys[1:])


def test_queue_larger_than_training_split_is_refused():
    check_queue_size(30000, 30000, "train")
    with pytest.raises(ValueError, match=r"65536 .* 30000 captions of training split 'train'"):
        check_queue_size(65536, 30000, "train")
    with pytest.raises(ValueError, match="positive int"):
        EmbeddingQueue(0, DIM_S)


def test_queue_round_trips_through_state_dict_and_names_a_size_mismatch(tmp_path):
    queue = EmbeddingQueue(6, DIM_S, DIM_I)
    queue.enqueue(*_batch(8, 0))
    path = tmp_path / "queue.pt"
    torch.save(queue.state_dict(), path)
    restored = EmbeddingQueue(6, DIM_S, DIM_I)
    restored.load_state_dict(torch.load(path))
    for a, b in zip(queue.buffers(), restored.buffers()):
        assert torch.equal(a, b)
    # continuing gives the same queue as never stopping
    queue.enqueue(*_batch(5, 8))
    restored.enqueue(*_batch(5, 8))
    for a, b in zip(queue.buffers(), restored.buffers()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"queue speech has shape \(6, 3\).*\(9, 3\)"):
        EmbeddingQueue(9, DIM_S, DIM_I).load_state_dict(torch.load(path))


def test_single_process_enqueue_needs_no_process_group():
    assert not dist.is_initialized()
    queue = EmbeddingQueue(5, DIM_S, DIM_I)
    enqueue_global_batch(queue, *_batch(3, 0))
    assert len(queue) == 3


# ---- two gloo workers == one process on the same global batches ----

GLOBAL_SIZES = [5, 3, 7, 2, 6]
RANK0_SHARE = [3, 0, 5, 1, 2]  # uneven, one empty local batch, a global batch larger than the queue
QUEUE_SIZE = 6


def _global_batches():
    start, out = 0, []
    for n in GLOBAL_SIZES:
        out.append(_batch(n, start, split=3))
        start += n
    return out


def _worker(rank, port, out_path):
    # The worker leaves with os._exit, never through the gloo process group's destructor: in torch 2.4
    # (environment B) destroy_process_group deadlocked once after the work was done (its destructor
    # joins a gloo thread that waits for the GIL the destructor holds). mp.spawn reads the exit code.
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        queue = EmbeddingQueue(QUEUE_SIZE, DIM_S, DIM_I)
        for batch, share in zip(_global_batches(), RANK0_SHARE):
            rows = slice(0, share) if rank == 0 else slice(share, None)
            enqueue_global_batch(queue, *(t[rows] for t in batch), group=dist.group.WORLD, world_size=2)
        torch.save(queue.state_dict(), f"{out_path}.{rank}")
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_workers_fill_the_queue_as_one_process(tmp_path):
    out = str(tmp_path / "queue")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    single = EmbeddingQueue(QUEUE_SIZE, DIM_S, DIM_I)
    for batch in _global_batches():
        enqueue_global_batch(single, *batch)
    expected = single.state_dict()
    assert bool(expected["valid"].all()) and int(expected["num_enqueued"]) == sum(GLOBAL_SIZES)
    for rank in (0, 1):
        state = torch.load(f"{out}.{rank}")
        assert set(state) == set(expected)
        for key, value in expected.items():
            assert torch.equal(state[key], value), f"rank {rank}: {key} differs"
    os.remove(f"{out}.0")
    os.remove(f"{out}.1")
