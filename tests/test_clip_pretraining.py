"""Image-text pre-training of the tiny CLIP (cmd_demo/clip_pretraining.py)."""

import os

import numpy as np
import pytest
import torch

from cmd_demo import scene_corpus
from cmd_demo.clip_pretraining import (
    ClipPretrainingConfig,
    captions_by_image,
    distinct_image_batches,
    pretrain_clip,
    text_to_image_recall,
)
from cmd_plugin.data.manifest import ManifestError, SpeechImageManifest


def test_batches_hold_distinct_images_and_visit_all_equally():
    rng = np.random.default_rng(0)
    batches = list(distinct_image_batches(num_images=10, batch_size=4, steps=10, rng=rng))
    assert len(batches) == 10
    assert all(len(b) == 4 and len(set(b.tolist())) == 4 for b in batches)
    counts = np.bincount(np.concatenate(batches), minlength=10)
    # 40 draws over 10 images in reshuffled passes of 8 (a pass never straddles two shuffles)
    assert counts.min() >= 3 and counts.max() <= 5
    # a batch larger than the corpus is the whole corpus
    assert sorted(next(distinct_image_batches(3, 8, 1, rng)).tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 2 images"):
        next(distinct_image_batches(1, 8, 1, rng))


def _manifest(images, texts, root):
    return SpeechImageManifest(
        audio_root=root, audio_paths=[f"{i}.wav" for i in range(len(images))], num_samples=[16000] * len(images),
        image_root=root, image_paths=images, texts=texts,
    )


def test_captions_are_grouped_per_image_and_missing_text_names_the_file(tmp_path):
    m = _manifest(["a.jpg", "a.jpg", "b.jpg", "a.jpg"], ["x", "y", "z", "x"], str(tmp_path))
    assert captions_by_image(m, "m/train") == {"a.jpg": ["x", "y"], "b.jpg": ["z"]}
    m.texts = None
    with pytest.raises(ManifestError, match=r"m/train: no \.wrd file"):
        captions_by_image(m, "m/train")
    m = _manifest(["a.jpg", "b.jpg"], ["x", " "], str(tmp_path))
    with pytest.raises(ManifestError, match=r"m/train\.wrd:2: empty caption"):
        captions_by_image(m, "m/train")


@pytest.fixture(scope="module")
def scene_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    images, texts = [], []
    for planned in scene_corpus.plan_corpus(seed=3, num_train=24, num_valid=0, num_test=0, num_speakers=5):
        name = planned.stem + ".jpg"
        scene_corpus.render_scene(planned.scene, 64).save(root / name)
        for caption in planned.spoken:
            images.append(name)
            texts.append(caption)
    return _manifest(images, texts, str(root))


def test_pretraining_aligns_captions_with_images_and_writes_loadable_weights(tiny_encoders, scene_manifest, tmp_path):
    import open_clip

    from cmd_demo.clip_pretraining import _load_images
    from cmd_plugin.models.clip_upstream import ClipImageUpstream, register_model_config

    name = tiny_encoders["image_model"]
    register_model_config(tiny_encoders["image_model_config"])
    out = tmp_path / "clip" / "pretrained.bin"
    cfg = ClipPretrainingConfig(steps=200, batch_size=16, lr=2e-3, warmup_steps=10, eval_interval=0, seed=0)
    result = pretrain_clip(name, tiny_encoders["image_pretrained"], str(out), scene_manifest, "scenes/train", cfg,
                           valid=scene_manifest, valid_where="scenes/train")
    assert os.listdir(out.parent) == ["pretrained.bin"]  # no temporary file left behind

    def train_recall(weights):
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights)
        caps = captions_by_image(scene_manifest, "scenes/train")
        pixels = _load_images(scene_manifest, list(caps), preprocess)
        return text_to_image_recall(model, open_clip.get_tokenizer(name), pixels, list(caps.values()))

    before, after = train_recall(tiny_encoders["image_pretrained"]), train_recall(str(out))
    assert after == pytest.approx(result)
    # 24 images, 120 captions: chance R@1 is 4 %; the random tower is near it
    assert after["s2i_r1"] >= before["s2i_r1"] + 20.0
    assert after["s2i_r5"] > before["s2i_r5"]

    # the file is what the model's frozen image upstream loads
    up0 = ClipImageUpstream(name, tiny_encoders["image_pretrained"], tiny_encoders["image_model_config"])
    up1 = ClipImageUpstream(name, str(out), tiny_encoders["image_model_config"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(up0(x)[0], up1(x)[0])
