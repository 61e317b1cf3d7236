"""Benchmark: padding, upstream compute and contrastive mixing of training batches.

ASSUMED length distribution (no corpus here): Flickr 8k spoken-caption-like, 30,000 training
utterances (6,000 images x 5 captions), durations log-normal with mean 4.5 s and sd 1.6 s,
clipped to [1, 15] s, 16 kHz. Nothing is read from disk: a fake manifest carries the sizes.

Batchings compared, all with 128 utterances per update:
  random      shuffled indices cut into batches (new permutation each epoch)
  fairseq N   fairseq's own path: ``SpeechImageTask.get_batch_iterator`` over a
              ``SpeechImageDataset`` with ``num_length_buckets=N`` (ordered_indices ->
              batch_by_size -> EpochBatchIterator, shuffled batch order, sharding), iterated
              epoch after epoch as fairseq's trainer does (get_train_iterator each epoch).
              The dataset is subclassed only so that an item is its index (no audio/image I/O).
  rebuilt N   the same, but batches re-formed each epoch (fairseq does that when the cached
              epoch iterator is not reused: here via ``disable_iterator_cache=True``, as a
              dataset with ``can_reuse_epoch_itr_across_epochs = False`` would get).

Figures per batching (over one epoch; mixing over epochs 1 and 2):
  padded %      padded samples / (batch size x longest utterance), summed over batches
  compute       sum over batches of (batch size x longest) / sum of real lengths: the frozen
                upstreams' work relative to no padding (CNN and FFN cost is linear in length)
  repeat pairs  of the utterance pairs that share a (global) batch in epoch 1, the share that
                share one again in epoch 2 (random batches of 128 out of 30,000: ~0.4 %)
  new negatives distinct in-batch partners an utterance meets over 2 epochs / (2 x 127)

Usage:
  python benchmarks/bench_batching.py                          # 1 worker x 128
  python benchmarks/bench_batching.py --workers 8 --batch-size 16   # the configs' 8 GPUs x 16
"""

import argparse
import logging
import os
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

SAMPLE_RATE = 16000


def synthetic_lengths(num, mean_s, sd_s, lo_s, hi_s, seed):
    """Log-normal durations with the given mean/sd (before clipping), in samples."""
    sigma2 = np.log(1.0 + (sd_s / mean_s) ** 2)
    mu = np.log(mean_s) - sigma2 / 2
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(mu, np.sqrt(sigma2), size=num), lo_s, hi_s)
    return np.round(seconds * SAMPLE_RATE).astype(np.int64)


def make_dataset(sizes, captions_per_image, num_length_buckets):
    from cmd_plugin.data.manifest import SpeechImageManifest
    from cmd_plugin.data.speech_image_dataset import SpeechImageDataset

    class IndexOnlyDataset(SpeechImageDataset):
        """fairseq's batching of SpeechImageDataset unchanged; an item is just its index."""

        def __getitem__(self, index):
            return int(index)

        def collater(self, samples):
            return np.asarray(samples, dtype=np.int64)

    def no_images(paths):
        raise AssertionError("images are never loaded in this benchmark")

    n = len(sizes)
    manifest = SpeechImageManifest(
        audio_root="/nonexistent",
        audio_paths=[f"{i}.wav" for i in range(n)],
        num_samples=[int(s) for s in sizes],
        image_root="/nonexistent",
        image_paths=[f"{i // captions_per_image}.jpg" for i in range(n)],
    )
    # the task's defaults: min_sample_size 1600, max_sample_size 480000 (nothing dropped here)
    return IndexOnlyDataset(
        manifest,
        "train",
        images=no_images,
        min_sample_size=1600,
        max_sample_size=480000,
        shuffle=True,
        num_length_buckets=num_length_buckets,
    )


def fairseq_epochs(sizes, args, num_length_buckets, rebuild):
    """[epoch][step] -> list of per-worker index arrays, as fairseq's trainer would feed them."""
    from cmd_plugin.tasks.speech_image import SpeechImageConfig, SpeechImageTask

    dataset = make_dataset(sizes, args.captions_per_image, num_length_buckets)
    # one task per worker: each training process has its own (and its own iterator cache)
    tasks = [SpeechImageTask(SpeechImageConfig(data="/nonexistent")) for _ in range(args.workers)]
    epochs = []
    for epoch in (1, 2):
        per_worker = []
        for rank, task in enumerate(tasks):
            epoch_itr = task.get_batch_iterator(
                dataset,
                max_sentences=args.batch_size,
                required_batch_size_multiple=args.required_batch_size_multiple,
                seed=args.fairseq_seed,
                num_shards=args.workers,
                shard_id=rank,
                epoch=epoch,
                disable_iterator_cache=rebuild and epoch > 1,
            )
            per_worker.append([b for b in epoch_itr.next_epoch_itr(shuffle=True) if len(b)])
        steps = min(len(w) for w in per_worker)
        epochs.append([[per_worker[r][k] for r in range(args.workers)] for k in range(steps)])
    return epochs


