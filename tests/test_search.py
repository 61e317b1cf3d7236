"""Spoken image search: the embedding API, the index (incremental, atomic, exact and FAISS search),
examples/search.py index/query, and the results page in headless Chromium."""

import importlib.util
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from cmd_plugin.search.index import (
    ApproximateIndexConfig,
    SearchIndexError,
    auto_nlist,
    auto_nprobe,
    exact_top_k,
    load_index,
    merged_index,
    plan_update,
    save_index,
    scan_images,
    search,
    update_approximate,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SAMPLES = 40000  # the test checkpoint's task.max_sample_size: 2.5 s at 16 kHz
NUM_IMAGES = 9


def _load_script():
    spec = importlib.util.spec_from_file_location("search_script", os.path.join(REPO, "examples", "search.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


search_cli = _load_script()


def make_checkpoint(path, tiny, seed=0, task=None, **model):
    """A cmd_speech_image checkpoint in fairseq's trainer layout with perturbed ("trained") weights;
    ``model`` / ``task`` override config fields (e.g. multimodal_layers=1: a matching head)."""
    from cmd_plugin.models.cmd_speech_image import CmdSpeechImageConfig, CmdSpeechImageModel

    cfg = CmdSpeechImageConfig(
        hubert_path=tiny["hubert_path"],
        image_model=tiny["image_model"],
        image_pretrained=tiny["image_pretrained"],
        image_model_config=tiny["image_model_config"],
        speech_encoder_heads=4,
        speech_encoder_ffn_dim=128,
        speech_encoder_dropout=0.0,
        **model,
    )
    torch.manual_seed(seed)
    model = CmdSpeechImageModel.build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model_dict = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # as fairseq saves
    model_dict.update(_name="cmd_speech_image")
    state = {
        "args": None,
        "cfg": {
            "_name": None,
            "common": {"_name": None, "seed": 1},
            "task": {
                "_name": "speech_image",
                "data": os.path.join(os.path.dirname(path), "training_manifests_gone"),
                "image_model": tiny["image_model"],
                "image_model_config": tiny["image_model_config"],
                "image_pretrained": tiny["image_pretrained"],
                "image_feature_cache": "",
                "sample_rate": 16000,
                "min_sample_size": 1600,
                "max_sample_size": MAX_SAMPLES,
                "num_length_buckets": 0,
                **(task or {}),
            },
            "model": model_dict,
            "criterion": {"_name": "cmd_contrastive"},
        },
        "model": model.state_dict(),
        "criterion": {},
        "optimizer_history": [
            {
                "criterion_name": "CmdContrastiveCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {},
                "num_updates": 10,
            }
        ],
        "task_state": {},
        "extra_state": {},
        "last_optimizer_state": {},
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return path, model.eval()


def _image(path, seed, size=(48, 64)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def env(tiny_encoders, tmp_path_factory):
    from cmd_demo.tiny_encoders import make_tiny_clip
    from cmd_plugin.inference import SpeechImageEncoder

    root = tmp_path_factory.mktemp("search")
    checkpoint, model = make_checkpoint(str(root / "ck" / "checkpoint_best.pt"), tiny_encoders)
    # another model: same architecture, an image encoder with other weights
    other_clip = root / "other_clip"
    _, config, weights = make_tiny_clip(str(other_clip), seed=1)
    other_tiny = dict(tiny_encoders, image_pretrained=weights)
    other_checkpoint, _ = make_checkpoint(str(root / "ck_other" / "checkpoint_best.pt"), other_tiny, seed=1)

    images = root / "photos"
    (images / "trip" / "day1").mkdir(parents=True)
    exts = ["png", "jpg", "webp"]
    for i in range(NUM_IMAGES):
        sub = "trip/day1/" if i % 3 == 0 else ("trip/" if i % 3 == 1 else "")
        _image(images / f"{sub}img{i}.{exts[i % 3]}", seed=i, size=(40 + 4 * i, 64))
    (images / "notes.txt").write_text("not an image")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")

    rng = np.random.default_rng(0)
    audio = root / "audio"
    audio.mkdir()
    clips = {
        "stereo_44k.wav": (0.1 * rng.standard_normal((44100 * 2, 2)), 44100, None),
        "mono_16k.flac": (0.1 * rng.standard_normal(16000), 16000, None),
        "mono_22k.ogg": (0.1 * rng.standard_normal(22050 * 2), 22050, None),
    }
    for name, (samples, rate, _) in clips.items():
        sf.write(str(audio / name), samples.astype(np.float32), rate)
    encoder = SpeechImageEncoder.from_checkpoint(checkpoint)
    return {
        "root": root,
        "checkpoint": checkpoint,
        "other_checkpoint": other_checkpoint,
        "model": model,
        "images": images,
        "audio": audio,
        "encoder": encoder,
        "tiny": tiny_encoders,
    }


def _cli(*argv):
    return search_cli.main(list(argv))


def _cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        search_cli.main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]  # the one-line message


# ---------------------------------------------------------------- pure parts


def test_exact_top_k_matches_a_full_sort_for_any_block_size_with_ties_by_row():
    gen = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(1000, 32, generator=gen), dim=1)
    emb[500] = emb[10]  # an exact duplicate: equal scores, lower row first
    emb[900] = emb[10]
    queries = torch.cat([emb[10:11], F.normalize(torch.randn(4, 32, generator=gen), dim=1)])
    full = queries @ emb.T
    for block in (1, 7, 256, 5000):
        scores, rows = exact_top_k(queries, emb, k=12, block_rows=block)
        assert rows.shape == (5, 12)
        assert torch.allclose(scores, full.gather(1, rows))
        ref = full.sort(dim=1, descending=True, stable=True)
        assert torch.equal(rows, ref.indices[:, :12]), block
        assert rows[0, :3].tolist() == [10, 500, 900]
    # float16 storage converted block by block; k larger than the collection
    scores, rows = exact_top_k(queries, emb.half(), k=2000, block_rows=300)
    assert rows.shape == (5, 1000) and sorted(rows[1].tolist()) == list(range(1000))
    assert torch.allclose(scores, (queries @ emb.half().float().T).gather(1, rows), atol=1e-6)


def _files(spec):
    from cmd_plugin.search.index import ImageFile

    return [ImageFile(p, m, s) for p, m, s in spec]


def test_plan_update_keeps_unchanged_reembeds_modified_and_drops_deleted():
    old_files = _files([("a.jpg", 1, 10), ("b.png", 2, 20), ("c/d.webp", 3, 30), ("e.jpg", 4, 40)])
    emb = F.normalize(torch.randn(4, 8), dim=1)
    old = merged_index(None, plan_update(None, old_files), old_files, emb, "/photos", {"m": 1})
    assert old.ids.tolist() == [0, 1, 2, 3] and old.next_id == 4
    now = _files([("a.jpg", 1, 10), ("b.png", 5, 20), ("c/d.webp", 3, 31), ("f.png", 6, 60)])
    plan = plan_update(old, now)
    assert plan.keep_rows == [0]
    assert [f.path for f in plan.to_embed] == ["b.png", "c/d.webp", "f.png"]
    assert sorted(plan.removed) == ["b.png", "c/d.webp", "e.jpg"] and sorted(plan.modified) == ["b.png", "c/d.webp"]
    new_emb = F.normalize(torch.randn(2, 8), dim=1)  # c/d.webp turned unreadable: left out
    new = merged_index(old, plan, [plan.to_embed[0], plan.to_embed[2]], new_emb, "/photos", {"m": 1})
    assert new.paths == ["a.jpg", "b.png", "f.png"]
    assert new.ids.tolist() == [0, 4, 5] and new.next_id == 6
    assert torch.equal(new.embeddings[0], emb[0]) and torch.equal(new.embeddings[1:], new_emb)
    assert new.mtimes_ns.tolist() == [1, 5, 6] and new.sizes.tolist() == [10, 20, 60]
    assert new.rows_of_ids(np.array([5, 3, 0, -1])).tolist() == [2, -1, 0, -1]


def test_scan_finds_images_recursively_by_extension_and_skips_hidden_files(tmp_path):
    for rel in (
        "a.JPG",
        "b/c.jpeg",
        "b/d/e.webp",
        "f.png",
        "g.gif",
        "notes.txt",
        ".hidden.png",
        ".cache/h.png",
        "b/.thumbs/i.jpg",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * len(rel))
    found = scan_images(str(tmp_path))
    assert [f.path for f in found] == ["a.JPG", "b/c.jpeg", "b/d/e.webp", "f.png"]
    assert found[1].size == len("b/c.jpeg") and found[1].mtime_ns == (tmp_path / "b/c.jpeg").stat().st_mtime_ns


def test_index_file_roundtrip_is_atomic_and_corrupt_files_are_named(tmp_path):
    files = _files([("a.jpg", 1, 10), ("b.png", 2, 20)])
    index = merged_index(None, plan_update(None, files), files, F.normalize(torch.randn(2, 8), dim=1), "/p", {"m": 1})
    path = tmp_path / "index.pt"
    save_index(index, str(path))
    back = load_index(str(path))
    assert back.paths == index.paths and torch.equal(back.embeddings, index.embeddings)
    assert back.identity == {"m": 1} and back.source == str(path)
    assert os.listdir(tmp_path) == ["index.pt"]  # no temporary left
    # an interrupted write leaves the previous file intact and no temporary behind
    good = path.read_bytes()

    class Boom(Exception):
        pass

    def failing_save(obj, f):
        open(f, "wb").write(b"half")
        raise Boom()

    real_save = torch.save
    torch.save = failing_save
    try:
        with pytest.raises(Boom):
            save_index(index, str(path))
    finally:
        torch.save = real_save
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["index.pt"]

    for name, content in (("random.pt", os.urandom(300)), ("truncated.pt", good[: len(good) // 2])):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(SearchIndexError, match=f"{bad}: not a search index"):
            load_index(str(bad))
    other = tmp_path / "embeddings.pt"
    torch.save({"format": "cmd_plugin.eval_embeddings.v1", "speech": torch.zeros(2)}, other)
    with pytest.raises(SearchIndexError, match="format 'cmd_plugin.eval_embeddings.v1'"):
        load_index(str(other))
    payload = torch.load(path, weights_only=True)
    payload["ids"] = torch.tensor([1, 0])
    broken = tmp_path / "broken_ids.pt"
    torch.save(payload, broken)
    with pytest.raises(SearchIndexError, match=f"{broken}: corrupt search index: 'ids' are not increasing"):
        load_index(str(broken))
    with pytest.raises(FileNotFoundError, match="index file not found"):
        load_index(str(tmp_path / "missing.pt"))


def _clustered(n, dim, clusters, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=gen), dim=1)
    which = torch.randint(0, clusters, (n,), generator=gen)
    return F.normalize(centres[which] + noise / dim**0.5 * torch.randn(n, dim, generator=gen), dim=1)


def test_approximate_index_recall_parameters_and_incremental_update():
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install faiss-cpu)")
    n, dim = 4000, 32
    emb = _clustered(n, dim, clusters=40, noise=0.6, seed=0)
    files = _files([(f"{i:05d}.jpg", i, 1) for i in range(n)])
    index = merged_index(None, plan_update(None, files), files, emb, "/p", {"m": 1})
    cfg = ApproximateIndexConfig(mode="always", nprobe=16)
    update_approximate(index, None, cfg)
    params = index.approximate["params"]
    assert params["factory"] == "IVF64,SQfp16" and params["nlist"] == 64 and params["nprobe"] == 16
    assert params["trained_on"] == n and params["num_vectors"] == n and params["metric"] == "inner_product"

    queries = _clustered(100, dim, clusters=40, noise=0.9, seed=1)
    exact = search(index, queries, k=10, exact=True)
    approx = search(index, queries, k=10)
    assert approx.method.startswith("approximate (IVF64,SQfp16, nprobe 16")
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.rows, exact.rows)])
    assert recall >= 0.95
    # candidates are re-scored exactly: shared results have the exact scores
    for a_rows, a_scores in zip(approx.rows, approx.scores):
        assert np.allclose(a_scores, (queries[approx.rows.index(a_rows)] @ emb[a_rows].T).numpy(), atol=1e-6)
        assert a_scores == sorted(a_scores, reverse=True)

    # incremental: delete 100 rows, add 50 new ones; the cells are kept (no re-training)
    now = [f for i, f in enumerate(files) if i % 40 != 0] + _files([(f"new{i}.jpg", 1, 1) for i in range(50)])
    plan = plan_update(index, now)
    new_emb = _clustered(50, dim, clusters=40, noise=0.6, seed=2)
    updated = merged_index(index, plan, plan.to_embed, new_emb, "/p", {"m": 1})
    update_approximate(updated, index, cfg)
    assert updated.approximate["params"]["trained_on"] == n  # same cells
    assert updated.approximate["params"]["num_vectors"] == len(updated) == n - 100 + 50
    res = search(updated, new_emb, k=1)
    assert [updated.paths[r[0]] for r in res.rows] == [f"new{i}.jpg" for i in range(50)]
    removed = {f.path for i, f in enumerate(files) if i % 40 == 0}
    res = search(updated, emb[::40], k=10)
    assert not removed & {updated.paths[r] for rows in res.rows for r in rows}
    # a collection that grew past the factor is re-trained
    cfg_small = ApproximateIndexConfig(mode="always", nprobe=8, retrain_factor=1.01)
    update_approximate(updated, index, cfg_small)
    assert updated.approximate["params"]["trained_on"] == len(updated)
    # defaults: 4 sqrt(N) cells (a power of two), nlist / 8 of them visited per query
    update_approximate(updated, None, ApproximateIndexConfig(mode="always"))
    assert updated.approximate["params"]["nlist"] == 64 and updated.approximate["params"]["nprobe"] == 8
    assert (auto_nlist(100_000), auto_nlist(1_000_000), auto_nprobe(4096)) == (1024, 4096, 512)
    # mode auto below min_images: no approximate index at all
    update_approximate(updated, index, ApproximateIndexConfig(mode="auto", min_images=10**6))
    assert updated.approximate is None


def test_audio_is_down_mixed_and_resampled_to_16k_and_long_clips_are_split_in_windows():
    from cmd_plugin.inference import split_windows, to_mono_16k

    rate = 44100
    t = np.arange(rate) / rate
    left, right = np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)
    out = to_mono_16k(np.stack([left, right], axis=1), rate)
    assert out.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(out.numpy()))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 Hz bins over one second
    assert abs(out.abs().max().item() - 0.75) < 0.02  # the mean of the channels
    assert split_windows(100, 40) == [(0, 33), (33, 67), (67, 100)]
    assert split_windows(40, 40) == [(0, 40)]


