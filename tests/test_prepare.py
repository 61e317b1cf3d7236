"""Preparation scripts on tiny corpora laid out exactly like the real archives."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from PIL import Image

from cmd_plugin.data import corpus_utils
from cmd_plugin.data.manifest import ManifestError, read_manifest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train", "valid", "test")


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flickr = _load_script("prepare_flickr8k")
coco = _load_script("prepare_spokencoco")


def _wav(path, samples, rate=16000, channels=1):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = np.zeros((samples, channels), dtype=np.float32) if channels > 1 else np.zeros(samples, np.float32)
    soundfile.write(path, data, rate, subtype="PCM_16")


def _jpg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), (120, 30, 200)).save(path)


def _snapshot(out_dir):
    if not os.path.isdir(out_dir):
        return None
    result = {}
    for name in sorted(os.listdir(out_dir)):
        with open(os.path.join(out_dir, name), "rb") as f:
            result[name] = f.read()
    return result


# ---------------------------------------------------------------- Flickr 8k Audio Caption Corpus

FLICKR_SPLITS = {  # split -> image stems (the real ids look like this)
    "train": ["1000268201_693b08cb0e", "1001773457_577c3a7d70", "1002674143_1b742ab4b8"],
    "valid": ["2090545563_a4e66ec76b"],
    "test": ["3385593926_d3e9c21170", "2677656448_6b7e7702af"],
}
FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "valid": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
UNLISTED_IMAGE = "9999999999_0000000000"  # a jpg in the folder but in no split (8091 vs 8000)
BOGUS_KEY = "2258277193_586949ec62.jpg.1"


def _flickr_samples(stem, n):
    return 800 + 160 * n + 16 * (sum(map(ord, stem)) % 50)


def make_flickr(root):
    audio, images, text = (os.path.join(root, d) for d in ("flickr_audio", "Flicker8k_Dataset", "Flickr8k_text"))
    capt, spk, token = [], [], []
    for split, stems in FLICKR_SPLITS.items():
        for stem in stems:
            _jpg(os.path.join(images, f"{stem}.jpg"))
            for n in range(5):
                wav = f"{stem}_{n}.wav"
                _wav(os.path.join(audio, "wavs", wav), _flickr_samples(stem, n))
                # exact spacing of the real file is unconfirmed: mix tabs and runs of spaces
                capt.append(f"{wav} {stem}.jpg #{n}" if n % 2 else f"{wav}\t{stem}.jpg   #{n}")
                spk.append(f"{wav} spk{len(spk) % 3}")
                token.append(f"{stem}.jpg#{n}\tcaption {n} of {stem} .")
        if split == "train":  # the real token file's known bad key, with no image behind it
            token.extend(f"{BOGUS_KEY}#{n}\tbogus caption {n}" for n in range(5))
    _jpg(os.path.join(images, f"{UNLISTED_IMAGE}.jpg"))
    os.makedirs(text, exist_ok=True)
    for path, lines in (
        (os.path.join(audio, "wav2capt.txt"), capt),
        (os.path.join(audio, "wav2spk.txt"), spk),
        (os.path.join(text, "Flickr8k.token.txt"), token),
        (os.path.join(text, "Flickr8k.lemma.token.txt"), token),
    ):
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
    for split, name in FLICKR_SPLIT_FILES.items():
        with open(os.path.join(text, name), "w") as f:
            f.write("".join(f"{stem}.jpg\n" for stem in FLICKR_SPLITS[split]))
    return {"audio": audio, "images": images, "text": text}


def run_flickr(corpus, out_dir, image_dir=None, extra=()):
    return flickr.main(
        [
            "--audio-dir",
            corpus["audio"],
            "--image-dir",
            image_dir or corpus["images"],
            "--text-dir",
            corpus["text"],
            "--out-dir",
            str(out_dir),
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture
def flickr_corpus(tmp_path):
    return make_flickr(str(tmp_path / "corpus"))


def test_flickr8k_splits_pair_each_wav_with_its_image_speaker_and_caption(flickr_corpus, tmp_path, capsys):
    out = tmp_path / "manifests"
    assert run_flickr(flickr_corpus, out) == 0
    printed = capsys.readouterr().out
    assert "skipped 5 caption key(s)" in printed and BOGUS_KEY in printed
    speakers = dict(line.split() for line in open(os.path.join(flickr_corpus["audio"], "wav2spk.txt")))
    for split, stems in FLICKR_SPLITS.items():
        m = read_manifest(str(out), split)
        assert m.audio_root == os.path.join(os.path.abspath(flickr_corpus["audio"]), "wavs")
        assert m.image_root == os.path.abspath(flickr_corpus["images"])
        assert os.path.isabs(m.audio_root) and os.path.isabs(m.image_root)
        assert len(m) == 5 * len(stems)
        assert m.unique_images == [f"{s}.jpg" for s in stems]
        for wav, image, size, speaker, text in zip(m.audio_paths, m.image_paths, m.num_samples, m.speakers, m.texts):
            stem, n = wav[: -len(".wav")].rsplit("_", 1)
            assert image == f"{stem}.jpg"
            assert size == _flickr_samples(stem, int(n))
            assert speaker == speakers[wav]
            assert text == f"caption {n} of {stem} ."
            assert os.path.isfile(m.audio_path(m.audio_paths.index(wav)))
    assert sorted(os.listdir(out)) == sorted(f"{s}.{e}" for s in SPLITS for e in ("tsv", "img", "spk", "wrd"))
    rows = {line.split()[0]: line.split()[1:3] for line in printed.splitlines() if line.split()[0] in SPLITS}
    assert rows == {"train": ["3", "15"], "valid": ["1", "5"], "test": ["2", "10"]}


@pytest.mark.parametrize("layout", ["Flickr8k_Dataset", "Images", "parent"])
def test_flickr8k_accepts_image_folder_variants(flickr_corpus, tmp_path, layout):
    parent = os.path.dirname(flickr_corpus["images"])
    name = "Images" if layout == "parent" else layout
    renamed = os.path.join(parent, name)
    os.rename(flickr_corpus["images"], renamed)
    assert run_flickr(flickr_corpus, tmp_path / "m", image_dir=parent if layout == "parent" else renamed) == 0
    assert read_manifest(str(tmp_path / "m"), "test").image_root == renamed


def _rewrite(path, edit):
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in edit(lines)))


def _flickr_missing_wav(c):
    os.remove(os.path.join(c["audio"], "wavs", "3385593926_d3e9c21170_2.wav"))
    return ["wav2capt.txt:23", "3385593926_d3e9c21170_2.wav", "missing"]


def _flickr_missing_image(c):
    os.remove(os.path.join(c["images"], "2090545563_a4e66ec76b.jpg"))
    return ["wav2capt.txt:16", "2090545563_a4e66ec76b.jpg", "missing"]


def _flickr_image_in_no_split(c):
    _wav(os.path.join(c["audio"], "wavs", f"{UNLISTED_IMAGE}_0.wav"), 1600)
    _rewrite(
        os.path.join(c["audio"], "wav2capt.txt"), lambda ls: ls + [f"{UNLISTED_IMAGE}_0.wav {UNLISTED_IMAGE}.jpg #0"]
    )
    return ["wav2capt.txt:31", f"{UNLISTED_IMAGE}.jpg", "none of the split lists"]


def _flickr_8khz(c):
    _wav(os.path.join(c["audio"], "wavs", "1001773457_577c3a7d70_4.wav"), 800, rate=8000)
    return ["wav2capt.txt:10", "1001773457_577c3a7d70_4.wav", "8000 Hz"]


def _flickr_stereo(c):
    _wav(os.path.join(c["audio"], "wavs", "2677656448_6b7e7702af_0.wav"), 800, channels=2)
    return ["wav2capt.txt:26", "2677656448_6b7e7702af_0.wav", "2 channels"]


def _flickr_duplicate_wav(c):
    _rewrite(os.path.join(c["audio"], "wav2capt.txt"), lambda ls: ls + [ls[3]])
    return ["wav2capt.txt:31", "duplicate wav", "1000268201_693b08cb0e_3.wav", "wav2capt.txt:4"]


def _flickr_duplicate_image(c):
    _rewrite(os.path.join(c["text"], "Flickr_8k.testImages.txt"), lambda ls: ls + ["1001773457_577c3a7d70.jpg"])
    return ["Flickr_8k.testImages.txt:3", "duplicate image", "Flickr_8k.trainImages.txt:2"]


def _truncated_jpg(path):
    """A real JPEG of noise cut in the middle of its entropy-coded data (a broken download)."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _flickr_truncated_image(c):
    _truncated_jpg(os.path.join(c["images"], "2677656448_6b7e7702af.jpg"))
    return [
        "Flickr_8k.testImages.txt:2",
        "split 'test'",
        "2677656448_6b7e7702af.jpg",
        "cannot be decoded",
        "truncated",
        "wav2capt.txt:26",
    ]