def random_epochs(n, args):
    rng = np.random.default_rng(args.seed + 1)
    global_bsz = args.batch_size * args.workers
    epochs = []
    for _ in (1, 2):
        perm = rng.permutation(n)
        steps = []
        for start in range(0, n - global_bsz + 1, global_bsz):
            chunk = perm[start : start + global_bsz]
            steps.append([chunk[r * args.batch_size : (r + 1) * args.batch_size] for r in range(args.workers)])
        epochs.append(steps)
    return epochs


def padding_figures(sizes, steps):
    real = padded_total = 0
    for step in steps:
        for batch in step:
            lengths = sizes[batch]
            real += int(lengths.sum())
            padded_total += int(len(lengths) * lengths.max())
    return {
        "padded_pct": 100.0 * (padded_total - real) / padded_total,
        "compute": padded_total / real,
        "utterances": sum(len(b) for s in steps for b in s),
    }


def mixing_figures(n, epochs, global_bsz):
    """Pairs sharing a global batch in epoch 1 that share one again in epoch 2."""
    labels = []
    for steps in epochs[:2]:
        label = np.full(n, -1, dtype=np.int64)
        for k, step in enumerate(steps):
            label[np.concatenate(step)] = k
        labels.append(label)
    seen = (labels[0] >= 0) & (labels[1] >= 0)
    l1, l2 = labels[0][seen], labels[1][seen]
    pairs = lambda c: int((c * (c - 1) // 2).sum())  # noqa: E731
    together1 = pairs(np.bincount(l1))
    both = pairs(np.unique(l1 * (l2.max() + 1) + l2, return_counts=True)[1])
    # distinct partners over the two epochs: (|b1| - 1) + (|b2| - 1) - (|b1 & b2| - 1)
    size1, size2 = np.bincount(l1), np.bincount(l2)
    _, inverse, joint = np.unique(l1 * (l2.max() + 1) + l2, return_inverse=True, return_counts=True)
    distinct = (size1[l1] - 1) + (size2[l2] - 1) - (joint[inverse] - 1)
    return {
        "repeat_pairs_pct": 100.0 * both / max(together1, 1),
        "new_negatives_pct": 100.0 * float(distinct.mean()) / (2 * (global_bsz - 1)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-utterances", type=int, default=30000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--mean-s", type=float, default=4.5)
    parser.add_argument("--sd-s", type=float, default=1.6)
    parser.add_argument("--min-s", type=float, default=1.0)
    parser.add_argument("--max-s", type=float, default=15.0)
    parser.add_argument("--batch-size", type=int, default=128, help="utterances per worker batch")
    parser.add_argument("--workers", type=int, default=1, help="data-parallel workers (global batch = workers x batch)")
    parser.add_argument("--required-batch-size-multiple", type=int, default=8, help="fairseq's default is 8")
    parser.add_argument("--buckets", type=int, nargs="+", default=[0, 4, 8, 16, 32, 64])
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic lengths and random batches")
    parser.add_argument("--fairseq-seed", type=int, default=1, help="common.seed of the configs")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # fairseq logs every iterator it builds

    sizes = synthetic_lengths(args.num_utterances, args.mean_s, args.sd_s, args.min_s, args.max_s, args.seed)
    secs = sizes / SAMPLE_RATE
    global_bsz = args.batch_size * args.workers
    print(
        f"assumed lengths: {len(sizes)} utterances, log-normal mean {args.mean_s} s sd {args.sd_s} s clipped to "
        f"[{args.min_s}, {args.max_s}] s -> sample mean {secs.mean():.2f} s, sd {secs.std():.2f} s, "
        f"median {np.median(secs):.2f} s, p99 {np.percentile(secs, 99):.2f} s, max {secs.max():.2f} s"
    )
    print(
        f"batches: {args.workers} worker(s) x {args.batch_size} = {global_bsz} utterances per update "
        f"(padding per worker batch, mixing per global batch)\n"
    )

    rows = []
    t0 = time.perf_counter()
    rows.append(("random", random_epochs(len(sizes), args)))
    for n in args.buckets:
        rows.append((f"fairseq N={n}", fairseq_epochs(sizes, args, n, rebuild=False)))
    for n in args.buckets:
        rows.append((f"rebuilt N={n}", fairseq_epochs(sizes, args, n, rebuild=True)))
    header = f"{'batching':<16s} {'padded %':>9s} {'compute':>8s} {'repeat pairs %':>15s} {'new negatives %':>16s}"
    print(header)
    print("-" * len(header))
    for name, epochs in rows:
        pad = padding_figures(sizes, epochs[0])
        mix = mixing_figures(len(sizes), epochs, global_bsz)
        print(
            f"{name:<16s} {pad['padded_pct']:9.2f} {pad['compute']:7.3f}x {mix['repeat_pairs_pct']:15.2f} "
            f"{mix['new_negatives_pct']:16.1f}"
        )
    print(
        f"\n({time.perf_counter() - t0:.1f} s; random batches of {global_bsz} out of {len(sizes)}: expected repeat "
        f"pairs {100.0 * (global_bsz - 1) / (len(sizes) - 1):.2f} %)"
    )


if __name__ == "__main__":
    main()
