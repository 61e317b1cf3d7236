"""The offline spoken-scene corpus must be a faithful miniature of the Flickr 8k Audio Caption Corpus.

These tests run the real generator (espeak-ng + sox). They fail, not skip, when those programs are
missing: install them with `apt-get install -y espeak-ng sox`.
"""

import filecmp
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import wave

import pytest

from cmd_demo import scene_corpus as gen

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "examples", "generate_scene_corpus.py")
SIZES = {"train": 6, "valid": 2, "test": 2}
IMAGE_SIZE = 96
CAPTIONS = 5
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "valid": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def _load_cli():
    spec = importlib.util.spec_from_file_location("generate_scene_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _require_tools():
    missing = [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed; run `apt-get install -y espeak-ng sox`")


def _generate(out_dir, seed, cwd, extra=(), env=None):
    cmd = [
        sys.executable,
        SCRIPT,
        "--out-dir",
        str(out_dir),
        "--seed",
        str(seed),
        "--num-train-images",
        str(SIZES["train"]),
        "--num-valid-images",
        str(SIZES["valid"]),
        "--num-test-images",
        str(SIZES["test"]),
        "--captions-per-image",
        str(CAPTIONS),
        "--image-size",
        str(IMAGE_SIZE),
        *extra,
    ]
    return subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=120)


def _read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    _require_tools()
    base = tmp_path_factory.mktemp("scenes")
    cwd = tmp_path_factory.mktemp("elsewhere")  # the script must not depend on the cwd
    out = base / "corpus"
    result = _generate(os.path.relpath(out, cwd), seed=7, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return out


def _split_stems(root):
    text = os.path.join(root, "Flickr8k_text")
    return {
        split: [line[: -len(".jpg")] for line in _read_lines(os.path.join(text, name))]
        for split, name in SPLIT_FILES.items()
    }


def test_layout_is_exactly_flickr8k(corpus):
    assert sorted(os.listdir(corpus)) == ["Flicker8k_Dataset", "Flickr8k_text", "flickr_audio", "scene_corpus.json"]
    assert sorted(os.listdir(corpus / "flickr_audio")) == ["wav2capt.txt", "wav2spk.txt", "wavs"]
    assert sorted(os.listdir(corpus / "Flickr8k_text")) == sorted(["Flickr8k.token.txt", *SPLIT_FILES.values()])
    stems = [s for split in _split_stems(corpus).values() for s in split]
    assert sorted(os.listdir(corpus / "Flicker8k_Dataset")) == sorted(f"{s}.jpg" for s in stems)
    assert sorted(os.listdir(corpus / "flickr_audio" / "wavs")) == sorted(
        f"{s}_{n}.wav" for s in stems for n in range(CAPTIONS)
    )
    # Nothing left behind next to the corpus by the write-then-rename.
    assert os.listdir(corpus.parent) == ["corpus"]


def test_image_stems_look_like_flickr_ids(corpus):
    for stem in (s for split in _split_stems(corpus).values() for s in split):
        assert re.fullmatch(r"[1-9][0-9]{7,9}_[0-9a-f]{10}", stem), stem


def test_splits_are_disjoint_and_cover_all_images(corpus):
    splits = _split_stems(corpus)
    assert {k: len(v) for k, v in splits.items()} == SIZES
    all_stems = [s for v in splits.values() for s in v]
    assert len(set(all_stems)) == len(all_stems)
    on_disk = {f[: -len(".jpg")] for f in os.listdir(corpus / "Flicker8k_Dataset")}
    assert set(all_stems) == on_disk


def test_wav2capt_lines_parse_as_wav_image_index(corpus):
    lines = _read_lines(corpus / "flickr_audio" / "wav2capt.txt")
    assert len(lines) == sum(SIZES.values()) * CAPTIONS
    for line in lines:
        wav, image, index = line.split()
        m = re.fullmatch(r"(.+)_([0-9])\.wav", wav)
        assert m, line
        assert image == f"{m.group(1)}.jpg" and index == f"#{m.group(2)}", line
        assert (corpus / "flickr_audio" / "wavs" / wav).is_file()
        assert (corpus / "Flicker8k_Dataset" / image).is_file()


def test_wav2spk_names_one_speaker_per_wav_and_distinct_speakers_per_image(corpus):
    lines = [line.split() for line in _read_lines(corpus / "flickr_audio" / "wav2spk.txt")]
    assert all(len(fields) == 2 for fields in lines)
    wavs = [w for w, _ in lines]
    assert sorted(wavs) == sorted(os.listdir(corpus / "flickr_audio" / "wavs"))
    by_image = {}
    for wav, speaker in lines:
        by_image.setdefault(wav.rsplit("_", 1)[0], []).append(speaker)
    for speakers in by_image.values():
        assert len(set(speakers)) == CAPTIONS
    assert len({s for _, s in lines}) >= 10


def test_wavs_are_16k_mono_pcm16_speech_length(corpus):
    wav_dir = corpus / "flickr_audio" / "wavs"
    for name in os.listdir(wav_dir):
        with wave.open(str(wav_dir / name), "rb") as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2), name
            assert w.getcomptype() == "NONE"
            assert 1.0 < w.getnframes() / 16000 < 20.0, name
            frames = w.readframes(w.getnframes())
        samples = memoryview(frames).cast("h")
        assert max(abs(x) for x in samples[::7]) > 1000, f"{name} is (nearly) silent"


def test_images_are_rgb_jpgs_of_the_requested_size(corpus):
    from PIL import Image

    for name in os.listdir(corpus / "Flicker8k_Dataset"):
        with Image.open(corpus / "Flicker8k_Dataset" / name) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (IMAGE_SIZE, IMAGE_SIZE))


