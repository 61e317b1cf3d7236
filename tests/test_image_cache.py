"""Image feature cache: the frozen image encoder's outputs once per image, memory-mapped.

The cache must hold exactly what the upstream computes (within fp16), refuse another encoder,
name what is missing, never leave a half-written cache, and train exactly as pixels do.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from test_model import build_model, criterion, make_batch

from cmd_demo.tiny_encoders import make_tiny_clip
from cmd_plugin.data.image_cache import (
    CachedImages,
    ImageCacheError,
    ImageFeatureCache,
    cache_bytes,
    cache_identity,
    encoder_identity,
    write_image_cache,
)
from cmd_plugin.data.manifest import SpeechImageManifest, write_manifest
from cmd_plugin.models.clip_upstream import ClipImageUpstream

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP16_RTOL = 2e-3  # half precision keeps 11 significant bits (relative error <= 2^-11 ~ 5e-4)


def _write_images(directory, n, seed=0):
    """n random RGB images of different sizes and formats; absolute paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = 40 + 7 * i, 90 - 5 * i
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = os.path.join(directory, f"img_{i}.{'png' if i % 2 else 'jpg'}")
        Image.fromarray(pixels).save(path)
        paths.append(os.path.abspath(path))
    return paths


def _encode(upstream, paths):
    """The upstream's own outputs for image files, read as training reads them."""
    pixels = []
    for p in paths:
        with Image.open(p) as im:
            pixels.append(upstream.preprocess(im.convert("RGB")))
    with torch.no_grad():
        return upstream(torch.stack(pixels))


def _same_in_fp16(a, b):
    """Two float16 cache arrays hold the same values as far as float16 can: at most one float16 step
    apart. The encoder computes in float32, and another batch size or thread count sums in another
    order, changing the last bits, which can round to the neighbouring float16 value; near zero, where
    that step is finer than float32's own rounding error, within a few float32 steps of the largest value."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype == np.float16 and a.shape == b.shape
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    step = np.spacing(np.maximum(np.abs(a), np.abs(b))).astype(np.float32)
    floor = 8 * np.finfo(np.float32).eps * float(np.abs(a32).max())
    return bool(np.all(np.abs(a32 - b32) <= np.maximum(step, floor)))


def _close(actual, expected, rtol=FP16_RTOL):
    """Equal within half-precision rounding, relative to each tensor's scale."""
    scale = expected.abs().max()
    return (actual - expected).abs().max() <= rtol * scale


@pytest.fixture(scope="module")
def upstream(tiny_encoders):
    enc = tiny_encoders
    return ClipImageUpstream(enc["image_model"], enc["image_pretrained"], enc["image_model_config"])


@pytest.fixture(scope="module")
def identity(tiny_encoders):
    enc = tiny_encoders
    return encoder_identity(enc["image_model"], enc["image_pretrained"], enc["image_model_config"])


@pytest.fixture
def images(tmp_path):
    return _write_images(tmp_path / "images", 5)


def test_cache_holds_the_upstreams_own_outputs_within_fp16(upstream, identity, images, tmp_path):
    out = tmp_path / "cache"
    meta = write_image_cache(str(out), images, upstream, identity, batch_size=2)
    assert sorted(os.listdir(tmp_path)) == ["cache", "images"]  # no temporary left
    assert meta["num_images"] == 5 and meta["dtype"] == "float16"
    with open(out / "images.txt") as f:
        assert f.read().splitlines() == images
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["identity"] == identity and on_disk["shapes"]["image_patches.npy"] == [5, 64, 32]
    assert np.load(out / "image_cls.npy", mmap_mode="r").dtype == np.float16
    arrays = [np.load(out / name, mmap_mode="r") for name in ("image_cls.npy", "image_patches.npy")]
    assert (
        sum(a.nbytes for a in arrays) == cache_bytes(5, 32, 64) == 5 * 65 * 32 * 2
    )  # the size formula of docs/troubleshooting.md

    cache = ImageFeatureCache(str(out))
    cache.check_identity(identity)
    order = [images[3], images[0], images[4]]  # rows come back in the order asked for
    cls, patches = cache.lookup(order)
    pooled, expected_patches = _encode(upstream, order)
    assert cls.dtype == torch.float32 and cls.shape == (3, 32) and patches.shape == (3, 64, 32)
    assert _close(cls, pooled) and _close(patches, expected_patches)
    # un-normalised pooled embedding, as the model expects (it normalises itself)
    assert not torch.allclose(cls.norm(dim=-1), torch.ones(3), atol=1e-2)