def _flickr_not_an_image(c):
    with open(os.path.join(c["images"], "1001773457_577c3a7d70.jpg"), "w") as f:
        f.write("<html>403 Forbidden</html>")
    return ["Flickr_8k.trainImages.txt:2", "1001773457_577c3a7d70.jpg", "cannot be decoded", "UnidentifiedImageError"]


def _flickr_empty_split(c):
    _rewrite(os.path.join(c["text"], "Flickr_8k.devImages.txt"), lambda ls: [])
    return ["Flickr_8k.devImages.txt", "empty"]


FLICKR_BAD = [
    _flickr_missing_wav,
    _flickr_missing_image,
    _flickr_image_in_no_split,
    _flickr_8khz,
    _flickr_stereo,
    _flickr_duplicate_wav,
    _flickr_duplicate_image,
    _flickr_empty_split,
    _flickr_truncated_image,
    _flickr_not_an_image,
]


@pytest.mark.parametrize("corrupt", FLICKR_BAD, ids=lambda f: f.__name__[len("_flickr_") :])
def test_flickr8k_bad_input_names_the_file_and_writes_nothing(flickr_corpus, tmp_path, capsys, corrupt):
    previous = tmp_path / "previous"
    assert run_flickr(flickr_corpus, previous) == 0
    before = _snapshot(previous)
    expected = corrupt(flickr_corpus)
    capsys.readouterr()
    fresh = tmp_path / "fresh"
    assert run_flickr(flickr_corpus, fresh) == 1
    assert run_flickr(flickr_corpus, previous) == 1
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, (text, err)
    assert not fresh.exists()
    assert _snapshot(previous) == before


