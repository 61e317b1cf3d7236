"""Files that break after preparation: every error names the file and its manifest line.

Preparation checked the corpus once; files can still go missing, be truncated or replaced
before training, caching or scoring. The task checks existence when a split is loaded; reading a
listed file names ``<split>.tsv:<line>`` / ``<split>.img:<line>``, also from data-loader workers.
"""

import os
import re

import numpy as np
import pytest
import soundfile as sf
from test_train_cli import make_corpus

from cmd_plugin.data.manifest import ManifestError, read_manifest


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path, {"train": (6, 2), "valid": (3, 2)})


def _task(tiny_encoders, data, **overrides):
    from cmd_plugin.tasks.speech_image import SpeechImageConfig, SpeechImageTask

    cfg = SpeechImageConfig(
        data=data,
        image_model=tiny_encoders["image_model"],
        image_model_config=tiny_encoders["image_model_config"],
        image_pretrained=tiny_encoders["image_pretrained"],
        **overrides,
    )
    return SpeechImageTask.setup_task(cfg)


def test_task_load_lists_the_missing_files_before_anything_runs(tiny_encoders, corpus):
    manifest = read_manifest(corpus, "train")
    for row in (1, 2, 4, 6, 7, 9, 11):  # 7 wavs ...
        os.remove(manifest.audio_path(row))
    os.remove(manifest.image_path(manifest.image_paths[8]))  # ... and the image of rows 8 and 9
    task = _task(tiny_encoders, corpus)
    with pytest.raises(ManifestError) as err:
        task.load_dataset("train")
    message = str(err.value)
    tsv, img = os.path.join(corpus, "train.tsv"), os.path.join(corpus, "train.img")
    assert message.startswith(f"8 of the files listed in {tsv} / {img} are missing")
    shown = re.findall(r"^  (\S+:\d+): (\S+)$", message, flags=re.M)
    assert shown == [(f"{tsv}:{r + 2}", manifest.audio_path(r)) for r in (1, 2, 4, 6, 7)]
    assert message.rstrip().endswith("... and 3 more")
    # the valid split is intact and loads; the check can be turned off
    task.load_dataset("valid")
    _task(tiny_encoders, corpus, check_files=False).load_dataset("train")


def _unreadable(path):
    with open(path, "wb") as f:
        f.write(b"RIFF\x00\x00garbage")
    return "cannot read audio"


def _resampled(path):
    sf.write(path, np.zeros(4000, np.float32), 8000)
    return "8000 Hz with 1 channel(s), expected 16000 Hz mono"


def _stereo(path):
    sf.write(path, np.zeros((9000, 2), np.float32), 16000)
    return "2 channel(s), expected 16000 Hz mono"


def _truncated(path):
    wav, rate = sf.read(path, dtype="float32")
    sf.write(path, wav[: len(wav) // 2], rate)
    return f"has {len(wav) // 2} samples, the manifest says {len(wav)}"


def _deleted(path):
    os.remove(path)
    return "is missing"


@pytest.mark.parametrize(
    "corrupt", [_unreadable, _resampled, _stereo, _truncated, _deleted], ids=lambda f: f.__name__[1:]
)
def test_reading_a_broken_wav_names_its_manifest_line(tiny_encoders, corpus, corrupt):
    task = _task(tiny_encoders, corpus)
    task.load_dataset("train")  # files broken after the split was loaded (and checked)
    dataset = task.dataset("train")
    row = 5
    index = int(np.nonzero(dataset.kept == row)[0][0])
    expected = corrupt(dataset.manifest.audio_path(row))
    with pytest.raises(ManifestError) as err:
        dataset[index]
    assert str(err.value).startswith(f"{os.path.join(corpus, 'train.tsv')}:{row + 2}: ")
    assert dataset.manifest.audio_path(row) in str(err.value) and expected in str(err.value)


def test_training_batches_from_a_worker_name_the_broken_image_and_its_line(tiny_encoders, corpus):
    """fairseq's own batch iterator with a data-loader worker process, as training runs it."""
    task = _task(tiny_encoders, corpus)
    task.load_dataset("train")
    dataset = task.dataset("train")
    rel = dataset.manifest.image_paths[4]
    with open(dataset.manifest.image_path(rel), "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(data[: len(data) // 2])
        f.truncate()
    iterator = task.get_batch_iterator(dataset, max_sentences=4, num_workers=1, seed=1, epoch=1)
    with pytest.raises(ManifestError) as err:
        for _ in iterator.next_epoch_itr(shuffle=True):
            pass
    message = str(err.value)
    assert f"{os.path.join(corpus, 'train.img')}:6: cannot read image {dataset.manifest.image_path(rel)}" in message
    assert "truncated" in message.lower()