def test_identity_tracks_weights_config_and_preprocessing(tiny_encoders, identity, tmp_path):
    enc = tiny_encoders
    again = encoder_identity(enc["image_model"], enc["image_pretrained"], enc["image_model_config"])
    assert again == identity
    assert identity["preprocess"]["size"] == [64, 64] and identity["preprocess"]["interpolation"] == "bicubic"
    assert identity["model_config"] == json.loads(open(enc["image_model_config"]).read())
    # a copy of the same weights elsewhere is the same encoder
    copy = tmp_path / "copy.bin"
    shutil.copyfile(enc["image_pretrained"], copy)
    assert (
        encoder_identity(enc["image_model"], str(copy), enc["image_model_config"])["weights_sha256"]
        == (identity["weights_sha256"])
    )
    with pytest.raises(ImageCacheError, match="weights file"):
        encoder_identity(enc["image_model"], "", enc["image_model_config"])


def test_cache_of_other_weights_is_refused_naming_the_checksum(tiny_encoders, upstream, identity, images, tmp_path):
    write_image_cache(str(tmp_path / "cache"), images, upstream, identity)
    cache = ImageFeatureCache(str(tmp_path / "cache"))
    # same model name and config, other weights (another seed)
    _, _, other_weights = make_tiny_clip(str(tmp_path / "other_clip"), seed=1)
    other = encoder_identity(tiny_encoders["image_model"], other_weights, tiny_encoders["image_model_config"])
    with pytest.raises(ImageCacheError, match=r"weights checksum \(weights_sha256\) differs") as err:
        cache.check_identity(other)
    assert "preprocessing" not in str(err.value) and "model name" not in str(err.value)


def test_cache_of_other_preprocessing_is_refused_naming_it(
    tiny_encoders, upstream, identity, images, tmp_path, monkeypatch
):
    import open_clip.factory

    write_image_cache(str(tmp_path / "cache"), images, upstream, identity)
    cache = ImageFeatureCache(str(tmp_path / "cache"))
    name = tiny_encoders["image_model"]
    config = open_clip.factory.get_model_config(name)
    config["preprocess_cfg"] = {"interpolation": "bilinear", "resize_mode": "squash"}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, config)
    other = encoder_identity(name, tiny_encoders["image_pretrained"])
    with pytest.raises(ImageCacheError, match=r"preprocessing \(preprocess\) differs") as err:
        cache.check_identity(other)
    assert "interpolation: cache 'bicubic' vs encoder 'bilinear'" in str(err.value)
    assert "weights checksum" not in str(err.value)


def test_identity_is_the_fingerprint_of_the_tower_that_writes_and_refuses_another(
    tiny_encoders, upstream, identity, images, tmp_path
):
    # the identity from the files equals the identity of the built tower (its tensors' fingerprint)
    assert cache_identity(upstream, tiny_encoders["image_pretrained"]) == identity
    assert identity["weights_hashed"] == "tensors" and len(identity["weights_sha256"]) == 64
    # a cache cannot record another encoder's identity than the one writing it
    _, _, other_weights = make_tiny_clip(str(tmp_path / "other_clip"), seed=1)
    other = encoder_identity(tiny_encoders["image_model"], other_weights, tiny_encoders["image_model_config"])
    with pytest.raises(ImageCacheError, match=r"identity weights checksum \(weights_sha256\) is not the upstream's"):
        write_image_cache(str(tmp_path / "cache"), images, upstream, other)
    assert not (tmp_path / "cache").exists()