# ---------------------------------------------------------------- SpokenCOCO

COCO_IMAGES = {  # cocoid -> (folder, Karpathy split)
    1: ("train2014", "train"),
    2: ("train2014", "train"),
    3: ("train2014", "restval"),
    4: ("train2014", "train"),
    5: ("val2014", "restval"),
    6: ("val2014", "val"),
    7: ("val2014", "test"),
    8: ("val2014", "test"),
}
COCO_EXPECTED = {"train": [1, 2, 3, 4, 5], "valid": [6], "test": [7, 8]}
CAPTIONS_PER_IMAGE = 2


def _coco_image(cocoid):
    folder = COCO_IMAGES[cocoid][0]
    return f"{folder}/COCO_{folder}_{cocoid:012d}.jpg"


def _coco_samples(cocoid, n):
    return 1000 + 100 * cocoid + 10 * n


def make_spokencoco(root):
    sc, images = os.path.join(root, "SpokenCOCO"), os.path.join(root, "COCO2014")
    master = {"train": [], "val": []}
    for cocoid, (folder, _) in COCO_IMAGES.items():
        _jpg(os.path.join(images, _coco_image(cocoid)))
        part = folder[: -len("2014")]
        captions = []
        for n in range(CAPTIONS_PER_IMAGE):
            speaker = f"m{cocoid}spk{n}"
            uttid = f"{speaker}-3LUY3GC63Z0R9PYEETJGN5HO4UEP7B_{cocoid}_{600000 + 10 * cocoid + n}"
            wav = f"wavs/{part}/{cocoid % 2}/{uttid}.wav"
            _wav(os.path.join(sc, wav), _coco_samples(cocoid, n))
            captions.append({"text": f"A CAPTION {n} OF {cocoid}", "speaker": speaker, "uttid": uttid, "wav": wav})
        master[part].append({"image": _coco_image(cocoid), "captions": captions, "parse_tree": "(S)"})
    for part, records in master.items():
        with open(os.path.join(sc, f"SpokenCOCO_{part}.json"), "w") as f:
            json.dump({"data": records}, f)
    karpathy = {
        "images": [
            {
                "filepath": folder,
                "filename": os.path.basename(_coco_image(cocoid)),
                "imgid": i,
                "split": split,
                "sentences": [{"raw": "a caption", "tokens": ["a", "caption"]}],
                "cocoid": cocoid,
            }
            for i, (cocoid, (folder, split)) in enumerate(COCO_IMAGES.items())
        ],
        "dataset": "coco",
    }
    with open(os.path.join(root, "dataset_coco.json"), "w") as f:
        json.dump(karpathy, f)
    return {"sc": sc, "images": images, "karpathy": os.path.join(root, "dataset_coco.json"), "master": master}


