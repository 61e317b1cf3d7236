"""cmd_plugin/retrieval/mteb_model.py and examples/eval_mteb.py: a checkpoint as an mteb model, a manifest split as
mteb tasks, and the cross-check of mteb's evaluator against examples/eval_recall.py on a tiny corpus.

Environment A only (mteb needs Python >= 3.11): mteb is imported inside the tests, so that environment
B can still collect this module."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from test_search import make_checkpoint

from cmd_plugin.data.manifest import ManifestError, SpeechImageManifest, write_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES, CAPTIONS = 12, 3
KS = (1, 5, 10)


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(REPO, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_corpus(root, rng):
    wav_dir, img_dir = root / "wavs", root / "images"
    wav_dir.mkdir()
    img_dir.mkdir()
    audio, sizes, images = [], [], []
    for i in range(NUM_IMAGES):
        Image.fromarray(rng.integers(0, 256, size=(40 + 4 * i, 56, 3), dtype=np.uint8)).save(img_dir / f"img{i}.png")
        for c in range(CAPTIONS):
            n = 3000 + 900 * ((i * CAPTIONS + c) % 7)  # lengths vary: batches are padded, as in real splits
            sf.write(str(wav_dir / f"img{i}_{c}.wav"), 0.1 * rng.standard_normal(n).astype(np.float32), 16000)
            audio.append(f"img{i}_{c}.wav")
            sizes.append(n)
            images.append(f"img{i}.png")
    order = rng.permutation(len(audio))  # captions of one image are not adjacent in the manifest
    manifest = SpeechImageManifest(
        audio_root=str(wav_dir),
        audio_paths=[audio[i] for i in order],
        num_samples=[sizes[i] for i in order],
        image_root=str(img_dir),
        image_paths=[images[i] for i in order],
    )
    write_manifest(str(root / "manifests"), "test", manifest)
    return manifest


@pytest.fixture(scope="module")
def mm():
    import cmd_plugin.retrieval.mteb_model as module

    return module


@pytest.fixture(scope="module")
def setup(tiny_encoders, tmp_path_factory, mm):
    root = tmp_path_factory.mktemp("mteb")
    manifest = _write_corpus(root, np.random.default_rng(0))
    checkpoint, _ = make_checkpoint(str(root / "run" / "checkpoint_best.pt"), tiny_encoders)
    model = mm.CmdSpeechImageMteb.from_checkpoint(checkpoint, batch_size=4)
    return {
        "root": root,
        "manifests": str(root / "manifests"),
        "manifest": manifest,
        "checkpoint": checkpoint,
        "model": model,
    }


def _loader(task, part, batch_size=5):
    """mteb's own DataLoader over a task's queries or corpus."""
    from mteb._create_dataloaders import create_dataloader
    from mteb.types import PromptType

    task.load_data()
    data = task.dataset["default"][task.split]
    prompt = PromptType.query if part == "queries" else PromptType.document
    return create_dataloader(data[part], task_metadata=task.metadata, prompt_type=prompt, batch_size=batch_size)


def _encode(model, loader, task):
    return model.encode(
        loader, task_metadata=task.metadata, hf_split=task.split, hf_subset="default", show_progress_bar=False
    )


def test_the_models_embeddings_are_speech_image_encoders(setup, mm):
    model, manifest = setup["model"], setup["manifest"]
    task = mm.manifest_task(setup["manifests"], "test", "a2i")
    # mteb batches by 5 in manifest order; the model re-batches by length in 4s, as SpeechImageEncoder does
    speech = _encode(model, _loader(task, "queries"), task)
    images = _encode(model, _loader(task, "corpus"), task)
    encoder = model.encoder
    expected_speech = encoder.embed_audio([manifest.audio_path(i) for i in range(len(manifest))], batch_size=4)
    expected_images = encoder.embed_images([manifest.image_path(p) for p in manifest.unique_images])
    assert isinstance(speech, np.ndarray) and speech.dtype == np.float32
    assert speech.shape == (len(manifest), encoder.embed_dim) and images.shape == (NUM_IMAGES, encoder.embed_dim)
    np.testing.assert_allclose(speech, expected_speech.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(images, expected_images.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(speech, axis=1), 1.0, atol=1e-5)


def test_model_meta_follows_mtebs_conventions_and_the_revision_fingerprints_the_weights(setup, tiny_encoders, mm):
    from mteb.models import EncoderProtocol, ModelMeta

    model = setup["model"]
    meta = model.mteb_model_meta
    assert isinstance(model, EncoderProtocol) and isinstance(meta, ModelMeta)
    assert meta.name == "cmd_plugin/run-checkpoint_best"
    assert meta.modalities == ["audio", "image"] and meta.similarity_fn_name == "cosine"
    assert meta.embed_dim == model.encoder.embed_dim
    assert meta.n_parameters == sum(p.numel() for p in model.encoder.model.parameters())
    assert len(meta.revision) == 16 and meta.revision == mm.checkpoint_fingerprint(model.encoder)
    # cosine: mteb's similarity on our unit-norm embeddings is their dot product
    a, b = torch.randn(3, 8), torch.randn(4, 8)
    a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    torch.testing.assert_close(torch.as_tensor(model.similarity(a, b)), a @ b.T)
    # other trained weights, another revision; ModelMeta.load_model rebuilds the same model
    other, _ = make_checkpoint(str(setup["root"] / "run2" / "checkpoint_best.pt"), tiny_encoders, seed=1)
    assert mm.CmdSpeechImageMteb.from_checkpoint(other).mteb_model_meta.revision != meta.revision
    reloaded = meta.load_model()
    assert reloaded.mteb_model_meta.revision == meta.revision and reloaded.batch_size == model.batch_size


def test_audio_items_of_any_rate_and_channel_count_are_read_channels_first(setup, mm):
    import datasets
    from mteb._create_dataloaders import create_dataloader
    from mteb.types import PromptType

    model = setup["model"]
    rng = np.random.default_rng(1)
    stereo = (0.1 * rng.standard_normal((2, 44100))).astype(np.float32)  # (C, T), as mteb's collator reads it
    mono = (0.1 * rng.standard_normal((1, 22050))).astype(np.float32)  # one channel, channels first
    data = datasets.Dataset.from_list(
        [
            {"id": "a", "audio": {"array": stereo.tolist(), "sampling_rate": 44100}},
            {"id": "b", "audio": {"array": mono.tolist(), "sampling_rate": 22050}},
        ]
    )
    task = mm.manifest_task(setup["manifests"], "test", "a2i")
    got = model.encode(
        create_dataloader(data, task_metadata=task.metadata, prompt_type=PromptType.query),
        task_metadata=task.metadata,
        hf_split="test",
        hf_subset="default",
        show_progress_bar=False,
    )
    expected = model.encoder.embed_audio([(stereo.T, 44100), (mono[0], 22050)], batch_size=model.batch_size)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def cross_check(setup, tmp_path_factory):
    """examples/eval_mteb.py (mteb's evaluator on the local tasks) and examples/eval_recall.py on the same split."""
    out = tmp_path_factory.mktemp("cross_check")
    eval_mteb, eval_recall = _load_script("eval_mteb"), _load_script("eval_recall")
    common = ["--checkpoint", setup["checkpoint"], "--data", setup["manifests"], "--split", "test", "--batch-size", "4"]
    assert eval_mteb.main(common + ["--no-progress", "--output-json", str(out / "mteb.json")]) == 0
    assert (
        eval_recall.main(
            common
            + ["--no-progress", "--output-json", str(out / "recall.json"), "--save-embeddings", str(out / "emb.pt")]
        )
        == 0
    )
    emb = torch.load(out / "emb.pt", weights_only=False)
    return {
        "mteb": json.loads((out / "mteb.json").read_text()),
        "recall": json.loads((out / "recall.json").read_text()),
        "emb": emb,
    }


def _scores(record, direction):
    (name,) = [n for n in record["scores"] if n.endswith(f"{direction}Retrieval")]
    return record["scores"][name]["default"]


def _ranks(scores, relevant):
    """Per query row, the 0-based ranks of its relevant columns (descending score; no ties here)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    position = np.argsort(order, axis=1)
    return [position[q, sorted(relevant[q])] for q in range(scores.shape[0])]


def test_mteb_and_eval_recall_agree_where_their_metrics_mean_the_same(cross_check):
    mteb_record, ours = cross_check["mteb"], cross_check["recall"]
    recall = ours["recall"]
    s2i, i2s = _scores(mteb_record, "A2I"), _scores(mteb_record, "I2A")
    for k in KS:
        # speech -> image, one relevant image per query: recall, hit rate and R@K are one thing
        assert 100 * s2i[f"recall_at_{k}"] == pytest.approx(recall[f"s2i_r{k}"], abs=1e-3)
        assert 100 * s2i[f"hit_rate_at_{k}"] == pytest.approx(recall[f"s2i_r{k}"], abs=1e-3)
        # image -> speech: our "any caption in the top K" is mteb's hit rate
        assert 100 * i2s[f"hit_rate_at_{k}"] == pytest.approx(recall[f"i2s_r{k}"], abs=1e-3)
    # the CLI's own side-by-side figures are eval_recall's
    for key in [f"{d}_r{k}" for d in ("s2i", "i2s") for k in KS]:
        assert mteb_record["ours"][key] == pytest.approx(recall[key], abs=1e-9)


def test_image_to_speech_recall_is_the_share_of_captions_found_and_ndcg_is_mtebs(cross_check):
    emb = cross_check["emb"]
    speech, images = emb["speech"].numpy(), emb["images"].numpy()
    image_ids = emb["image_ids"].numpy()
    s2i, i2s = _scores(cross_check["mteb"], "A2I"), _scores(cross_check["mteb"], "I2A")
    captions = [set(np.flatnonzero(image_ids == j)) for j in range(len(images))]
    i2s_ranks = _ranks(images @ speech.T, captions)
    s2i_ranks = _ranks(speech @ images.T, [{j} for j in image_ids])
    differs = False
    for k in KS:
        share = np.mean([np.mean(r < k) for r in i2s_ranks])
        any_hit = np.mean([np.any(r < k) for r in i2s_ranks])
        assert i2s[f"recall_at_{k}"] == pytest.approx(share, abs=1e-5)
        differs |= abs(share - any_hit) > 1e-6
    assert differs, "on this corpus the two image->speech definitions must tell apart"
    ndcg = np.mean([1 / np.log2(r[0] + 2) if r[0] < 10 else 0.0 for r in s2i_ranks])
    assert s2i["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-5)
    assert s2i["main_score"] == s2i["ndcg_at_10"]


def test_the_cli_prints_mteb_scores_and_our_recall_side_by_side(setup, capsys, tmp_path):
    eval_mteb = _load_script("eval_mteb")
    assert (
        eval_mteb.main(
            ["--checkpoint", setup["checkpoint"], "--data", setup["manifests"], "--no-progress", "--batch-size", "4"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "revision " + setup["model"].mteb_model_meta.revision in out
    root = os.path.basename(setup["root"]).capitalize()  # the manifests' parent names the tasks
    for name in (
        f"Manifest{root}TestA2IRetrieval",
        f"Manifest{root}TestI2ARetrieval",
        "speech->image  ours",
        "image->speech  mteb hit rate",
        "image->speech  mteb recall (share found)",
    ):
        assert name in out, out
    assert f"{NUM_IMAGES * CAPTIONS} utterances, {NUM_IMAGES} images" in out


def test_a_checkpoint_mteb_cannot_use_is_refused_by_name(setup, tiny_encoders, mm, tmp_path, capsys):
    foreign = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, foreign)
    for path, expected in (
        (tmp_path / "missing.pt", "checkpoint not found"),
        (foreign, "needs a trained cmd_speech_image checkpoint"),
        (tiny_encoders["hubert_path"], "its model is 'hubert'"),
    ):  # a speech model alone
        with pytest.raises(mm.MtebModelError) as err:
            mm.CmdSpeechImageMteb.from_checkpoint(str(path))
        message = str(err.value)
        assert message.count(str(path)) == 1 and expected in message, message
        if "not found" not in expected:
            assert "mteb cannot use it" in message
    eval_mteb = _load_script("eval_mteb")
    with pytest.raises(SystemExit) as exit_:
        eval_mteb.main(["--checkpoint", str(foreign), "--data", setup["manifests"], "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {foreign} is not a fairseq checkpoint" in err and "mteb cannot use it" in err
    assert "Traceback" not in err


def test_a_task_of_another_modality_is_refused_with_the_modalities_named(setup, mm):
    import datasets
    import mteb
    from mteb._create_dataloaders import create_dataloader
    from mteb.types import PromptType

    model = setup["model"]
    # a text task of mteb's registry: refused before any download
    with pytest.raises(ValueError, match=r"supports \['audio', 'image'\]"):
        mteb.evaluate(model, mteb.get_tasks(tasks=["NFCorpus"]), cache=None)
    # text reaching encode (a task mixing text with audio or images): our message names it
    task = mteb.get_task("SpokenCOCOA2IRetrieval")
    texts = datasets.Dataset.from_dict({"id": ["q1"], "text": ["a dog on a beach"]})
    loader = torch.utils.data.DataLoader(texts, batch_size=1, collate_fn=lambda rows: rows)
    with pytest.raises(mm.MtebModelError, match="SpokenCOCOA2IRetrieval .* gives text; this model embeds"):
        model.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default")
    # mteb's loader for an audio-image task drops other columns: nothing left to embed is named too
    with pytest.raises(mm.MtebModelError, match=r"gives no audio or image \(columns: id\)"):
        model.encode(
            create_dataloader(texts, task_metadata=task.metadata, prompt_type=PromptType.query),
            task_metadata=task.metadata,
            hf_split="test",
            hf_subset="default",
        )
    both = datasets.Dataset.from_dict(
        {"id": ["x"], "audio": [{"array": [0.1] * 4000, "sampling_rate": 16000}], "image": [Image.new("RGB", (8, 8))]}
    )
    loader = torch.utils.data.DataLoader(both, batch_size=1, collate_fn=lambda rows: rows)
    with pytest.raises(mm.MtebModelError, match="gives audio, image"):
        model.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default")


def test_unknown_registry_task_and_a_changed_wav_are_named(setup, mm, tmp_path, capsys):
    eval_mteb = _load_script("eval_mteb")
    with pytest.raises(SystemExit):
        eval_mteb.main(["--checkpoint", setup["checkpoint"], "--tasks", "SpokenCOCOA2IRetrievl"])
    assert "SpokenCOCOA2IRetrievl not in mteb" in capsys.readouterr().err
    # a wav cut short since preparation: the manifest line is named
    manifest = setup["manifest"]
    data = tmp_path / "manifests"
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for rel in manifest.audio_paths:
        shutil.copy(os.path.join(manifest.audio_root, rel), wavs / rel)
    sf.write(str(wavs / manifest.audio_paths[3]), np.zeros(100, np.float32), 16000)
    write_manifest(
        str(data),
        "test",
        SpeechImageManifest(
            audio_root=str(wavs),
            audio_paths=manifest.audio_paths,
            num_samples=manifest.num_samples,
            image_root=manifest.image_root,
            image_paths=manifest.image_paths,
        ),
    )
    with pytest.raises(ManifestError, match=r"test\.tsv:5: .* has 100 samples, the manifest says"):
        mm.manifest_task(str(data), "test", "a2i").load_data()
    with pytest.raises(mm.MtebModelError, match="no manifest split 'valid'"):
        mm.manifest_task(str(data), "valid", "a2i")
