"""Non-finite batches: reported with their files, kept out of the weights, and a stop when persistent.

A wav holding NaN samples (a clipped-to-NaN float file) makes its speech embedding, and so the
batch's loss, non-finite. The task's train_step names the file (manifest line), backpropagates
nothing from that batch and skips the optimizer step; ``nonfinite_patience`` such batches in a
row stop the run with that message instead of fairseq's "gradients are Nan/Inf" / overflow loop.
"""

import os
import re

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf
from test_train_cli import REPO, make_corpus, run_train

from cmd_plugin.data.manifest import read_manifest
from cmd_plugin.nonfinite import NonFiniteLossError, nonfinite_rows

NAN_ROW = 3


def _poison(manifest, row):
    """Rewrite the wav of ``row`` as float samples with NaNs in the middle (same length)."""
    path = manifest.audio_path(row)
    wav, rate = sf.read(path, dtype="float32")
    wav[len(wav) // 3 : len(wav) // 2] = np.nan
    sf.write(path, wav, rate, subtype="FLOAT")
    return path


def test_nonfinite_rows_finds_rows_with_nan_or_inf():
    x = torch.zeros(4, 3, 2)
    x[1, 2, 0] = float("nan")
    x[3, 0, 1] = float("-inf")
    assert nonfinite_rows(x) == [1, 3]
    assert nonfinite_rows(torch.tensor(float("nan"))) == [0] and nonfinite_rows(torch.tensor(1.0)) == []


@pytest.fixture
def training(tiny_encoders, tmp_path):
    from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig

    from cmd_plugin.criterions.cmd_contrastive import CmdContrastiveConfig
    from cmd_plugin.models.cmd_speech_image import CmdSpeechImageConfig
    from cmd_plugin.tasks.speech_image import SpeechImageConfig, SpeechImageTask

    data = make_corpus(tmp_path, {"train": (4, 2)})
    manifest = read_manifest(data, "train")
    nan_wav = _poison(manifest, NAN_ROW)
    enc = tiny_encoders
    task = SpeechImageTask.setup_task(
        SpeechImageConfig(
            data=data,
            image_model=enc["image_model"],
            image_model_config=enc["image_model_config"],
            image_pretrained=enc["image_pretrained"],
            nonfinite_patience=2,
        )
    )
    task.load_dataset("train")
    model_cfg = OmegaConf.structured(
        CmdSpeechImageConfig(
            hubert_path=enc["hubert_path"],
            image_model=enc["image_model"],
            image_pretrained=enc["image_pretrained"],
            image_model_config=enc["image_model_config"],
            speech_encoder_heads=2,
            speech_encoder_ffn_dim=64,
            speech_encoder_dropout=0.0,
        )
    )
    model_cfg._name = "cmd_speech_image"
    model = task.build_model(model_cfg)
    crit_cfg = OmegaConf.structured(CmdContrastiveConfig(noise_seed=1))
    crit_cfg._name = "cmd_contrastive"
    criterion = task.build_criterion(crit_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = FairseqAdam(OmegaConf.structured(FairseqAdamConfig(lr=[1e-3], tpu=False)), params)
    dataset = task.dataset("train")
    nan_index = int(np.nonzero(dataset.kept == NAN_ROW)[0][0])
    good = [i for i in range(len(dataset)) if i != nan_index]
    batches = {
        "bad": dataset.collater([dataset[i] for i in good[:3] + [nan_index]]),
        "good": dataset.collater([dataset[i] for i in good[:4]]),
    }
    return task, model, criterion, optimizer, params, batches, nan_wav, data


def _step(task, model, criterion, optimizer, batch, update):
    optimizer.zero_grad()
    out = task.train_step(batch, model, criterion, optimizer, update_num=update)
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters() if p.requires_grad]
    task.optimizer_step(optimizer, model, update)
    return out, grads


def test_a_nonfinite_batch_names_its_file_and_leaves_the_weights_unchanged(training, caplog):
    task, model, criterion, optimizer, params, batches, nan_wav, data = training
    before = [p.detach().clone() for p in params]
    with caplog.at_level("WARNING"):
        (loss, sample_size, log), grads = _step(task, model, criterion, optimizer, batches["bad"], 0)
    assert not torch.isfinite(loss) and sample_size == 0 and log["nonfinite_batches"] == 1
    assert all(g is None or not g.any() for g in grads)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # the optimizer step was skipped
    assert "non-finite loss (nan) at update 1, split 'train'" in caplog.text
    assert re.search(
        r"non-finite speech output for 1 item\(s\):\n  "
        + re.escape(f"{os.path.join(data, 'train.tsv')}:{NAN_ROW + 2} {nan_wav} (image "),
        caplog.text,
    )
    assert "1 in a row; 3 in a row stop the run" in caplog.text

    # a finite batch trains as before and resets the count
    (loss, sample_size, log), grads = _step(task, model, criterion, optimizer, batches["good"], 1)
    assert torch.isfinite(loss) and sample_size == 4 and any(g is not None and g.any() for g in grads)
    assert not all(torch.equal(p, b) for p, b in zip(params, before))
    assert task.nonfinite.consecutive == 0

    # persistent: the third non-finite batch in a row stops, naming the file
    _step(task, model, criterion, optimizer, batches["bad"], 2)
    _step(task, model, criterion, optimizer, batches["bad"], 3)
    with pytest.raises(NonFiniteLossError) as err:
        _step(task, model, criterion, optimizer, batches["bad"], 4)
    assert "training stopped: 3 batches in a row gave a non-finite loss" in str(err.value)
    assert f"train.tsv:{NAN_ROW + 2} {nan_wav}" in str(err.value)
    assert "task.nonfinite_patience" in str(err.value)


def test_persistent_nonfinite_losses_stop_fairseq_hydra_train_with_the_files(tiny_encoders, tmp_path):
    """Every training wav holds NaNs: the real trainer stops with the files named, not with
    fairseq's generic "gradients are Nan/Inf" or an overflow loop."""
    data = make_corpus(tmp_path, {"train": (4, 2), "valid": (2, 2)})
    manifest = read_manifest(data, "train")
    for row in range(len(manifest)):
        _poison(manifest, row)
    enc = tiny_encoders
    proc = run_train(
        [
            "--config-dir",
            os.path.join(REPO, "examples", "tiny"),
            "task._name=speech_image",
            f"task.data={data}",
            f"model.hubert_path={enc['hubert_path']}",
            f"model.image_model={enc['image_model']}",
            f"model.image_model_config={enc['image_model_config']}",
            f"model.image_pretrained={enc['image_pretrained']}",
            f"checkpoint.save_dir={tmp_path / 'ckpt'}",
            "dataset.batch_size=4",
            "optimization.max_update=20",
            "task.nonfinite_patience=2",
            "common.log_interval=1",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "NonFiniteLossError: training stopped: 3 batches in a row gave a non-finite loss" in out, out[-3000:]
    assert re.search(re.escape(os.path.join(data, "train.tsv")) + r":\d+ " + re.escape(manifest.audio_root), out)
    assert out.count("non-finite loss (nan) at update") >= 2
    assert "gradients are Nan/Inf" not in out and "loss scale" not in out