def write_split_files(corpus, directory, naming, unrolled):
    os.makedirs(directory, exist_ok=True)
    records = {r["image"]: r for part in corpus["master"].values() for r in part}
    for split, ids in COCO_EXPECTED.items():
        data = [records[_coco_image(i)] for i in ids]
        if unrolled:
            data = [{"image": r["image"], "caption": c} for r in data for c in r["captions"]]
        name = naming.format({"valid": "val"}.get(split, split))
        with open(os.path.join(directory, name), "w") as f:
            json.dump({"data": data}, f)


def run_coco(corpus, out_dir, split_dir=None, extra=()):
    split = ["--karpathy-split-dir", split_dir] if split_dir else ["--karpathy-split", corpus["karpathy"]]
    return coco.main(
        [
            "--spokencoco-dir",
            corpus["sc"],
            "--coco-image-root",
            corpus["images"],
            *split,
            "--out-dir",
            str(out_dir),
            "--no-progress",
            "--workers",
            "2",
            *extra,
        ]
    )


@pytest.fixture
def coco_corpus(tmp_path):
    return make_spokencoco(str(tmp_path / "corpus"))


def _check_coco_manifests(corpus, out):
    for split, ids in COCO_EXPECTED.items():
        m = read_manifest(str(out), split)
        assert m.audio_root == os.path.abspath(corpus["sc"]) and m.image_root == os.path.abspath(corpus["images"])
        assert m.unique_images == [_coco_image(i) for i in ids]
        assert len(m) == CAPTIONS_PER_IMAGE * len(ids)
        for i, (wav, image, size, speaker, text) in enumerate(
            zip(m.audio_paths, m.image_paths, m.num_samples, m.speakers, m.texts)
        ):
            uttid = os.path.basename(wav)[: -len(".wav")]
            cocoid, n = int(uttid.split("_")[1]), int(uttid[-1])
            assert image == _coco_image(cocoid)
            assert size == _coco_samples(cocoid, n)
            assert speaker == uttid.split("-")[0] == f"m{cocoid}spk{n}"
            assert text == f"A CAPTION {n} OF {cocoid}"
            assert os.path.isfile(m.audio_path(i)) and os.path.isfile(m.image_path(image))


def test_spokencoco_karpathy_json_puts_restval_in_train(coco_corpus, tmp_path, capsys):
    assert run_coco(coco_corpus, tmp_path / "m") == 0
    _check_coco_manifests(coco_corpus, tmp_path / "m")
    summary = capsys.readouterr().out.splitlines()
    assert summary[1].split()[:3] == ["train", "5", "10"] and summary[3].split()[:3] == ["test", "2", "4"]


@pytest.mark.parametrize(
    "naming,unrolled", [("SpokenCOCO_ksplit_{}.json", False), ("SpokenCOCO_{}_karpathy.json", True)]
)
def test_spokencoco_split_files_give_the_same_splits(coco_corpus, tmp_path, naming, unrolled):
    split_dir = str(tmp_path / "splits")
    write_split_files(coco_corpus, split_dir, naming, unrolled)
    assert run_coco(coco_corpus, tmp_path / "m", split_dir=split_dir) == 0
    _check_coco_manifests(coco_corpus, tmp_path / "m")


def test_spokencoco_reads_unrolled_master_files(coco_corpus, tmp_path):
    assert run_coco(coco_corpus, tmp_path / "rolled") == 0
    for part, records in coco_corpus["master"].items():
        unrolled = [{"image": r["image"], "caption": c} for r in records for c in r["captions"]]
        with open(os.path.join(coco_corpus["sc"], f"SpokenCOCO_{part}.json"), "w") as f:
            json.dump({"data": unrolled}, f)
    assert run_coco(coco_corpus, tmp_path / "unrolled") == 0
    assert _snapshot(tmp_path / "rolled") == _snapshot(tmp_path / "unrolled")


def _edit_json(path, edit):
    with open(path) as f:
        content = json.load(f)
    edit(content)
    with open(path, "w") as f:
        json.dump(content, f)


def _utt_wav(c, cocoid, n):
    return os.path.join(c["sc"], c["master"][COCO_IMAGES[cocoid][0][:-4]][(cocoid - 1) % 4]["captions"][n]["wav"])


def _coco_missing_wav(c):
    os.remove(_utt_wav(c, 7, 1))
    return ["SpokenCOCO_val.json: data[2].captions[1]", os.path.basename(_utt_wav(c, 7, 1)), "missing"]