# ---------------------------------------------------------------- the API on a real checkpoint


def test_api_embeds_audio_of_any_rate_and_images_like_the_model(env):
    from cmd_plugin.inference import to_mono_16k
    from cmd_plugin.tasks.speech_image import image_transform

    enc, model = env["encoder"], env["model"]
    files = [str(env["audio"] / n) for n in ("stereo_44k.wav", "mono_16k.flac", "mono_22k.ogg")]
    emb = enc.embed_audio(files, batch_size=2)
    assert emb.shape == (3, enc.embed_dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        for i, f in enumerate(files):
            wav, rate = sf.read(f, dtype="float32", always_2d=True)
            alone = model.encode_speech(to_mono_16k(wav, rate)[None])[0]
            # batched with padding: close to the clip encoded alone
            assert F.cosine_similarity(emb[i], alone, dim=0) > 0.999, f
    # arrays with their rate, one at a time: the model's own embedding exactly
    wav, rate = sf.read(files[0], dtype="float32")
    one = enc.embed_audio([(wav, rate)])
    with torch.no_grad():
        ref = model.encode_speech(to_mono_16k(wav, rate)[None])
    assert torch.allclose(one, ref, atol=1e-5)
    assert torch.allclose(enc.embed_audio([wav], sample_rate=rate), ref, atol=1e-5)

    paths = sorted(str(p) for p in env["images"].rglob("img*"))
    pil = Image.open(paths[1])
    images = enc.embed_images([paths[0], pil, paths[2]], batch_size=2)
    transform = image_transform(env["tiny"]["image_model"], env["tiny"]["image_model_config"])
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[:3]])
        ref, _ = model.encode_image(pixels)
    assert torch.allclose(images, ref, atol=1e-5)
    assert torch.allclose(images.norm(dim=1), torch.ones(3), atol=1e-5)