def test_token_file_has_five_distinct_phrasings_per_image(corpus):
    lines = _read_lines(corpus / "Flickr8k_text" / "Flickr8k.token.txt")
    captions = {}
    for line in lines:
        key, text = line.split("\t")
        m = re.fullmatch(r"(.+\.jpg)#([0-9])", key)
        assert m, key
        captions.setdefault(m.group(1), {})[int(m.group(2))] = text
    stems = [s for split in _split_stems(corpus).values() for s in split]
    assert sorted(captions) == sorted(f"{s}.jpg" for s in stems)
    for image, texts in captions.items():
        assert sorted(texts) == list(range(CAPTIONS)), image
        assert len(set(texts.values())) == CAPTIONS, texts  # the brief asks >= 3; we guarantee all
        assert all(len(t.split()) >= 4 for t in texts.values()), texts


def test_scenes_are_unique_and_every_caption_names_every_object_colour(corpus):
    meta = json.loads((corpus / "scene_corpus.json").read_text())
    scenes = meta["scenes"]
    assert len(scenes) == sum(SIZES.values())
    keys = {(s["background"], tuple(sorted(tuple(sorted(o.items())) for o in s["objects"]))) for s in scenes.values()}
    assert len(keys) == len(scenes)
    for s in scenes.values():
        assert 1 <= len(s["objects"]) <= 3
    digests = {hashlib.md5((corpus / "Flicker8k_Dataset" / f"{stem}.jpg").read_bytes()).hexdigest() for stem in scenes}
    assert len(digests) == len(scenes)
    tokens = dict(line.split("\t") for line in _read_lines(corpus / "Flickr8k_text" / "Flickr8k.token.txt"))
    for stem, scene in scenes.items():
        for n in range(CAPTIONS):
            text = tokens[f"{stem}.jpg#{n}"].lower()
            for obj in scene["objects"]:
                assert any(w in text for w in gen.COLOURS[obj["colour"]][1]), (text, obj)
                assert any(w in text for w in gen.POSITIONS[obj["position"]]), (text, obj)


def test_same_seed_gives_the_same_corpus(corpus, tmp_path):
    again = tmp_path / "again"
    result = _generate(again, seed=7, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cmp = filecmp.dircmp(corpus, again)

    def assert_same(c):
        assert not c.left_only and not c.right_only, (c.left_only, c.right_only)
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors, (c.left, mismatch, errors)
        for sub in c.subdirs.values():
            assert_same(sub)

    assert_same(cmp)  # text files, jpg pixels and wav bytes alike


def test_different_seed_gives_a_different_corpus(corpus, tmp_path):
    other = tmp_path / "other"
    result = _generate(other, seed=8, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert _split_stems(other) != _split_stems(corpus)

    def captions(root):
        return {line.split("\t")[1] for line in _read_lines(root / "Flickr8k_text" / "Flickr8k.token.txt")}

    assert captions(other) != captions(corpus)


def test_missing_espeak_exits_with_install_instructions(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    out = tmp_path / "corpus"
    result = _generate(out, seed=1, cwd=tmp_path, env={**os.environ, "PATH": str(empty_bin)})
    assert result.returncode == 2
    assert "espeak-ng" in result.stderr and "apt-get install -y espeak-ng sox" in result.stderr
    assert not out.exists()


def test_refuses_to_overwrite_a_non_empty_out_dir_unless_asked(tmp_path):
    _require_tools()
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _generate(out, seed=1, cwd=tmp_path)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert os.listdir(out) == ["keep.txt"]
    result = _generate(out, seed=1, cwd=tmp_path, extra=["--overwrite"])
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "flickr_audio" / "wav2capt.txt").is_file()
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


def test_failed_run_leaves_no_corpus_behind(tmp_path):
    _require_tools()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    os.symlink(shutil.which("espeak-ng"), fake_bin / "espeak-ng")
    broken_sox = fake_bin / "sox"
    broken_sox.write_text("#!/bin/sh\necho 'sox: simulated failure' >&2\nexit 1\n")
    broken_sox.chmod(0o755)
    out = tmp_path / "corpus"
    result = _generate(out, seed=1, cwd=tmp_path, env={**os.environ, "PATH": str(fake_bin)})
    assert result.returncode != 0
    assert "simulated failure" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["bin"]  # neither corpus nor its .tmp-<pid> remains


def test_printed_summary_names_the_splits_train_valid_test(tmp_path, capsys):
    # the corpus's valid split is written to Flickr_8k.devImages.txt (the real corpus's name), but
    # everything the project prints calls it "valid"
    _require_tools()
    cli = _load_cli()
    assert (
        cli.main(
            [
                "--out-dir",
                str(tmp_path / "c"),
                "--num-train-images",
                "3",
                "--num-valid-images",
                "2",
                "--num-test-images",
                "1",
                "--captions-per-image",
                "1",
                "--image-size",
                "32",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "images: 3 train / 2 valid / 1 test" in out, out
    assert not re.search(r"\bdev\b", out), out