def _coco_missing_image(c):
    os.remove(os.path.join(c["images"], _coco_image(3)))
    return ["SpokenCOCO_train.json: data[2]", _coco_image(3), "missing"]


def _coco_image_in_no_split(c):
    _edit_json(c["karpathy"], lambda k: k["images"].pop(5))  # cocoid 6
    return ["SpokenCOCO_val.json: data[1].captions[0]", _coco_image(6), "no split of", "dataset_coco.json"]


def _coco_truncated_image(c):
    _truncated_jpg(os.path.join(c["images"], _coco_image(8)))
    return [
        "SpokenCOCO_val.json: data[3]",
        "dataset_coco.json: images[7]",
        "split 'test'",
        _coco_image(8),
        "cannot be decoded",
        "truncated",
    ]


def _coco_8khz(c):
    _wav(_utt_wav(c, 2, 0), 500, rate=8000)
    return ["SpokenCOCO_train.json: data[1].captions[0]", "8000 Hz"]


def _coco_stereo(c):
    _wav(_utt_wav(c, 8, 0), 500, channels=2)
    return ["SpokenCOCO_val.json: data[3].captions[0]", "2 channels"]


def _coco_duplicate_wav(c):
    _edit_json(
        os.path.join(c["sc"], "SpokenCOCO_val.json"),
        lambda d: d["data"][3]["captions"].append(d["data"][0]["captions"][1]),
    )
    return ["SpokenCOCO_val.json: data[3].captions[2]", "duplicate wav", "SpokenCOCO_val.json: data[0].captions[1]"]


def _coco_duplicate_image(c):
    _edit_json(c["karpathy"], lambda k: k["images"].append(dict(k["images"][0], split="test")))
    return ["dataset_coco.json: images[8]", "duplicate image", "dataset_coco.json: images[0]"]


def _coco_empty_split(c):
    _edit_json(os.path.join(c["sc"], "SpokenCOCO_val.json"), lambda d: d.update(data=d["data"][:2]))
    return ["dataset_coco.json", "split 'test' has no utterance"]


COCO_BAD = [
    _coco_missing_wav,
    _coco_missing_image,
    _coco_image_in_no_split,
    _coco_8khz,
    _coco_stereo,
    _coco_duplicate_wav,
    _coco_duplicate_image,
    _coco_empty_split,
    _coco_truncated_image,
]


@pytest.mark.parametrize("corrupt", COCO_BAD, ids=lambda f: f.__name__[len("_coco_") :])
def test_spokencoco_bad_input_names_the_file_and_writes_nothing(coco_corpus, tmp_path, capsys, corrupt):
    previous = tmp_path / "previous"
    assert run_coco(coco_corpus, previous) == 0
    before = _snapshot(previous)
    expected = corrupt(coco_corpus)
    capsys.readouterr()
    fresh = tmp_path / "fresh"
    assert run_coco(coco_corpus, fresh) == 1
    assert run_coco(coco_corpus, previous) == 1
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, (text, err)
    assert not fresh.exists()
    assert _snapshot(previous) == before


def test_spokencoco_split_file_listing_an_image_twice_is_rejected(coco_corpus, tmp_path, capsys):
    split_dir = str(tmp_path / "splits")
    write_split_files(coco_corpus, split_dir, "SpokenCOCO_ksplit_{}.json", unrolled=False)
    _edit_json(os.path.join(split_dir, "SpokenCOCO_ksplit_test.json"), lambda d: d["data"].append(d["data"][0]))
    assert run_coco(coco_corpus, tmp_path / "m", split_dir=split_dir) == 1
    err = capsys.readouterr().err
    assert "SpokenCOCO_ksplit_test.json: data[2]" in err and "duplicate image" in err
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- shared helpers and CLI