def test_long_clips_are_embedded_in_windows_or_refused_never_cropped(env):
    from cmd_plugin.inference import InferenceError, SpeechImageEncoder, split_windows

    enc = env["encoder"]
    rng = np.random.default_rng(5)
    long = (0.1 * rng.standard_normal(int(2.2 * MAX_SAMPLES))).astype(np.float32)  # 5.5 s: 3 windows
    emb = enc.embed_audio([(long, 16000)])
    windows = [torch.from_numpy(long[a:b]) for a, b in split_windows(len(long), MAX_SAMPLES)]
    assert len(windows) == 3
    with torch.no_grad():
        parts = torch.cat([env["model"].encode_speech(w[None]) for w in windows])
    assert torch.allclose(emb[0], F.normalize(parts.mean(0), dim=0), atol=1e-5)
    # not the first window alone (what a silent crop would give)
    assert not torch.allclose(emb[0], parts[0], atol=1e-3)

    strict = SpeechImageEncoder(enc.model, enc.task, checkpoint=env["checkpoint"], long_audio="error")
    path = env["audio"] / "long.wav"
    sf.write(str(path), long, 16000)
    with pytest.raises(InferenceError, match=rf"{path}: 5.5 s of audio, longer than the model's limit 2.5 s"):
        strict.embed_audio([str(path)])
    with pytest.raises(InferenceError, match=r"audio #0: 0.050 s of audio, shorter than the model's minimum 0.100 s"):
        enc.embed_audio([(np.zeros(800, np.float32), 16000)])


