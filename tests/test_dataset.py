"""Length-ordered batches of the speech-image dataset under fairseq's own batching."""

import numpy as np

from cmd_plugin.data.manifest import SpeechImageManifest
from cmd_plugin.data.speech_image_dataset import SpeechImageDataset
from cmd_plugin.tasks.speech_image import SpeechImageConfig, SpeechImageTask


def _dataset(shuffle, buckets, n=400, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(16000, 160000, n).tolist()
    manifest = SpeechImageManifest(
        "/a", [f"{i}.wav" for i in range(n)], sizes, "/i", [f"{i // 5}.jpg" for i in range(n)]
    )
    return SpeechImageDataset(
        manifest, "train" if shuffle else "valid", images=None, shuffle=shuffle, num_length_buckets=buckets
    )


def _batches(task, dataset, epoch):
    itr = task.get_batch_iterator(dataset, max_sentences=16, seed=1, epoch=epoch)
    return [tuple(sorted(b)) for b in itr.frozen_batches]


def _pair_overlap(a, b):
    def pairs(batches):
        return {(x, y) for batch in batches for x in batch for y in batch if x < y}

    first = pairs(a)
    return len(first & pairs(b)) / len(first)


def test_training_batches_change_between_epochs_and_stay_length_bucketed(tmp_path):
    task = SpeechImageTask(SpeechImageConfig(data=str(tmp_path), image_model="ViT-B-32", image_model_config=""))
    dataset = _dataset(shuffle=True, buckets=8)
    epoch1, epoch2 = _batches(task, dataset, 1), _batches(task, dataset, 2)
    assert sorted(i for b in epoch1 for i in b) == list(range(len(dataset)))
    assert _pair_overlap(epoch1, epoch2) < 0.5, "the same batches again: negatives never change"
    # length bucketing keeps padding low compared with random batches of the same size
    sizes = np.asarray(dataset.sizes)

    def padded_share(batches):
        total = sum(len(b) * sizes[list(b)].max() for b in batches)
        return 1 - sizes.sum() / total

    rng = np.random.default_rng(0)
    random_batches = np.array_split(rng.permutation(len(dataset)), len(epoch1))
    assert padded_share(epoch1) < 0.5 * padded_share(random_batches)


def test_scored_splits_keep_one_fixed_order_covering_every_utterance(tmp_path):
    task = SpeechImageTask(SpeechImageConfig(data=str(tmp_path), image_model="ViT-B-32", image_model_config=""))
    dataset = _dataset(shuffle=False, buckets=0, n=250)
    itr = task.get_batch_iterator(dataset, max_sentences=64, seed=1, epoch=1, required_batch_size_multiple=8)
    covered = sorted(i for b in itr.frozen_batches for i in b)
    assert covered == list(range(250))  # fairseq alone would drop a remainder of 2
    assert _batches(task, dataset, 1) == _batches(task, dataset, 2)
