"""Search beyond speech -> images: re-ranking with the matching head (query --rerank-k), the index of
spoken clips (index-audio) searched by images, bad spoken queries, the service the web app calls
(thread-safe), and the results page's paired image and file names (checked in headless Chromium)."""

import json
import os
import shutil
import subprocess
import threading

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from test_search import _chromium, _image, make_checkpoint, search_cli

from cmd_plugin.search.index import SearchIndexError, load_index
from cmd_plugin.search.page import short_name

CAPTIONS = [
    "two red circles on the left",
    "a blue square above a green triangle",
    "one yellow star",
    "three small squares in a row",
]
HEAD = dict(multimodal_layers=1, multimodal_heads=4, multimodal_ffn_dim=128, multimodal_dropout=0.0)


def speak(text, path):
    """A spoken caption (espeak-ng, 22.05 kHz mono wav)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; run `apt-get install -y espeak-ng` (scripts/install.sh does)")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return str(path)


@pytest.fixture(scope="module")
def env(tiny_encoders, tmp_path_factory):
    from cmd_plugin.inference import SpeechImageEncoder

    root = tmp_path_factory.mktemp("search_service")
    # a coarse-to-fine checkpoint (matching head; valid_rerank_k 12 is the app's default K) and a CMD one
    checkpoint, model = make_checkpoint(
        str(root / "c2f" / "checkpoint_best.pt"),
        tiny_encoders,
        task={"valid_rerank_k": 12, "valid_rerank_score": "sim+sic"},
        **HEAD,
    )
    plain, _ = make_checkpoint(str(root / "cmd" / "checkpoint_best.pt"), tiny_encoders, seed=3)
    photos = root / "photos"
    (photos / "trip").mkdir(parents=True)
    for i in range(8):
        _image(photos / ("trip" if i % 2 else "") / f"img{i}.png", seed=i)
    long_name = "a3c9f0e1b2d4c5a6f7e8d9c0b1a2e77b581f.jpg"
    _image(photos / "trip" / long_name, seed=99)
    clips = root / "clips"
    (clips / "more").mkdir(parents=True)
    for i, text in enumerate(CAPTIONS):
        speak(text, clips / ("more" if i % 2 else "") / f"caption{i}.wav")
    image_index = root / "photos.pt"
    audio_index = root / "clips.pt"
    for command in (
        ["index", "--images", str(photos), "--out", str(image_index)],
        ["index-audio", "--audio", str(clips), "--out", str(audio_index)],
    ):
        assert search_cli.main(command + ["--checkpoint", checkpoint, "--no-progress"]) == 0
    encoder = SpeechImageEncoder.from_checkpoint(checkpoint, keep_matching=True)
    return {
        "root": root,
        "checkpoint": checkpoint,
        "plain": plain,
        "model": model,
        "photos": photos,
        "clips": clips,
        "image_index": str(image_index),
        "audio_index": str(audio_index),
        "encoder": encoder,
        "long_name": f"trip/{long_name}",
    }


def _query_json(capsys, *argv):
    assert search_cli.main(["query", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _error(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        search_cli.main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def _match_logits(model, wave, image_paths, transform):
    """The matching head's logit of one clip against images, computed here from the model."""
    from PIL import Image

    from cmd_plugin.modules.multimodal import image_tokens

    with torch.no_grad():
        out = model.encode_speech_sequence(wave[None])
        pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in image_paths])
        cls, patches = model.encode_image(pixels)
        tokens = image_tokens(cls, patches)
        seq = out["speech_seq"].expand(len(image_paths), -1, -1)
        return model.match_logits(seq, None, tokens)[:, 1]


# ---------------------------------------------------------------- re-ranking


