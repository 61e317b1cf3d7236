"""Speech state cache: the frozen HuBERT's layer states once per utterance, read back in training.

It must hold what the upstream computes for each utterance alone (within fp16), give the same loss and
gradients as waveforms, refuse another upstream, an unfrozen one, a manifest that changed and an
unfinished split, and run under fairseq-hydra-train.
"""

import json
import os

import pytest
import torch
from test_model import build_model, criterion
from test_train_cli import make_corpus, run_train

from cmd_demo.tiny_encoders import make_tiny_hubert
from cmd_plugin.data.manifest import read_manifest
from cmd_plugin.data.speech_cache import SpeechCacheError, SpeechStateCache, upstream_identity
from cmd_plugin.data.speech_image_dataset import SpeechImageDataset
from cmd_plugin.loading import build_arg_overrides
from cmd_plugin.models.hubert_upstream import HubertUpstream

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cache(manifests, hubert_path, out, splits=("train", "valid")):
    from examples.cache_speech_features import main

    assert main(["--manifest-dir", manifests, "--splits", *splits, "--hubert", hubert_path, "--out", out]) == 0
    return out


def _datasets(manifests, split, cache_dir):
    manifest = read_manifest(manifests, split)
    no_images = lambda paths: {}  # noqa: E731 (speech only)
    waves = SpeechImageDataset(manifest, split, images=no_images, shuffle=False)
    cached = SpeechImageDataset(
        manifest, split, images=no_images, shuffle=False, speech_states=SpeechStateCache(cache_dir, split)
    )
    return waves, cached


def test_the_cache_holds_each_utterances_own_states_and_trains_as_waveforms_do(tiny_encoders, tmp_path):
    manifests = make_corpus(tmp_path, {"train": (3, 2), "valid": (2, 2)})
    cache_dir = _cache(manifests, tiny_encoders["hubert_path"], str(tmp_path / "cache"))
    waves, cached = _datasets(manifests, "train", cache_dir)
    upstream = HubertUpstream(tiny_encoders["hubert_path"])
    for i in range(len(waves)):  # each utterance alone, as the upstream computes it
        with torch.no_grad():
            alone, _ = upstream(waves[i]["source"][None])
        states = cached[i]["states"]
        assert states.dtype == torch.float16 and states.shape == (alone.shape[2], alone.shape[0], alone.shape[3])
        assert torch.allclose(states.float(), alone[:, 0].transpose(0, 1), rtol=2e-3, atol=2e-3)

    model = build_model(tiny_encoders)
    rows = list(range(len(waves)))
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def loss_and_grads(batch):
        net_input = dict(batch["net_input"], images=images, image_index=torch.tensor([0, 0, 1, 1, 2, 2]))
        model.zero_grad()
        loss, _, _ = criterion()(model, {**batch, "net_input": net_input})
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_w, grads_w = loss_and_grads(waves.collater([waves[i] for i in rows]))
    batch = cached.collater([cached[i] for i in rows])
    assert {"speech_states", "speech_frame_mask"} <= set(batch["net_input"]) and "source" not in batch["net_input"]
    loss_c, grads_c = loss_and_grads(batch)
    assert torch.isclose(loss_c, loss_w, rtol=1e-3)
    # within fp16's rounding of the states: each gradient within 1 % of its norm
    assert len(grads_c) == len(grads_w)
    assert all(float((c - w).norm()) <= 1e-2 * float(w.norm()) + 1e-6 for c, w in zip(grads_c, grads_w))
    # sensitive: the states of other utterances give another loss
    shuffled = cached.collater([cached[i] for i in rows[::-1]])
    loss_s, _ = loss_and_grads(shuffled)
    assert not torch.isclose(loss_s, loss_w, rtol=1e-3)