def test_write_splits_failing_on_a_later_split_keeps_previous_output(flickr_corpus, tmp_path, monkeypatch):
    out = str(tmp_path / "m")
    splits = flickr.build_splits(
        flickr_corpus["audio"], flickr_corpus["images"], flickr_corpus["text"], show_progress=False, log=lambda *a: None
    )
    corpus_utils.write_splits(out, splits)
    before = _snapshot(out)
    real = corpus_utils.write_manifest

    def failing(data_dir, split, manifest):
        if split == "test":
            raise OSError("disk full")
        real(data_dir, split, manifest.__class__(**{**manifest.__dict__, "speakers": ["x"] * len(manifest)}))

    monkeypatch.setattr(corpus_utils, "write_manifest", failing)
    with pytest.raises(OSError):
        corpus_utils.write_splits(out, splits)
    assert _snapshot(out) == before  # train/valid were staged, never moved in
    with pytest.raises(ManifestError, match="'valid'.*empty"):
        corpus_utils.write_splits(
            out,
            {
                "train": splits["train"],
                "valid": splits["valid"].__class__(
                    audio_root="a", audio_paths=[], num_samples=[], image_root="b", image_paths=[]
                ),
            },
        )
    assert _snapshot(out) == before


# Both scripts in one interpreter: importing the package can be slow (fairseq), so pay it once.
_RUN_BOTH = """
import json, runpy, sys
for script, args in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code:
            raise
"""


def test_scripts_run_from_another_directory_with_relative_paths(flickr_corpus, coco_corpus, tmp_path):
    rel = lambda path: os.path.relpath(path, tmp_path)  # noqa: E731
    flickr_args = [
        "--audio-dir",
        rel(flickr_corpus["audio"]),
        "--image-dir",
        "corpus",
        "--text-dir",
        rel(flickr_corpus["text"]),
        "--out-dir",
        "out/flickr8k",
    ]
    coco_args = [
        "--spokencoco-dir",
        rel(coco_corpus["sc"]),
        "--coco-image-root",
        rel(coco_corpus["images"]),
        "--karpathy-split",
        rel(coco_corpus["karpathy"]),
        "--out-dir",
        "out/spokencoco",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _RUN_BOTH,
            json.dumps(
                [
                    (os.path.join(REPO_ROOT, "examples", "prepare_flickr8k.py"), flickr_args),
                    (os.path.join(REPO_ROOT, "examples", "prepare_spokencoco.py"), coco_args),
                ]
            ),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("utterances") == 2 and result.stdout.count("hours") == 2
    for corpus in ("flickr8k", "spokencoco"):
        m = read_manifest(str(tmp_path / "out" / corpus), "valid")
        assert os.path.isabs(m.audio_root) and os.path.isabs(m.image_root)
        assert os.path.isfile(m.audio_path(0)) and os.path.isfile(m.image_path(m.image_paths[0]))


def test_write_manifest_failing_mid_file_leaves_no_temporary(tmp_path):
    from cmd_plugin.data.manifest import SpeechImageManifest, write_manifest

    bad = SpeechImageManifest(
        audio_root="/a",
        audio_paths=["x.wav"],
        num_samples=[16000],
        image_root="/i",
        image_paths=["x.jpg"],
        speakers=[None],
    )  # not a string: fails while writing .spk
    with pytest.raises(TypeError):
        write_manifest(str(tmp_path), "train", bad)
    assert os.listdir(tmp_path) == []


def test_no_check_images_skips_decoding_but_not_the_existence_check(flickr_corpus, coco_corpus, tmp_path, capsys):
    _flickr_truncated_image(flickr_corpus)
    _coco_truncated_image(coco_corpus)
    assert run_flickr(flickr_corpus, tmp_path / "f", extra=["--no-check-images"]) == 0
    assert run_coco(coco_corpus, tmp_path / "c", extra=["--no-check-images"]) == 0
    assert (
        len(read_manifest(str(tmp_path / "f"), "test")) == 10 and len(read_manifest(str(tmp_path / "c"), "test")) == 4
    )
    os.remove(os.path.join(flickr_corpus["images"], "2090545563_a4e66ec76b.jpg"))
    capsys.readouterr()
    assert run_flickr(flickr_corpus, tmp_path / "f2", extra=["--no-check-images"]) == 1
    assert "2090545563_a4e66ec76b.jpg is missing" in capsys.readouterr().err


def test_image_check_reports_the_first_bad_image_in_split_order_with_threads(tmp_path):
    """Threads finish in any order; the error is always the first bad item of the list."""
    items = []
    for i in range(600):  # more than two chunks of 256
        path = str(tmp_path / f"{i}.jpg")
        _jpg(path)
        items.append((path, f"list.txt:{i + 1}"))
    for i in (300, 590):
        _truncated_jpg(items[i][0])
    corpus_utils.check_images(items[:300], workers=4, show_progress=False)
    with pytest.raises(ManifestError, match=r"^list\.txt:301: image .*300\.jpg cannot be decoded"):
        corpus_utils.check_images(items, workers=4, show_progress=False)