def test_a_cache_written_before_tensor_fingerprints_is_checked_against_the_weights_file(
    tiny_encoders, upstream, identity, images, tmp_path
):
    import hashlib

    out = tmp_path / "cache"
    write_image_cache(str(out), images, upstream, identity)
    # as older versions recorded it: the sha256 of the weights FILE, no "weights_hashed"
    meta = json.loads((out / "meta.json").read_text())
    meta["identity"].pop("weights_hashed")
    with open(tiny_encoders["image_pretrained"], "rb") as f:
        meta["identity"]["weights_sha256"] = hashlib.sha256(f.read()).hexdigest()
    (out / "meta.json").write_text(json.dumps(meta))
    cache = ImageFeatureCache(str(out))
    cache.check_identity(identity)  # the same weights file: still usable
    _, _, other_weights = make_tiny_clip(str(tmp_path / "other_clip"), seed=1)
    other = encoder_identity(tiny_encoders["image_model"], other_weights, tiny_encoders["image_model_config"])
    with pytest.raises(
        ImageCacheError,
        match=r"weights checksum \(weights_sha256\) differs: cache '[0-9a-f]{64}' vs "
        f"the encoder's weights file {other_weights} '[0-9a-f]{{64}}' \\(sha256 of the file",
    ):
        cache.check_identity(other)


def test_path_missing_from_cache_is_named(upstream, identity, images, tmp_path):
    write_image_cache(str(tmp_path / "cache"), images[:3], upstream, identity)
    cache = ImageFeatureCache(str(tmp_path / "cache"))
    with pytest.raises(ImageCacheError, match=f"{images[4]}: not in image feature cache"):
        cache.lookup([images[0], images[4]])
    # a manifest naming an uncached image is refused when the dataset is built, not mid-epoch
    root = os.path.dirname(images[0])
    rels = [os.path.basename(p) for p in images]
    manifest = SpeechImageManifest("/audio", ["a.wav"] * 5, [16000] * 5, root, rels)
    with pytest.raises(ImageCacheError, match=r"2 image\(s\) .* e\.g\. " + images[3]):
        CachedImages(manifest, cache)