def test_another_upstream_an_unfrozen_one_a_changed_manifest_and_an_unfinished_split_are_refused(
    tiny_encoders, tmp_path
):
    from omegaconf import OmegaConf

    from cmd_plugin.models.cmd_speech_image import CmdSpeechImageConfig
    from cmd_plugin.tasks.speech_image import SpeechImageConfig, SpeechImageTask

    enc = tiny_encoders
    manifests = make_corpus(tmp_path, {"train": (3, 2), "valid": (2, 2)})
    cache_dir = _cache(manifests, enc["hubert_path"], str(tmp_path / "cache"))
    task_cfg = dict(
        data=manifests,
        image_model=enc["image_model"],
        image_model_config=enc["image_model_config"],
        image_pretrained=enc["image_pretrained"],
        speech_feature_cache=cache_dir,
    )

    def model_cfg(hubert_path, **overrides):
        cfg = OmegaConf.structured(
            CmdSpeechImageConfig(
                hubert_path=hubert_path,
                image_model=enc["image_model"],
                image_pretrained=enc["image_pretrained"],
                image_model_config=enc["image_model_config"],
                **overrides,
            )
        )
        cfg._name = "cmd_speech_image"
        return cfg

    task = SpeechImageTask.setup_task(SpeechImageConfig(**task_cfg))
    task.load_dataset("valid")
    model = task.build_model(model_cfg(enc["hubert_path"]))
    task.load_dataset("train")  # after the model, as fairseq loads the training split: checked too
    batch = task.datasets["train"].collater([task.datasets["train"][i] for i in range(4)])
    out = model(**batch["net_input"])
    assert out["speech"].shape == (4, 32)

    with pytest.raises(SpeechCacheError, match="freeze_hubert=true"):
        SpeechImageTask.setup_task(SpeechImageConfig(**task_cfg)).build_model(
            model_cfg(enc["hubert_path"], freeze_hubert=False)
        )
    other = make_tiny_hubert(str(tmp_path / "other_hubert.pt"), seed=1)
    other_task = SpeechImageTask.setup_task(SpeechImageConfig(**task_cfg))
    other_task.load_dataset("valid")
    with pytest.raises(SpeechCacheError, match="another speech upstream .*hubert_weights_sha256"):
        other_task.build_model(model_cfg(other))
    # the identity follows the weights, not the file name
    assert upstream_identity(HubertUpstream(other)) != SpeechStateCache(cache_dir, "train").identity

    # a manifest whose utterance changed is named by its line
    meta_path = os.path.join(cache_dir, "valid.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["utterances"][1][1] += 1
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(SpeechCacheError, match=r"valid\.tsv:3: .* differs from the cache's row 1"):
        SpeechImageTask.setup_task(SpeechImageConfig(**task_cfg)).load_dataset("valid")
    # a split whose meta was never written is unfinished, whatever else lies there
    os.remove(meta_path)
    with pytest.raises(SpeechCacheError, match=r"valid\.json: not found; .* --splits valid"):
        SpeechStateCache(cache_dir, "valid")
    # scoring always encodes waveforms
    assert build_arg_overrides()["speech_feature_cache"] == ""


def test_fairseq_hydra_train_reads_the_cache(tiny_encoders, tmp_path):
    enc = tiny_encoders
    manifests = make_corpus(tmp_path, {"train": (8, 2), "valid": (4, 2)})
    cache_dir = _cache(manifests, enc["hubert_path"], str(tmp_path / "cache"))
    overrides = [
        "task._name=speech_image",
        f"task.data={manifests}",
        f"task.speech_feature_cache={cache_dir}",
        f"model.hubert_path={enc['hubert_path']}",
        f"model.image_model={enc['image_model']}",
        f"model.image_model_config={enc['image_model_config']}",
        f"model.image_pretrained={enc['image_pretrained']}",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        "dataset.batch_size=8",
        "common.log_interval=1",
        "optimization.max_update=4",
    ]
    proc = run_train(["--config-dir", os.path.join(REPO, "examples", "tiny")] + overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "frozen upstream states from cache" in log and "whole-split recall on 8 utterances x 4 images" in log
    assert (tmp_path / "ckpt" / "checkpoint_best.pt").is_file()