def test_rerank_order_puts_the_rescored_top_k_first_and_keeps_the_rest_in_sic_order():
    from cmd_plugin.search.service import rerank_order

    cos = [0.9, 0.8, 0.7, 0.6, 0.5]
    match = [1.0, 3.0, None, 3.0, None]
    assert rerank_order(cos, match, 4, "sim") == [(1, 3.0), (3, 3.0), (0, 1.0), (2, 0.7), (4, 0.5)]
    order = rerank_order(cos, match, 4, "sim+sic")
    assert [p for p, _ in order] == [1, 3, 0, 2, 4] and order[0][1] == pytest.approx(3.8)
    assert rerank_order(cos, [None] * 5, 2, "sim") == [(i, c) for i, c in enumerate(cos)]
    # the SIC logit (cosine / τ) outweighs the head's preference for position 3 over position 0
    order = rerank_order(cos, match, 4, "sim+sic_logit", logit_scale=10.0)
    assert [p for p, _ in order] == [1, 0, 3, 2, 4] and order[1][1] == pytest.approx(1.0 + 9.0)
    with pytest.raises(ValueError, match="one of"):
        rerank_order(cos, match, 2, "logit")


def test_query_rerank_k_rescores_the_top_k_with_the_matching_head(env, capsys):
    enc, model = env["encoder"], env["model"]
    clip = str(env["clips"] / "caption0.wav")
    base = _query_json(capsys, "--index", env["image_index"], "--checkpoint", env["checkpoint"], clip, "--top-k", "9")
    assert base["rerank"] is None and all(not r["reranked"] for r in base["queries"][0]["results"])
    sic = base["queries"][0]["results"]
    k = 5
    for score in ("sim", "sim+sic"):
        record = _query_json(
            capsys,
            "--index",
            env["image_index"],
            "--checkpoint",
            env["checkpoint"],
            clip,
            "--top-k",
            "9",
            "--rerank-k",
            str(k),
            "--rerank-score",
            score,
        )
        assert record["rerank"] == {"k": k, "score": score, "scored": k}
        results = record["queries"][0]["results"]
        # the SIC top 5 re-ordered by the head's logit, computed here from the model
        top = [r["absolute_path"] for r in sic[:k]]
        logits = _match_logits(model, enc.load_audio(clip), top, enc.transform)
        expected = logits + (torch.tensor([r["cosine"] for r in sic[:k]]) if score == "sim+sic" else 0)
        order = expected.argsort(descending=True, stable=True).tolist()
        assert [r["absolute_path"] for r in results[:k]] == [top[i] for i in order]
        assert np.allclose([r["score"] for r in results[:k]], expected[order].numpy(), atol=1e-4)
        assert np.allclose([r["match"] for r in results[:k]], logits[order].numpy(), atol=1e-4)
        assert all(r["reranked"] for r in results[:k]) and [r["rank"] for r in results] == list(range(1, 10))
        # past K: the SIC order and cosines, untouched
        assert results[k:] == sic[k:]
        assert record["timing_seconds"]["rerank"] > 0
    # the default score is the checkpoint's task.valid_rerank_score (sim+sic here)
    record = _query_json(
        capsys, "--index", env["image_index"], "--checkpoint", env["checkpoint"], clip, "--rerank-k", "3"
    )
    assert record["rerank"]["score"] == "sim+sic"
    # K larger than the collection re-ranks all of it; text output names the re-ranking
    assert (
        search_cli.main(
            [
                "query",
                "--index",
                env["image_index"],
                "--checkpoint",
                env["checkpoint"],
                clip,
                "--top-k",
                "3",
                "--rerank-k",
                "50",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "re-ranking top 9 (sim+sic)" in text and "(match " in text


def test_query_rerank_refuses_a_checkpoint_without_matching_head(env, capsys, tmp_path):
    index = tmp_path / "plain.pt"
    assert (
        search_cli.main(
            [
                "index",
                "--checkpoint",
                env["plain"],
                "--images",
                str(env["photos"]),
                "--out",
                str(index),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    err = _error(
        capsys,
        "query",
        "--index",
        str(index),
        "--checkpoint",
        env["plain"],
        str(env["clips"] / "caption0.wav"),
        "--rerank-k",
        "5",
    )
    assert f"{env['plain']} has no matching head" in err and "coarse-to-fine checkpoint" in err
    err = _error(
        capsys,
        "query",
        "--index",
        env["image_index"],
        "--checkpoint",
        env["checkpoint"],
        str(env["clips"] / "caption0.wav"),
        "--rerank-k",
        "-1",
    )
    assert "--rerank-k >= 0" in err


# ---------------------------------------------------------------- image -> speech


def test_index_audio_is_incremental_skips_unreadable_clips_and_answers_image_queries(env, tmp_path, capsys):
    enc = env["encoder"]
    clips = tmp_path / "clips"
    shutil.copytree(env["clips"], clips)
    (clips / "notes.txt").write_text("not audio")
    (clips / "broken.wav").write_bytes(b"RIFF....not a wav")
    sf.write(str(clips / "blip.flac"), np.full(800, 0.1, np.float32), 16000)  # 0.05 s: under the minimum
    out = tmp_path / "idx" / "clips.pt"
    assert (
        search_cli.main(
            [
                "index-audio",
                "--checkpoint",
                env["checkpoint"],
                "--audio",
                str(clips),
                "--out",
                str(out),
                "--no-progress",
                "--batch-size",
                "3",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert f"skipped: {clips / 'broken.wav'}: cannot read audio" in captured.err
    assert f"skipped: {clips / 'blip.flac'}: 0.050 s of audio, shorter than the model's minimum" in captured.err
    assert f"indexed 4 spoken clips in {out}: 4 embedded" in captured.out and "2 unreadable" in captured.out
    index = load_index(str(out))
    assert index.modality == "audio" and len(index) == 4
    assert index.identity["speech_weights_sha256"] == enc.speech_identity["speech_weights_sha256"]
    reference = enc.embed_audio([index.absolute_path(r) for r in range(len(index))])
    assert torch.allclose(index.embeddings, reference, atol=1e-5)

    # image queries rank the clips by cosine with the image embedding
    images = [str(env["photos"] / "img0.png"), str(env["photos"] / "trip" / "img1.png")]
    record = _query_json(capsys, "--index", str(out), "--checkpoint", env["checkpoint"], *images, "--top-k", "3")
    assert record["modality"] == "audio" and record["num_clips"] == 4
    queries = enc.embed_images(images)
    for q, query in enumerate(record["queries"]):
        scores = queries[q] @ reference.T
        top = scores.argsort(descending=True)[:3].tolist()
        assert query["image"] == images[q] and [r["path"] for r in query["results"]] == [index.paths[i] for i in top]
        assert np.allclose([r["score"] for r in query["results"]], scores[top].numpy(), atol=1e-4)
    # re-ranked by the head: the image's tokens against each clip's sequence
    record = _query_json(
        capsys,
        "--index",
        str(out),
        "--checkpoint",
        env["checkpoint"],
        images[0],
        "--top-k",
        "4",
        "--rerank-k",
        "4",
        "--rerank-score",
        "sim",
    )
    results = record["queries"][0]["results"]
    for r in results:
        logit = _match_logits(env["model"], enc.load_audio(r["absolute_path"]), [images[0]], enc.transform)[0]
        assert r["match"] == pytest.approx(float(logit), abs=1e-4)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    # an html page with one player per clip
    page = tmp_path / "clips.html"
    assert (
        search_cli.main(
            [
                "query",
                "--index",
                str(out),
                "--checkpoint",
                env["checkpoint"],
                images[0],
                "--top-k",
                "4",
                "--html",
                str(page),
            ]
        )
        == 0
    )
    html = page.read_text()
    assert html.count("<audio") == 4 and html.count('<img class="query-image"') == 1

    # incremental: one clip changed, one deleted, one added, the broken one fixed
    speak("a green circle", clips / "caption0.wav")
    os.utime(clips / "caption0.wav", ns=(10**18, 10**18))
    (clips / "more" / "caption1.wav").unlink()
    speak("four stars", clips / "new.wav")
    shutil.copy(clips / "caption2.wav", clips / "broken.wav")
    capsys.readouterr()
    assert (
        search_cli.main(
            [
                "index-audio",
                "--checkpoint",
                env["checkpoint"],
                "--audio",
                str(clips),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        f"indexed 5 spoken clips in {out}: 3 embedded, 2 unchanged, 1 removed, 1 unreadable" in capsys.readouterr().out
    )
    assert sorted(os.listdir(out.parent)) == ["clips.pt"]


def test_indexes_of_the_wrong_kind_or_model_are_refused(env, tmp_path, capsys):
    clip, image = str(env["clips"] / "caption0.wav"), str(env["photos"] / "img0.png")
    # an image index written over by index-audio (and the reverse) is left alone
    copy = tmp_path / "photos.pt"
    shutil.copy(env["image_index"], copy)
    good = copy.read_bytes()
    err = _error(
        capsys, "index-audio", "--checkpoint", env["checkpoint"], "--audio", str(env["clips"]), "--out", str(copy)
    )
    assert f"{copy}: an index of images, this command writes one of spoken clips" in err
    assert copy.read_bytes() == good
    # the clips' index belongs to one checkpoint's speech side: another checkpoint is refused
    err = _error(capsys, "query", "--index", env["audio_index"], "--checkpoint", env["plain"], image)
    assert "was built with another speech encoder than this checkpoint's" in err
    assert "speech encoder weights" in err and "examples/search.py index-audio" in err
    # queries of the wrong kind name the file
    err = _error(capsys, "query", "--index", env["audio_index"], "--checkpoint", env["checkpoint"], clip)
    assert f"{clip}: cannot read image" in err
    err = _error(capsys, "query", "--index", env["image_index"], "--checkpoint", env["checkpoint"], image)
    assert f"{image}: cannot read audio: this is a PNG image, not a sound file" in err
    err = _error(
        capsys,
        "query",
        "--index",
        env["audio_index"],
        "--checkpoint",
        env["checkpoint"],
        image,
        "--transcripts",
        str(tmp_path / "t.txt"),
    )
    assert "--transcripts describes spoken queries" in err


# ---------------------------------------------------------------- bad spoken queries


def test_bad_spoken_queries_give_one_line_and_a_nonzero_exit(env, tmp_path, capsys):
    ck, index = env["checkpoint"], env["image_index"]
    silent = tmp_path / "silence.wav"
    sf.write(str(silent), np.zeros(32000, np.float32), 16000)
    err = _error(capsys, "query", "--index", index, "--checkpoint", ck, str(silent))
    assert f"{silent}: the clip is silent (peak amplitude 0.0e+00, below 1e-03 = -60 dBFS)" in err
    short = tmp_path / "short.wav"
    sf.write(str(short), 0.3 * np.ones(800, np.float32), 16000)
    err = _error(capsys, "query", "--index", index, "--checkpoint", ck, str(short))
    assert f"{short}: 0.050 s of audio, shorter than the model's minimum 0.100 s" in err
    long = tmp_path / "long.wav"
    sf.write(str(long), 0.1 * np.random.default_rng(0).standard_normal(48000).astype(np.float32), 16000)
    err = _error(capsys, "query", "--index", index, "--checkpoint", ck, str(long), "--long-audio", "error")
    assert f"{long}: 3.0 s of audio, longer than the model's limit 2.5 s" in err
    text = tmp_path / "notes.mp3"
    text.write_text("not audio at all")
    err = _error(capsys, "query", "--index", index, "--checkpoint", ck, str(text))
    assert f"{text}: cannot read audio (expected a file libsndfile reads" in err


# ---------------------------------------------------------------- the service (what the app calls)


def test_service_answers_like_the_cli_with_timings_and_refuses_bad_input(env, capsys, tmp_path):
    from cmd_plugin.inference import InferenceError
    from cmd_plugin.search.service import SearchService

    enc = env["encoder"]
    image_index, audio_index = load_index(env["image_index"]), load_index(env["audio_index"])
    service = SearchService(enc, image_index=image_index, audio_index=audio_index, max_query_seconds=4.0)
    assert service.has_matching_head and service.default_rerank_k == 12 and service.default_rerank_score == "sim+sic"
    clip = str(env["clips"] / "caption0.wav")
    record = _query_json(
        capsys,
        "--index",
        env["image_index"],
        "--checkpoint",
        env["checkpoint"],
        clip,
        "--top-k",
        "5",
        "--rerank-k",
        "4",
    )
    answer = service.search_images(clip, top_k=5, rerank_k=4)
    assert [h.as_dict() for h in answer.hits] == [
        dict(
            r,
            score=pytest.approx(r["score"], abs=1e-5),
            cosine=pytest.approx(r["cosine"], abs=1e-5),
            match=pytest.approx(r["match"], abs=1e-4) if r["match"] is not None else None,
        )
        for r in record["queries"][0]["results"]
    ]
    assert set(answer.timings) == {"decode", "embed", "search", "rerank", "total"}
    assert answer.timings["total"] >= answer.timings["embed"] + answer.timings["rerank"] > 0
    assert answer.query_wave.numel() == enc.load_audio(clip).numel()
    # arrays with their rate (what a microphone gives)
    wav, rate = sf.read(clip, dtype="float32")
    again = service.search_images((wav, rate), top_k=5)
    assert [h.path for h in again.hits] == [h.path for h in service.search_images(clip, top_k=5).hits]
    clips = service.search_clips(str(env["photos"] / "img0.png"), top_k=2, rerank_k=3)
    assert len(clips.hits) == 2 and clips.rerank == {"k": 3, "score": "sim+sic", "scored": 3}

    long = tmp_path / "long.wav"
    sf.write(str(long), 0.1 * np.ones(16000 * 5, np.float32), 16000)
    with pytest.raises(InferenceError, match=r"long.wav: 5.0 s of audio, longer than this server's limit of 4 s"):
        service.search_images(str(long))
    with pytest.raises(InferenceError, match="the clip is silent"):
        service.search_images((np.zeros(16000, np.float32), 16000))
    with pytest.raises(SearchIndexError, match="must be a whole number >= 1"):
        service.search_images(clip, top_k=0)
    # indexes checked once, when the service is made
    with pytest.raises(SearchIndexError, match="an index of spoken clips, expected one of images"):
        SearchService(enc, image_index=audio_index)
    from cmd_plugin.inference import SpeechImageEncoder

    plain_enc = SpeechImageEncoder.from_checkpoint(env["plain"])
    plain = SearchService(plain_enc, image_index=image_index)
    with pytest.raises(SearchIndexError, match="has no matching head"):
        plain.search_images(clip, rerank_k=3)
    # without keep_matching the coarse-to-fine checkpoint loads without its SIM encoder and head
    embedding_only = SpeechImageEncoder.from_checkpoint(env["checkpoint"])
    assert embedding_only.model.multimodal is None and embedding_only.model.matching_head is None
    assert sum(p.numel() for p in embedding_only.model.parameters()) < sum(p.numel() for p in enc.model.parameters())
    assert torch.allclose(embedding_only.embed_audio([clip]), enc.embed_audio([clip]))
    service = SearchService(embedding_only, image_index=image_index)
    assert [h.path for h in service.search_images(clip, top_k=5).hits] == [h.path for h in again.hits]
    with pytest.raises(
        SearchIndexError, match=r"was loaded without its matching head: load it with keep_matching=True"
    ):
        service.search_images(clip, rerank_k=3)


def test_concurrent_requests_get_the_answers_they_would_get_alone(env):
    """Threads share one model (the web app's workers): each gets its own clip's embedding and
    ranking (the HuBERT upstream's layer hook once mixed up concurrent calls)."""
    from cmd_plugin.search.service import SearchService

    service = SearchService(env["encoder"], image_index=load_index(env["image_index"]))
    clips = [str(p) for p in sorted(env["clips"].rglob("*.wav"))]
    alone = {c: service.search_images(c, top_k=9, rerank_k=4) for c in clips}
    failures = []

    def worker(c):
        for _ in range(6):
            got = service.search_images(c, top_k=9, rerank_k=4)
            if [h.path for h in got.hits] != [h.path for h in alone[c].hits] or not np.allclose(
                [h.score for h in got.hits], [h.score for h in alone[c].hits], atol=1e-5
            ):
                failures.append(c)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clips]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures
    emb = env["encoder"].embed_audio(clips)
    out = [None] * len(clips)

    def embed(i):
        out[i] = env["encoder"].embed_audio([clips[i]])[0]

    threads = [threading.Thread(target=embed, args=(i,)) for i in range(len(clips))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(F.cosine_similarity(out[i], emb[i], dim=0) > 0.9999 for i in range(len(clips)))


# ---------------------------------------------------------------- the page: paired image, file names


_NAMES_PROBE = """<script>
window.addEventListener('load', function () {
  var out = Array.prototype.map.call(document.querySelectorAll('figcaption .name'), function (n) {
    return {text: n.textContent, lines: n.getClientRects().length, cut: n.scrollWidth > n.clientWidth,
            height: n.getBoundingClientRect().height}; });
  var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def test_page_marks_the_paired_image_and_never_breaks_a_file_name(env, tmp_path, capsys):
    clip0, clip1 = str(env["clips"] / "caption0.wav"), str(env["clips"] / "more" / "caption1.wav")
    transcripts = tmp_path / "said.txt"
    paired_abs = env["photos"] / env["long_name"]
    transcripts.write_text(f"{CAPTIONS[0]}\t{env['long_name']}\n{CAPTIONS[1]}\t{paired_abs}\n")
    page = tmp_path / "results.html"
    record = _query_json(
        capsys,
        "--index",
        env["image_index"],
        "--checkpoint",
        env["checkpoint"],
        clip0,
        clip1,
        "--top-k",
        "9",
        "--transcripts",
        str(transcripts),
        "--html",
        str(page),
    )
    for q in record["queries"]:
        assert q["paired_image"] == env["long_name"]  # an absolute path is made relative to the index root
        assert q["paired_rank"] == next(r["rank"] for r in q["results"] if r["path"] == env["long_name"])
    html = page.read_text()
    assert html.count('class="result paired"') == 2 and html.count('<span class="badge">paired</span>') == 2
    assert html.count(f"paired image {env['long_name']}: at rank") == 2
    shown = short_name(env["long_name"].split("/")[-1])
    assert f'<span class="name">{shown}</span>' in html and shown.endswith("581f.jpg") and "\u2026" in shown
    # not in the top k: said so
    (tmp_path / "one.txt").write_text("x\tnot/there.png\n")
    record = _query_json(
        capsys,
        "--index",
        env["image_index"],
        "--checkpoint",
        env["checkpoint"],
        clip0,
        "--top-k",
        "1",
        "--transcripts",
        str(tmp_path / "one.txt"),
    )
    assert record["queries"][0]["paired_rank"] is None
    bad = tmp_path / "bad.txt"
    bad.write_text("a\tb\tc\n")
    err = _error(
        capsys,
        "query",
        "--index",
        env["image_index"],
        "--checkpoint",
        env["checkpoint"],
        clip0,
        "--transcripts",
        str(bad),
    )
    assert f"{bad}:1: expected TRANSCRIPT or TRANSCRIPT<TAB>IMAGE_PATH" in err

    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", _NAMES_PROBE + "</body>"))
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'p'}",
            "--window-size=1200,1400",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert '<pre id="probe">' in proc.stdout, proc.stderr[-2000:]
    names = json.loads(proc.stdout.split('<pre id="probe">')[1].split("</pre>")[0])
    assert len(names) == 18
    heights = {round(n["height"]) for n in names}
    for n in names:  # one line each, nothing hidden by the card's width
        assert n["lines"] == 1 and not n["cut"], n
    assert len(heights) == 1