def test_interrupted_write_leaves_no_cache_keeps_the_old_one_and_resumes(
    upstream, identity, images, tmp_path, monkeypatch
):
    out = tmp_path / "cache"
    write_image_cache(str(out), images[:2], upstream, identity)
    old_cls = np.array(np.load(out / "image_cls.npy"))

    calls = []
    real_forward = upstream.forward

    def failing_forward(pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real_forward(pixels)

    monkeypatch.setattr(upstream, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_image_cache(str(out), images, upstream, identity, batch_size=2, sync_interval=0)
    assert calls == [2, 2]
    calls.clear()
    with pytest.raises(RuntimeError, match="interrupted"):
        write_image_cache(str(tmp_path / "new_cache"), images, upstream, identity, batch_size=2, sync_interval=0)
    monkeypatch.undo()

    # nothing that passes for a cache: no new one, the old one untouched; what was encoded waits
    # in hidden partial directories
    assert sorted(os.listdir(tmp_path)) == [".cache.partial", ".new_cache.partial", "cache", "images"]
    for not_a_cache in (tmp_path / "new_cache", tmp_path / ".new_cache.partial"):
        with pytest.raises(ImageCacheError, match="not an image feature cache"):
            ImageFeatureCache(str(not_a_cache))
    cache = ImageFeatureCache(str(out))
    assert cache.paths == images[:2]
    assert np.array_equal(np.asarray(cache.lookup(images[:2])[0]), old_cls.astype(np.float32))

    # the same call again resumes after the recorded first batch, and then replaces the old cache
    calls.clear()
    monkeypatch.setattr(upstream, "forward", lambda pixels: calls.append(len(pixels)) or real_forward(pixels))
    meta = write_image_cache(str(out), images, upstream, identity, batch_size=2, sync_interval=0, log=lambda m: None)
    monkeypatch.undo()
    assert calls == [2, 1] and meta["resumed_from_row"] == 2
    assert sorted(os.listdir(tmp_path)) == [".new_cache.partial", "cache", "images"]
    resumed = ImageFeatureCache(str(out))
    assert resumed.paths == images
    # the same rows as a build in one go (in one batch here, the resumed one encoded its last image
    # alone: float32 sums in another order), to the precision the cache stores
    fresh = write_image_cache(str(tmp_path / "fresh"), images, upstream, identity, batch_size=5)
    assert fresh["resumed_from_row"] == 0
    assert (out / "images.txt").read_text() == (tmp_path / "fresh" / "images.txt").read_text()
    for name in ("image_cls.npy", "image_patches.npy"):
        assert _same_in_fp16(np.load(out / name), np.load(tmp_path / "fresh" / name)), name


def test_a_partial_build_of_other_images_is_discarded(upstream, identity, images, tmp_path, monkeypatch):
    def fail_second(pixels, calls=[]):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return type(upstream).forward(upstream, pixels)

    monkeypatch.setattr(upstream, "forward", fail_second)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_image_cache(str(tmp_path / "cache"), images, upstream, identity, batch_size=2, sync_interval=0)
    monkeypatch.undo()
    logged = []
    meta = write_image_cache(str(tmp_path / "cache"), images[::-1], upstream, identity, batch_size=2, log=logged.append)
    assert meta["resumed_from_row"] == 0 and "other images or another encoder: starting over" in logged[0]
    assert ImageFeatureCache(str(tmp_path / "cache")).paths == images[::-1]


def test_unreadable_image_is_named_with_its_manifest_line_and_nothing_is_written(upstream, identity, images, tmp_path):
    with open(images[2], "wb") as f:
        f.write(b"not an image")
    where = [f"/m/train.img:{i + 2}" for i in range(len(images))]
    with pytest.raises(ImageCacheError, match=f"/m/train.img:4: {images[2]}: cannot read image"):
        write_image_cache(
            str(tmp_path / "cache"), images, upstream, identity, batch_size=2, where=where, sync_interval=0
        )
    assert sorted(os.listdir(tmp_path)) == [".cache.partial", "images"]
    # once the file is replaced, the build resumes after the first batch
    _write_images(tmp_path / "images", 5)
    assert (
        write_image_cache(str(tmp_path / "cache"), images, upstream, identity, batch_size=2, log=lambda m: None)[
            "resumed_from_row"
        ]
        == 2
    )
    assert sorted(os.listdir(tmp_path)) == ["cache", "images"]


def _loss_and_grads(model, sample):
    model.train()
    crit = criterion()
    crit.set_update_num(3)
    loss, _, _ = crit(model, sample)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def test_training_on_cached_features_matches_training_on_pixels(tiny_encoders, identity, tmp_path):
    model = build_model(tiny_encoders)  # frozen image encoder, speech_encoder_dropout=0
    images = _write_images(tmp_path / "images", 4, seed=1)
    write_image_cache(str(tmp_path / "cache"), images, model.image_encoder, identity, batch_size=3)
    cache = ImageFeatureCache(str(tmp_path / "cache"))

    batch = make_batch([0, 0, 1, 2, 3, 3, 1])
    unique = [images[i] for i in range(4)]
    pixel_batch = dict(batch, net_input=dict(batch["net_input"]))
    pixel_batch["net_input"]["images"] = torch.stack(
        [model.image_encoder.preprocess(Image.open(p).convert("RGB")) for p in unique]
    )
    cached_batch = dict(batch, net_input=dict(batch["net_input"]))
    del cached_batch["net_input"]["images"]
    cls, patches = cache.lookup(unique)
    cached_batch["net_input"].update(image_cls=cls, image_patches=patches)

    loss_pixels, grads_pixels = _loss_and_grads(model, pixel_batch)
    loss_cached, grads_cached = _loss_and_grads(model, cached_batch)
    assert torch.isclose(loss_cached, loss_pixels, rtol=FP16_RTOL)
    for g_cached, g_pixels in zip(grads_cached, grads_pixels):
        assert _close(g_cached, g_pixels, rtol=1e-2)
    # the comparison is sensitive: features of the wrong images give other gradients (the loss of
    # an untrained model on four similar random images can agree within 1 % by chance)
    swapped = dict(cached_batch, net_input=dict(cached_batch["net_input"]))
    cls, patches = cache.lookup(unique[::-1])
    swapped["net_input"].update(image_cls=cls, image_patches=patches)
    _, grads_swapped = _loss_and_grads(model, swapped)
    assert not all(_close(a, b, rtol=1e-2) for a, b in zip(grads_swapped, grads_pixels))


def _make_corpus(root, images):
    """Manifests of two splits sharing one image; 2 captions per image."""
    wav_dir = root / "wavs"
    wav_dir.mkdir()
    rng = np.random.default_rng(0)
    image_root = os.path.dirname(images[0])
    for split, chosen in (("train", images[:3]), ("valid", images[2:4])):
        audio, sizes, rels = [], [], []
        for i, path in enumerate(chosen):
            for c in range(2):
                n = 8000 + 800 * (i + c)
                name = f"{split}_{i}_{c}.wav"
                sf.write(wav_dir / name, (rng.standard_normal(n) * 0.1).astype("float32"), 16000)
                audio.append(name)
                sizes.append(n)
                rels.append(os.path.basename(path))
        write_manifest(
            str(root / "manifests"), split, SpeechImageManifest(str(wav_dir), audio, sizes, image_root, rels)
        )
    return str(root / "manifests")


def test_cli_caches_the_union_of_splits_from_another_directory(
    tiny_encoders, upstream, images, tmp_path, monkeypatch, capsys
):
    import importlib.util

    data = _make_corpus(tmp_path, images)
    spec = importlib.util.spec_from_file_location(
        "cache_image_features", os.path.join(REPO, "examples", "cache_image_features.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    enc = tiny_encoders
    rc = script.main(
        [
            "--manifest-dir",
            os.path.relpath(data, elsewhere),
            "--splits",
            "train",
            "valid",
            "--image-model",
            enc["image_model"],
            "--image-pretrained",
            enc["image_pretrained"],
            "--image-model-config",
            enc["image_model_config"],
            "--out",
            "cache",
            "--batch-size",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    summary = capsys.readouterr().out
    assert "cached 4 images of train, valid" in summary and "MiB" in summary and "images/s" in summary
    cache = ImageFeatureCache(str(elsewhere / "cache"))
    assert cache.paths == images[:4]  # union, each image once, in order of first appearance
    assert _close(cache.lookup(images[:4])[1], _encode(upstream, images[:4])[1])

    rc = script.main(
        [
            "--manifest-dir",
            data,
            "--splits",
            "train",
            "--image-model",
            enc["image_model"],
            "--image-pretrained",
            str(tmp_path / "missing.bin"),
            "--out",
            "cache",
        ]
    )
    assert rc == 1 and "missing.bin" in capsys.readouterr().err


def test_task_batches_carry_cached_features_and_refuse_a_trainable_encoder(
    tiny_encoders, upstream, identity, images, tmp_path
):
    from omegaconf import OmegaConf

    from cmd_plugin.models.cmd_speech_image import CmdSpeechImageConfig
    from cmd_plugin.tasks.speech_image import SpeechImageConfig, SpeechImageTask

    enc = tiny_encoders
    data = _make_corpus(tmp_path, images)
    write_image_cache(str(tmp_path / "cache"), images[:4], upstream, identity)

    def task_config(**overrides):
        fields = dict(
            data=data,
            image_model=enc["image_model"],
            image_model_config=enc["image_model_config"],
            image_pretrained=enc["image_pretrained"],
            image_feature_cache=str(tmp_path / "cache"),
        )
        fields.update(overrides)
        return SpeechImageConfig(**fields)

    task = SpeechImageTask.setup_task(task_config())
    task.load_dataset("train")
    task.load_dataset("valid")
    train, valid = task.datasets["train"], task.datasets["valid"]
    assert train.images.cache is valid.images.cache  # opened once per task
    batch = train.collater([train[i] for i in range(len(train))])
    net_input = batch["net_input"]
    assert "images" not in net_input
    cls, patches = train.images.cache.lookup(images[:3])
    assert torch.equal(net_input["image_cls"], cls) and torch.equal(net_input["image_patches"], patches)
    assert net_input["image_index"].tolist() == [0, 0, 1, 1, 2, 2]

    model_cfg = OmegaConf.structured(
        CmdSpeechImageConfig(
            hubert_path=enc["hubert_path"],
            image_model=enc["image_model"],
            image_pretrained=enc["image_pretrained"],
            image_model_config=enc["image_model_config"],
        )
    )
    model_cfg._name = "cmd_speech_image"
    model = task.build_model(model_cfg)
    out = model(**net_input)
    assert out["image"].shape == (6, 32) and out["patches"].shape == (6, 64, 32)
    model_cfg.freeze_image_encoder = False
    with pytest.raises(ImageCacheError, match="freeze_image_encoder=true"):
        task.build_model(model_cfg)

    # a task whose encoder has other weights refuses the cache before reading any batch
    _, _, other_weights = make_tiny_clip(str(tmp_path / "other_clip"), seed=1)
    other = SpeechImageTask.setup_task(task_config(image_pretrained=other_weights))
    with pytest.raises(ImageCacheError, match="weights checksum"):
        other.load_dataset("train")


def test_cli_killed_mid_build_leaves_no_cache_and_the_same_command_resumes(
    tiny_encoders, upstream, identity, tmp_path, capsys
):
    import importlib.util
    import signal
    import subprocess
    import time

    rng = np.random.default_rng(3)
    (tmp_path / "images").mkdir()
    images = []
    for i in range(160):
        images.append(str(tmp_path / "images" / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(images[-1])
    rels = [os.path.basename(p) for p in images]
    write_manifest(
        str(tmp_path / "manifests"),
        "train",
        SpeechImageManifest(
            "/audio", [f"{i}.wav" for i in range(len(rels))], [16000] * len(rels), os.path.dirname(images[0]), rels
        ),
    )
    enc = tiny_encoders
    out = tmp_path / "cache"
    script = os.path.join(REPO, "examples", "cache_image_features.py")
    argv = [
        "--manifest-dir",
        str(tmp_path / "manifests"),
        "--splits",
        "train",
        "--image-model",
        enc["image_model"],
        "--image-pretrained",
        enc["image_pretrained"],
        "--image-model-config",
        enc["image_model_config"],
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--sync-interval",
        "0",
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    progress = tmp_path / ".cache.partial" / "progress.json"
    proc = subprocess.Popen(
        [sys.executable, script] + argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    done, deadline = 0, time.time() + 120
    while done < 10 and proc.poll() is None and time.time() < deadline:
        try:
            done = json.loads(progress.read_text())["rows_done"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    recorded = json.loads(progress.read_text())["rows_done"]
    assert 10 <= recorded < len(images)
    assert not out.exists()  # nothing passes for a cache
    with pytest.raises(ImageCacheError, match="not an image feature cache"):
        ImageFeatureCache(str(tmp_path / ".cache.partial"))

    # the same command again (in this process: its start-up is the slow part)
    spec = importlib.util.spec_from_file_location("cache_image_features_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{recorded} of {len(images)} images already encoded" in printed
    assert f"resumed after {recorded} already encoded" in printed
    assert sorted(os.listdir(tmp_path)) == ["cache", "images", "manifests"]
    # the rows encoded before the kill came from a process with another thread count: the same values
    # to the precision the cache stores
    write_image_cache(str(tmp_path / "reference"), images, upstream, identity, batch_size=2)
    assert (out / "images.txt").read_text() == (tmp_path / "reference" / "images.txt").read_text()
    for name in ("image_cls.npy", "image_patches.npy"):
        assert _same_in_fp16(np.load(out / name), np.load(tmp_path / "reference" / name)), name


def test_a_second_build_of_the_same_cache_and_a_full_disk_are_refused_before_encoding(
    upstream, identity, images, tmp_path, monkeypatch
):
    import collections

    from cmd_plugin.data import image_cache

    partial = image_cache.partial_dir_of(str(tmp_path / "cache"))
    os.makedirs(partial)
    held = image_cache._lock(partial)  # another build holds the lock
    with pytest.raises(
        ImageCacheError, match=f"another process is building this image feature cache \\(in {partial}\\)"
    ):
        write_image_cache(str(tmp_path / "cache"), images, upstream, identity)
    held.close()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(image_cache.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ImageCacheError, match=r"the cache of 5 images needs 0\.0 GB; .* has 0\.0 GB free"):
        write_image_cache(str(tmp_path / "cache"), images, upstream, identity)
    assert sorted(os.listdir(tmp_path)) == ["images"]  # nothing encoded, nothing left