def test_bad_audio_and_image_inputs_name_the_file(env, tmp_path):
    from cmd_plugin.inference import InferenceError

    enc = env["encoder"]
    missing = tmp_path / "nothing.wav"
    with pytest.raises(InferenceError, match=f"{missing}: audio file not found"):
        enc.embed_audio([str(missing)])
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF....not audio at all")
    with pytest.raises(InferenceError, match=f"{garbage}: cannot read audio"):
        enc.embed_audio([str(garbage)])
    with pytest.raises(InferenceError, match="needs its sample rate"):
        enc.embed_audio([np.zeros(16000, np.float32)])
    with pytest.raises(InferenceError, match=f"{env['images'] / 'broken.jpg'}: cannot read image"):
        enc.embed_images([str(env["images"] / "broken.jpg")])
    with pytest.raises(InferenceError, match=f"{tmp_path / 'gone.png'}: image file not found"):
        enc.embed_images([str(tmp_path / "gone.png")])


def test_an_image_index_and_an_image_feature_cache_fingerprint_the_image_encoder_alike(env):
    from cmd_plugin.data.image_cache import encoder_identity

    tiny = env["tiny"]
    cache = encoder_identity(tiny["image_model"], tiny["image_pretrained"], tiny["image_model_config"])
    index = env["encoder"].identity
    assert index["image_weights_sha256"] == cache["weights_sha256"]
    assert (index["image_model"], index["model_config"], index["preprocess"]) == (
        cache["model"],
        cache["model_config"],
        cache["preprocess"],
    )


