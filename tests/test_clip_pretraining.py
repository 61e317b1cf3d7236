"""Image-text pre-training of the tiny CLIP (cmd_demo/clip_pretraining.py)."""

import json
import os

import numpy as np
import pytest
import torch

from cmd_demo import scene_corpus
from cmd_demo.clip_pretraining import (
    ClipPretrainingConfig,
    captions_by_image,
    distinct_image_batches,
    load_training_scenes,
    negclip_loss,
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
        audio_root=root,
        audio_paths=[f"{i}.wav" for i in range(len(images))],
        num_samples=[16000] * len(images),
        image_root=root,
        image_paths=images,
        texts=texts,
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
    images, texts, scenes = [], [], {}
    for planned in scene_corpus.plan_corpus(seed=3, num_train=24, num_valid=0, num_test=0, num_speakers=5):
        name = planned.stem + ".jpg"
        scene_corpus.render_scene(planned.scene, 64).save(root / name)
        scenes[planned.stem] = {"split": "train", **scene_corpus.scene_record(planned.scene)}
        for caption in planned.spoken:
            images.append(name)
            texts.append(caption)
    # what generate_scene_corpus.py records of the corpus (the hard negatives read it)
    (root / "scene_corpus.json").write_text(json.dumps({"image_size": 64, "scenes": scenes}))
    return _manifest(images, texts, str(root))


def test_pretraining_aligns_captions_with_images_and_writes_loadable_weights(tiny_encoders, scene_manifest, tmp_path):
    import open_clip

    from cmd_demo.clip_pretraining import _load_images
    from cmd_plugin.models.clip_upstream import ClipImageUpstream, register_model_config

    name = tiny_encoders["image_model"]
    register_model_config(tiny_encoders["image_model_config"])
    out = tmp_path / "clip" / "pretrained.bin"
    cfg = ClipPretrainingConfig(
        steps=200, batch_size=16, lr=2e-3, warmup_steps=10, eval_interval=0, seed=0, negatives="none"
    )
    result = pretrain_clip(
        name,
        tiny_encoders["image_pretrained"],
        str(out),
        scene_manifest,
        "scenes/train",
        cfg,
        valid=scene_manifest,
        valid_where="scenes/train",
    )
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


def test_negclip_loss_is_clip_loss_plus_the_negative_texts():
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    # images and captions in the positive orthant, negative texts in the negative one
    image, text, negative = (torch.nn.functional.normalize(torch.randn(6, 8).abs(), dim=-1) for _ in range(3))
    scale = torch.tensor(50.0)
    clip = ClipLoss()(image, text, scale)
    # negative texts far from every image hardly change the loss (they only add to image -> text)
    assert negclip_loss(image, text, -negative, scale) == pytest.approx(clip.item(), abs=1e-4)
    # a negative text that is a copy of its image's caption takes half of that image's probability
    assert negclip_loss(image, text, text.clone(), scale) > clip + 0.2
    negative.requires_grad_(True)
    negclip_loss(image, text, negative, scale).backward()
    assert negative.grad is not None and negative.grad.abs().sum() > 0  # the negatives are in the graph


def test_training_scenes_are_read_from_the_corpus_record_and_missing_ones_named(scene_manifest, tmp_path):
    from cmd_plugin.data.manifest import ManifestError

    record = os.path.join(scene_manifest.image_root, "scene_corpus.json")
    images = list(captions_by_image(scene_manifest, "scenes/train"))
    scenes, keys, size = load_training_scenes(scene_manifest, images, record)
    assert len(scenes) == len(images) and size == 64 and {s.key() for s in scenes} <= keys
    with open(record) as f:
        meta = json.load(f)
    missing = images[0][: -len(".jpg")]
    del meta["scenes"][missing]
    other = tmp_path / "scene_corpus.json"
    other.write_text(json.dumps(meta))
    with pytest.raises(ManifestError, match=rf"scene_corpus.json: no scene for '{missing}'"):
        load_training_scenes(scene_manifest, images, str(other))


@pytest.mark.parametrize("negatives", ["captions", "images"])
def test_pretraining_with_negatives_runs_and_the_negatives_change_the_training(
    tiny_encoders, scene_manifest, tmp_path, negatives, caplog
):
    import logging

    from cmd_plugin.models.clip_upstream import register_model_config

    name = tiny_encoders["image_model"]
    register_model_config(tiny_encoders["image_model_config"])
    record = os.path.join(scene_manifest.image_root, "scene_corpus.json")

    def train(mode, out):
        cfg = ClipPretrainingConfig(
            steps=3,
            batch_size=8,
            lr=2e-3,
            warmup_steps=1,
            eval_interval=1,
            seed=0,
            negatives=mode,
            negatives_per_image=2,
        )
        timings = {}
        with caplog.at_level(logging.INFO, logger="cmd_demo.clip_pretraining"):
            pretrain_clip(
                name,
                tiny_encoders["image_pretrained"],
                str(tmp_path / out),
                scene_manifest,
                "scenes/train",
                cfg,
                scenes_json=record,
                timings=timings,
            )
        return torch.load(tmp_path / out), timings

    plain, _ = train("none", "none.bin")
    caplog.clear()
    with_negatives, timings = train(negatives, f"{negatives}.bin")
    losses = [float(r.getMessage().split(" loss ")[1].split()[0]) for r in caplog.records if " loss " in r.getMessage()]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert timings["train_seconds"] > 0 and timings["negatives_seconds"] >= 0
    # same batches, same positive captions (the negatives have their own random stream): the only
    # difference is the negatives, so identical weights would mean they never entered the loss
    changed = [k for k in plain if not torch.equal(plain[k], with_negatives[k])]
    assert "text_projection" in changed
    if negatives == "images":  # the rendered scenes go through the image tower
        assert any(k.startswith("visual.") for k in changed)
    assert all(torch.isfinite(v).all() for v in with_negatives.values() if v.is_floating_point())


def test_negatives_without_the_scene_record_are_refused(tiny_encoders, scene_manifest, tmp_path):
    cfg = ClipPretrainingConfig(steps=1, negatives="captions")
    with pytest.raises(ValueError, match="needs the corpus's scene_corpus.json"):
        pretrain_clip(
            tiny_encoders["image_model"],
            tiny_encoders["image_pretrained"],
            str(tmp_path / "w.bin"),
            scene_manifest,
            "scenes/train",
            cfg,
        )
    with pytest.raises(ValueError, match="expected one of none, captions, images"):
        pretrain_clip(
            tiny_encoders["image_model"],
            tiny_encoders["image_pretrained"],
            str(tmp_path / "w.bin"),
            scene_manifest,
            "scenes/train",
            ClipPretrainingConfig(negatives="hard"),
        )


def test_another_image_size_starts_from_the_init_weights_where_shapes_match(tiny_encoders, scene_manifest, tmp_path):
    from cmd_plugin.models.clip_upstream import register_model_config

    with open(tiny_encoders["image_model_config"]) as f:
        config = json.load(f)
    config["vision_cfg"].update(image_size=32, patch_size=8)  # 16 patches instead of 64
    path = tmp_path / "cmd-tiny-32px.json"
    path.write_text(json.dumps(config))
    register_model_config(str(path))
    cfg = ClipPretrainingConfig(steps=1, batch_size=8, lr=0.0, warmup_steps=1, eval_interval=0, negatives="none")
    out = tmp_path / "w.bin"
    pretrain_clip(
        "cmd-tiny-32px",
        tiny_encoders["image_pretrained"],
        str(out),
        scene_manifest,
        "scenes/train",
        cfg,
        partial_init=True,
    )
    init, trained = torch.load(tiny_encoders["image_pretrained"]), torch.load(out)
    # lr 0: every tensor is where it started; those of the same shape started from the init weights
    assert trained["visual.positional_embedding"].shape[0] == 17 != init["visual.positional_embedding"].shape[0]
    same = [k for k in trained if init[k].shape == trained[k].shape]
    assert "text_projection" in same and "visual.conv1.weight" in same
    assert all(torch.equal(trained[k], init[k]) for k in same)