# ---------------------------------------------------------------- the command line


def test_index_then_query_ranks_by_the_models_embeddings_and_updates_incrementally(env, tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(env["images"], photos)
    out = tmp_path / "idx" / "photos.pt"
    assert (
        _cli(
            "index",
            "--checkpoint",
            env["checkpoint"],
            "--images",
            str(photos),
            "--out",
            str(out),
            "--no-progress",
            "--batch-size",
            "4",
        )
        == 0
    )
    captured = capsys.readouterr()
    assert f"skipped: {photos / 'broken.jpg'}: cannot read image" in captured.err
    assert "1 unreadable image(s) skipped" in captured.err
    assert f"indexed {NUM_IMAGES} images in {out}: {NUM_IMAGES} embedded" in captured.out
    index = load_index(str(out))
    assert sorted(index.paths) == sorted(p.relative_to(photos).as_posix() for p in photos.rglob("img*"))
    assert index.approximate is None and index.embeddings.dtype == torch.float32
    enc = env["encoder"]
    assert index.identity["image_weights_sha256"] == enc.identity["image_weights_sha256"]
    reference = enc.embed_images([index.absolute_path(r) for r in range(len(index))])
    assert torch.allclose(index.embeddings, reference, atol=1e-5)

    audio = [str(env["audio"] / "stereo_44k.wav"), str(env["audio"] / "mono_22k.ogg")]
    assert _cli("query", "--index", str(out), "--checkpoint", env["checkpoint"], *audio, "--top-k", "4", "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["method"] == "exact" and record["num_images"] == NUM_IMAGES
    queries = enc.embed_audio(audio)
    for q, query in enumerate(record["queries"]):
        scores = queries[q] @ reference.T
        top = scores.argsort(descending=True)[:4].tolist()
        assert [r["path"] for r in query["results"]] == [index.paths[i] for i in top]
        assert [r["rank"] for r in query["results"]] == [1, 2, 3, 4]
        assert np.allclose([r["score"] for r in query["results"]], scores[top].numpy(), atol=1e-4)
        assert query["audio"] == audio[q] and query["transcript"] is None
    assert record["timing_seconds"]["per_query"] > 0
    # plain text: ranked absolute paths with scores
    assert _cli("query", "--index", str(out), "--checkpoint", env["checkpoint"], audio[0], "--top-k", "2") == 0
    text = capsys.readouterr().out
    assert f"    1. {record['queries'][0]['results'][0]['score']:.4f}  " in text
    assert "exact search; per query:" in text

    # a changed folder: one modified, one deleted, one added, the broken one fixed
    _image(photos / "trip" / "img1.jpg", seed=100)
    os.utime(photos / "trip" / "img1.jpg", ns=(10**18, 10**18))
    (photos / "img2.webp").unlink()
    _image(photos / "new.png", seed=200)
    _image(photos / "broken.jpg", seed=300)
    before = {p: index.embeddings[i].clone() for i, p in enumerate(index.paths)}
    assert (
        _cli("index", "--checkpoint", env["checkpoint"], "--images", str(photos), "--out", str(out), "--no-progress")
        == 0
    )
    assert (
        f"indexed {NUM_IMAGES + 1} images in {out}: 3 embedded, {NUM_IMAGES - 2} unchanged, 1 removed, "
        "0 unreadable" in capsys.readouterr().out
    )
    index2 = load_index(str(out))
    assert index2.meta["last_update"]["modified"] == 1
    assert "img2.webp" not in index2.paths and {"new.png", "broken.jpg", "trip/img1.jpg"} <= set(index2.paths)
    for i, p in enumerate(index2.paths):
        if p in before and p != "trip/img1.jpg":
            assert torch.equal(index2.embeddings[i], before[p])  # unchanged: kept, not re-embedded
    row = index2.paths.index("trip/img1.jpg")
    assert torch.allclose(index2.embeddings[row], enc.embed_images([str(photos / "trip" / "img1.jpg")])[0], atol=1e-5)
    assert sorted(os.listdir(out.parent)) == ["photos.pt"]


def test_an_interrupted_index_run_leaves_the_previous_index_usable(env, tmp_path, capsys, monkeypatch):
    from cmd_plugin.inference import SpeechImageEncoder

    photos = tmp_path / "photos"
    shutil.copytree(env["images"], photos)
    out = tmp_path / "index.pt"
    assert (
        _cli("index", "--checkpoint", env["checkpoint"], "--images", str(photos), "--out", str(out), "--no-progress")
        == 0
    )
    good = out.read_bytes()
    for i in range(6):
        _image(photos / f"more{i}.png", seed=50 + i)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SpeechImageEncoder, "embed_pixels", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search_cli.main(
            ["index", "--checkpoint", env["checkpoint"], "--images", str(photos), "--out", str(out), "--no-progress"]
        )
    assert out.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["index.pt", "photos"]
    assert len(load_index(str(out))) == NUM_IMAGES


def test_a_long_run_saves_progress_and_a_rerun_resumes_where_it_stopped(env, tmp_path, capsys, monkeypatch):
    from cmd_plugin.inference import SpeechImageEncoder

    photos = tmp_path / "photos"
    shutil.copytree(env["images"], photos)
    out = tmp_path / "index.pt"
    real = SpeechImageEncoder.embed_pixels
    calls = []

    def dies_in_third_batch(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, pixels)

    monkeypatch.setattr(SpeechImageEncoder, "embed_pixels", dies_in_third_batch)
    args = [
        "index",
        "--checkpoint",
        env["checkpoint"],
        "--images",
        str(photos),
        "--out",
        str(out),
        "--no-progress",
        "--batch-size",
        "2",
        "--save-every-minutes",
        "1e-9",
    ]
    with pytest.raises(KeyboardInterrupt):
        search_cli.main(args)
    partial = load_index(str(out))
    # the two batches before the interruption: broken.jpg (skipped) + img2.webp, then two more
    assert len(partial) == 3 and partial.meta["partial"] is True and partial.paths[0] == "img2.webp"
    monkeypatch.setattr(SpeechImageEncoder, "embed_pixels", real)
    assert search_cli.main(args + ["--save-every-minutes", "0"]) == 0
    assert f"indexed {NUM_IMAGES} images in {out}: {NUM_IMAGES - 3} embedded, 3 unchanged" in capsys.readouterr().out
    done = load_index(str(out))
    assert done.meta["partial"] is False
    reference = env["encoder"].embed_images([done.absolute_path(r) for r in range(len(done))])
    assert torch.allclose(done.embeddings, reference, atol=1e-5)


def test_bad_input_gives_one_line_naming_the_file_and_writes_nothing(env, tmp_path, capsys):
    ck = env["checkpoint"]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    err = _cli_error(capsys, "index", "--checkpoint", ck, "--images", str(empty), "--out", str(tmp_path / "i.pt"))
    assert f"{empty}: no images found (expected .jpg, .jpeg, .png or .webp files under it)" in err
    assert not (tmp_path / "i.pt").exists()
    err = _cli_error(capsys, "index", "--checkpoint", ck, "--images", str(tmp_path / "nowhere"))
    assert f"{tmp_path / 'nowhere'}: not a directory" in err

    only_broken = tmp_path / "only_broken"
    only_broken.mkdir()
    (only_broken / "x.png").write_bytes(b"\x89PNG broken")
    err = _cli_error(capsys, "index", "--checkpoint", ck, "--images", str(only_broken), "--no-progress")
    assert f"{only_broken}: none of the 1 images could be read" in err and "nothing written" in err
    assert os.listdir(only_broken) == ["x.png"]

    index_path = tmp_path / "photos.pt"
    assert (
        _cli("index", "--checkpoint", ck, "--images", str(env["images"]), "--out", str(index_path), "--no-progress")
        == 0
    )
    capsys.readouterr()
    good = index_path.read_bytes()
    audio = str(env["audio"] / "mono_16k.flac")
    # an index of another model (another image encoder) is refused, naming the file and the field
    err = _cli_error(capsys, "query", "--index", str(index_path), "--checkpoint", env["other_checkpoint"], audio)
    assert f"{index_path} was built with another image encoder than this checkpoint's" in err
    assert "image encoder weights (image_weights_sha256)" in err
    err = _cli_error(
        capsys,
        "index",
        "--checkpoint",
        env["other_checkpoint"],
        "--images",
        str(env["images"]),
        "--out",
        str(index_path),
        "--no-progress",
    )
    assert "another image encoder" in err and "--rebuild" in err
    assert index_path.read_bytes() == good

    # a corrupt index: named on query; index refuses to overwrite it without --rebuild
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good[: len(good) // 3])
    err = _cli_error(capsys, "query", "--index", str(corrupt), "--checkpoint", ck, audio)
    assert f"{corrupt}: not a search index, expected an index written by examples/search.py index" in err
    err = _cli_error(capsys, "index", "--checkpoint", ck, "--images", str(env["images"]), "--out", str(corrupt))
    assert f"{corrupt}: not a search index" in err and "pass --rebuild" in err
    assert corrupt.read_bytes() == good[: len(good) // 3]

    # missing or unreadable audio, a transcripts file of the wrong length
    err = _cli_error(capsys, "query", "--index", str(index_path), "--checkpoint", ck, str(tmp_path / "gone.wav"))
    assert f"{tmp_path / 'gone.wav'}: audio file not found" in err
    garbage = tmp_path / "garbage.flac"
    garbage.write_bytes(b"fLaC not really")
    err = _cli_error(capsys, "query", "--index", str(index_path), "--checkpoint", ck, str(garbage))
    assert f"{garbage}: cannot read audio" in err
    transcripts = tmp_path / "t.txt"
    transcripts.write_text("one\ntwo\n")
    err = _cli_error(
        capsys, "query", "--index", str(index_path), "--checkpoint", ck, audio, "--transcripts", str(transcripts)
    )
    assert f"{transcripts}: 2 lines, expected 1" in err
    err = _cli_error(capsys, "query", "--index", str(tmp_path / "none.pt"), "--checkpoint", ck, audio)
    assert "index file not found" in err and "none.pt" in err
    err = _cli_error(capsys, "query", "--index", str(index_path), "--checkpoint", ck, audio, "--fp16")
    assert "--fp16 needs --device cuda" in err


# ---------------------------------------------------------------- the results page


_PROBE = """<script>
window.addEventListener('load', function () {
  var audios = Array.prototype.slice.call(document.querySelectorAll('audio'));
  function report() {
    var out = {
      images: Array.prototype.map.call(document.querySelectorAll('img'), function (i) {
        return {w: i.naturalWidth, complete: i.complete}; }),
      audio: audios.map(function (a) {
        return {duration: a.duration, error: a.error ? a.error.code : null, ready: a.readyState,
                canPlay: a.canPlayType('audio/wav'), src: a.currentSrc.slice(0, 22)}; })
    };
    var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  var pending = audios.filter(function (a) { return a.readyState < 1 && !a.error; });
  if (!pending.length) { report(); return; }
  var left = pending.length;
  pending.forEach(function (a) {
    function done() { if (--left === 0) report(); }
    a.addEventListener('loadedmetadata', done); a.addEventListener('error', done);
  });
});
</script>"""


def _chromium():
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_results_page_plays_the_query_and_shows_decoded_thumbnails_in_chromium(env, tmp_path, capsys):
    index_path = tmp_path / "photos.pt"
    assert (
        _cli(
            "index",
            "--checkpoint",
            env["checkpoint"],
            "--images",
            str(env["images"]),
            "--out",
            str(index_path),
            "--no-progress",
        )
        == 0
    )
    audio = [str(env["audio"] / "stereo_44k.wav"), str(env["audio"] / "mono_22k.ogg")]
    transcripts = tmp_path / "said.txt"
    transcripts.write_text("a red circle & a <blue> square\n\n")
    page = tmp_path / "pages" / "results.html"
    assert (
        _cli(
            "query",
            "--index",
            str(index_path),
            "--checkpoint",
            env["checkpoint"],
            *audio,
            "--top-k",
            "5",
            "--html",
            str(page),
            "--transcripts",
            str(transcripts),
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"results page: {page}" in out
    html = page.read_text()
    # self-contained: nothing fetched from disk or network
    assert "file://" not in html and "http" not in html.replace("http-equiv", "")
    assert html.count("<audio") == 2 and html.count('<img src="data:image/jpeg;base64,') == 10
    assert "a red circle &amp; a &lt;blue&gt; square" in html
    assert html.count('class="transcript"') == 1  # the second query has no transcript
    # --explain 3 (the default): the top 3 of each query with where it lands and which part of it drove it
    # (the cosine with each patch's value-path token), the time it took printed like the other steps
    assert html.count('<img class="explain-map" src="data:image/png;base64,') == 6
    assert html.count('<img class="explain-saliency" src="data:image/png;base64,') == 6
    assert html.count('data-kind="dense_similarity"') == 6
    assert "explaining the top 3 of each query for the page" in out

    chromium = _chromium()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--mute-audio",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    shot = tmp_path / "results.png"
    proc = subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 1400)
        colours = im.convert("RGB").resize((120, 140)).getcolors(maxcolors=100000)
        assert colours is not None and len(colours) > 200  # thumbnails drawn, not a blank page
    # the same page plus a probe script, read back from the DOM after load
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", _PROBE + "</body>"))
    proc = subprocess.run(
        [chromium, *flags, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert '<pre id="probe">' in proc.stdout, proc.stderr[-2000:]
    probe = json.loads(proc.stdout.split('<pre id="probe">')[1].split("</pre>")[0])
    # 10 thumbnails, 6 heatmaps and 6 saliency strips, every one decoded
    assert len(probe["images"]) == 22 and all(i["w"] > 0 and i["complete"] for i in probe["images"])
    assert len(probe["audio"]) == 2
    for a, expected in zip(probe["audio"], (2.0, 2.0)):
        assert a["error"] is None and a["ready"] >= 1 and a["canPlay"] in ("maybe", "probably")
        assert a["src"].startswith("data:audio/wav;base64")
        assert abs(a["duration"] - expected) < 0.01
    if os.environ.get("CMD_SEARCH_SCREENSHOT"):  # to look at the page
        shutil.copy(shot, os.environ["CMD_SEARCH_SCREENSHOT"])
