"""The minimal-pairs test set (cmd_demo/minimal_pairs.py, CLI examples/generate_minimal_pairs.py)
and its scorer (cmd_demo/minimal_pairs_scoring.py, CLI examples/score_minimal_pairs.py): variants
differ from their base in exactly one described attribute and never repeat a training scene; the
layout is Flickr 8k's; the scoring arithmetic; the CLI end to end on a tiny checkpoint; a
coarse-to-fine checkpoint also scored by its re-ranking score (SIM + w * SIC); bad input named.

The generator runs the real espeak-ng and sox (the tests fail, not skip, without them)."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_search import make_checkpoint

from cmd_demo import minimal_pairs as mp
from cmd_demo import minimal_pairs_scoring as score
from cmd_demo import scene_corpus as gen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
NUM_BASES, CAPTIONS, IMAGE_SIZE = 4, 2, 64
ATTRIBUTES = ["colour", "shape", "count", "size", "position", "background"]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mp_cli = _load("generate_minimal_pairs")
score_cli = _load("score_minimal_pairs")
flickr = _load("prepare_flickr8k")


def _require_tools():
    missing = [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed; run `apt-get install -y espeak-ng sox`")


def _key(record):
    return (
        record["background"],
        tuple(sorted((o["position"], o["shape"], o["colour"], o["size"], o["count"]) for o in record["objects"])),
    )


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A real (tiny) training corpus to draw the set beside."""
    _require_tools()
    out = tmp_path_factory.mktemp("mp_corpus") / "corpus"
    gen.generate_corpus(
        str(out),
        seed=5,
        num_train=12,
        num_valid=2,
        num_test=2,
        captions_per_image=2,
        image_size=IMAGE_SIZE,
        num_speakers=8,
        num_workers=2,
    )
    return out


@pytest.fixture(scope="module")
def pairs(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("mp_set") / "pairs"
    record = mp.generate_minimal_pairs(
        str(out),
        exclude_scenes=[str(corpus / "scene_corpus.json")],
        seed=3,
        num_bases=NUM_BASES,
        captions_per_base=CAPTIONS,
        num_workers=2,
    )
    meta = json.loads((out / "minimal_pairs.json").read_text())
    return out, meta, record


# ---------------------------------------------------------------- the set


def test_every_variant_differs_from_its_base_in_exactly_the_one_attribute_recorded(pairs):
    _, meta, _ = pairs
    scenes = meta["scenes"]
    assert len(meta["groups"]) == NUM_BASES
    for group in meta["groups"]:
        base = scenes[group["base"]]
        assert base["role"] == "base"
        assert [v["attribute"] for v in group["variants"]] == ATTRIBUTES  # one per attribute
        for v in group["variants"]:
            var = scenes[v["stem"]]
            assert var["role"] == "variant" and var["pattern"] == base["pattern"]
            diffs = (
                [("background", None, base["background"], var["background"])]
                if var["background"] != base["background"]
                else []
            )
            assert len(var["objects"]) == len(base["objects"])
            for ob, ov in zip(base["objects"], var["objects"]):
                diffs += [
                    (a, ob["position"], ob[a], ov[a])
                    for a in ("colour", "shape", "count", "size", "position")
                    if ob[a] != ov[a]
                ]
            assert diffs == [(v["attribute"], v["object"], v["from"], v["to"])], (group["base"], v, diffs)
    assert meta["counts"]["variants_per_attribute"] == {a: NUM_BASES for a in ATTRIBUTES}


def test_changes_keep_the_generators_rules(pairs):
    _, meta, _ = pairs
    for group in meta["groups"]:
        base = meta["scenes"][group["base"]]
        for v in group["variants"]:
            var = meta["scenes"][v["stem"]]
            bg = gen.BACKGROUNDS[var["background"]][0]
            for o in var["objects"]:  # colour and background changes keep the contrast rule
                assert gen.colour_distance(gen.COLOURS[o["colour"]][0], bg) >= gen.MIN_COLOUR_CONTRAST, (v, o)
            if v["attribute"] == "count":
                assert abs(v["to"] - v["from"]) == 1 and {v["from"], v["to"]} <= {1, 2, 3}
            if v["attribute"] == "size":
                assert {v["from"], v["to"]} == {"small", "big"}
            if v["attribute"] == "position":  # to a position no other group holds
                assert v["to"] not in {o["position"] for o in base["objects"]}
                assert len({o["position"] for o in var["objects"]}) == len(var["objects"])


def test_no_scene_repeats_a_scene_of_the_excluded_corpus_or_of_the_set(corpus, pairs):
    _, meta, _ = pairs
    excluded = {_key(s) for s in json.loads((corpus / "scene_corpus.json").read_text())["scenes"].values()}
    keys = [_key(s) for s in meta["scenes"].values()]
    assert len(keys) == NUM_BASES * (1 + len(ATTRIBUTES)) == len(set(keys))
    assert not set(keys) & excluded
    assert meta["excluded"][0]["path"] == str(corpus / "scene_corpus.json")
    assert meta["excluded"][0]["scenes"] == 16


def test_exclusion_bites_when_the_draws_hit_excluded_scenes():
    # the same seed replays the same draws, so excluding what a first plan drew makes the second
    # plan meet excluded scenes: its bases when the first plan's bases are excluded, its variants
    # (of the same first base) when the first plan's variants are
    images, groups, _ = mp.plan_minimal_pairs(9, 6, 2, excluded_keys=set())
    again, _, _ = mp.plan_minimal_pairs(9, 6, 2, excluded_keys=set())
    assert [im.scene.key() for im in again] == [im.scene.key() for im in images]  # deterministic
    bases = {im.scene.key() for im in images if im.split == "test"}
    variants = {im.scene.key() for im in images if im.split == "variant"}
    assert len(bases) == 6 and len(variants) == 36

    second, groups2, info = mp.plan_minimal_pairs(
        9, 6, 2, excluded_keys=bases, excluded_stems={im.stem for im in images}
    )
    assert not {im.scene.key() for im in second} & bases
    assert not {im.stem for im in second} & {im.stem for im in images}
    assert info["rejected_base_draws"] >= 1

    third, groups3, info = mp.plan_minimal_pairs(9, 6, 2, excluded_keys=variants)
    assert third[0].scene.key() == images[0].scene.key()  # the same first base, other variants
    assert not {im.scene.key() for im in third} & variants
    for plan, plan_groups in ((second, groups2), (third, groups3)):  # still minimal pairs
        by_stem = {im.stem: im.scene for im in plan}
        for group in plan_groups:
            for v in group["variants"]:
                assert len(mp.differing_attributes(by_stem[group["base"]], by_stem[v["stem"]])) == 1


def test_every_base_caption_names_every_attribute_and_the_background(pairs):
    out, meta, _ = pairs
    tokens = dict(line.split("\t") for line in _lines(out / "Flickr8k_text" / "Flickr8k.token.txt"))
    assert len(tokens) == NUM_BASES * CAPTIONS
    for group in meta["groups"]:
        base = meta["scenes"][group["base"]]
        assert [f"{group['base']}_{n}.wav" for n in range(CAPTIONS)] == group["wavs"]
        for n in range(CAPTIONS):
            text = tokens[f"{group['base']}.jpg#{n}"].lower()
            assert group["captions"][n].lower() == text
            assert any(f"{w} background" in text for w in gen.BACKGROUNDS[base["background"]][1]), text
            for o in base["objects"]:
                assert any(w in text for w in gen.COLOURS[o["colour"]][1]), (text, o)
                assert any(w in text for w in gen.POSITIONS[o["position"]]), (text, o)
                assert any(w in text for w in gen.SIZES[o["size"]]), (text, o)
                nouns = [s if o["count"] == 1 else p for s, p in gen.SHAPES[o["shape"]]]
                assert any(re.search(rf"\b{w}\b", text) for w in nouns), (text, o)


def test_describe_scene_mentions_the_background_only_when_asked():
    import random

    scene = gen.sample_scene(random.Random(0))
    bg_words = gen.BACKGROUNDS[scene.background][1]
    always = gen.describe_scene(random.Random(1), scene, 30, mention_background=True)
    sometimes = gen.describe_scene(random.Random(1), scene, 30)
    assert all(any(f"{w} background" in c for w in bg_words) for c in always)
    assert not all(any(f"{w} background" in c for w in bg_words) for c in sometimes)


def test_the_voices_are_the_sets_own(corpus, pairs):
    out, meta, _ = pairs
    train = {line.split()[1] for line in _lines(corpus / "flickr_audio" / "wav2spk.txt")}
    mine = {line.split()[1] for line in _lines(out / "flickr_audio" / "wav2spk.txt")}
    assert mine <= set(meta["speakers"]) and len(meta["speakers"]) == 8
    assert not mine & train
    # 96 voice/variant pairs, the corpus uses at most 8: all of the set's are unused ones
    assert not {mp.voice_of(s) for s in meta["speakers"]} & {mp.voice_of(s) for s in train}
    assert meta["speakers_with_unseen_voice"] == 8
    # rates and image size follow the excluded corpus
    assert meta["image_size"] == IMAGE_SIZE
    corpus_meta = json.loads((corpus / "scene_corpus.json").read_text())
    assert meta["speech_rates"] == corpus_meta["speech_rates"]


def test_layout_is_flickr8k_and_prepare_flickr8k_reads_its_test_split(pairs, tmp_path):
    out, meta, record = pairs
    assert sorted(os.listdir(out)) == ["Flicker8k_Dataset", "Flickr8k_text", "flickr_audio", "minimal_pairs.json"]
    assert os.listdir(out.parent) == ["pairs"]  # written beside, then renamed: nothing left over
    text = out / "Flickr8k_text"
    assert _lines(text / "Flickr_8k.trainImages.txt") == [] == _lines(text / "Flickr_8k.devImages.txt")
    assert _lines(text / "Flickr_8k.testImages.txt") == [f"{g['base']}.jpg" for g in meta["groups"]]
    assert len(os.listdir(out / "Flicker8k_Dataset")) == NUM_BASES * (1 + len(ATTRIBUTES))
    with pytest.raises(flickr.ManifestError, match=r"trainImages\.txt: split list is empty"):
        flickr.build_splits(str(out / "flickr_audio"), str(out), str(text), show_progress=False)
    manifests = tmp_path / "manifests"
    assert (
        flickr.main(
            [
                "--audio-dir",
                str(out / "flickr_audio"),
                "--image-dir",
                str(out),
                "--text-dir",
                str(text),
                "--out-dir",
                str(manifests),
                "--splits",
                "test",
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(os.listdir(manifests)) == ["test.img", "test.spk", "test.tsv", "test.wrd"]
    root, *images = _lines(manifests / "test.img")
    assert root == str(out / "Flicker8k_Dataset") and len(images) == NUM_BASES * CAPTIONS
    assert set(images) == {f"{g['base']}.jpg" for g in meta["groups"]}  # the variants are in no split
    assert record["counts"]["utterances"] == NUM_BASES * CAPTIONS


def test_cli_refuses_to_run_without_an_exclusion_and_names_a_broken_scene_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mp_cli.parse_args(["--out-dir", str(tmp_path / "p")])
    assert exit_info.value.code == 2 and "--exclude-scenes" in capsys.readouterr().err
    broken = tmp_path / "scene_corpus.json"
    broken.write_text('{"scenes": {"1_a": {"background": "grey"')
    assert mp_cli.main(["--out-dir", str(tmp_path / "p"), "--exclude-scenes", str(broken)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "JSON" in err
    broken.write_text('{"scenes": {"1_a": {"background": "grey"}}}')
    assert mp_cli.main(["--out-dir", str(tmp_path / "p"), "--exclude-scenes", str(broken)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "scenes['1_a']" in err and "objects" in err
    assert mp_cli.main(["--out-dir", str(tmp_path / "p"), "--exclude-scenes", str(tmp_path / "none.json")]) == 2
    assert "none.json: scene file to exclude not found" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------- the arithmetic


def test_score_groups_counts_wins_ties_and_in_group_r1():
    groups = [
        # captions x (base, colour variant, shape variant)
        {"attributes": ["colour", "shape"], "similarities": [[0.9, 0.1, 0.2], [0.5, 0.6, 0.4]]},
        # a tie (0.3 == 0.3) is not a win
        {"attributes": ["colour", "shape"], "similarities": [[0.3, 0.3, 0.1]]},
    ]
    r = score.score_groups(groups)
    assert list(r["attributes"]) == ["colour", "shape"]
    assert r["attributes"]["colour"] == {"accuracy": pytest.approx(100 / 3), "wins": 1, "ties": 1, "pairs": 3}
    assert r["attributes"]["shape"] == {"accuracy": 100.0, "wins": 3, "ties": 0, "pairs": 3}
    assert r["mean_accuracy"] == pytest.approx((100 / 3 + 100) / 2)
    assert r["all_pairs_accuracy"] == pytest.approx(400 / 6)
    # R@1 in the group: only caption 1 of group 1 has the base strictly above both variants
    assert r["group_r1"] == pytest.approx(100 / 3)
    assert r["group_r1_chance"] == pytest.approx(100 / 3)
    assert r["counts"] == {"groups": 2, "utterances": 3, "pairs": 6, "variants": 4}


def test_score_groups_all_right_all_wrong_and_chance():
    right = {"attributes": ["size"] * 6, "similarities": np.array([[1.0] + [0.0] * 6] * 3)}
    wrong = {"attributes": ["size"] * 6, "similarities": np.array([[0.0] + [1.0] * 6] * 3)}
    assert score.score_groups([right])["mean_accuracy"] == 100.0 == score.score_groups([right])["group_r1"]
    assert score.score_groups([wrong])["mean_accuracy"] == 0.0 == score.score_groups([wrong])["group_r1"]
    assert score.score_groups([right])["group_r1_chance"] == pytest.approx(100 / 7)
    # macro mean: each attribute weighs the same however many pairs it has
    few = {"attributes": ["count"], "similarities": [[0.0, 1.0]]}
    r = score.score_groups([right, few], attributes=["size", "count", "position"])
    assert list(r["attributes"]) == ["size", "count", "position"]
    assert r["attributes"]["position"] == {"accuracy": None, "wins": 0, "ties": 0, "pairs": 0}
    assert r["mean_accuracy"] == 50.0 and r["all_pairs_accuracy"] == pytest.approx(100 * 18 / 19)
    assert r["group_r1_chance"] == pytest.approx(100 * (3 / 7 + 1 / 2) / 4)


def test_reranked_scores_are_the_match_logit_plus_w_cosine_and_can_disagree_with_the_cosine():
    from cmd_plugin.retrieval.rerank import sic_weight

    # captions x (base, colour variant, shape variant); dyadic values, so the sums are exact
    cosine = [[0.5, 0.75, 0.25], [0.5, 0.25, 0.25]]
    match = [[2.0, 0.0, 3.0], [0.0, 1.0, -2.0]]
    groups = [{"base": "b", "attributes": ["colour", "shape"], "similarities": cosine, "match": match}]
    by_cosine = score.score_groups(groups)
    assert [by_cosine["attributes"][a]["accuracy"] for a in ("colour", "shape")] == [50.0, 100.0]
    assert by_cosine["group_r1"] == 50.0  # caption 2 has the base above both variants

    w = sic_weight("sim+sic_logit", 4.0)  # 1/τ = 4
    reranked = score.reranked_groups(groups, w)
    assert reranked[0]["similarities"].tolist() == [[4.0, 3.0, 4.0], [2.0, 2.0, -1.0]]
    assert reranked[0]["match"].tolist() == match and reranked[0]["base"] == "b"
    r = score.score_groups(reranked)
    # caption 1: colour now won, shape tied (a loss); caption 2: colour tied, shape won
    assert r["attributes"]["colour"] == {"accuracy": 50.0, "wins": 1, "ties": 1, "pairs": 2}
    assert r["attributes"]["shape"] == {"accuracy": 50.0, "wins": 1, "ties": 1, "pairs": 2}
    assert r["mean_accuracy"] == 50.0 and r["group_r1"] == 0.0  # the cosine's 75 % and 50 %
    # "sim" (w = 0): the match logit alone
    alone = score.score_groups(score.reranked_groups(groups, sic_weight("sim")))
    assert [alone["attributes"][a]["wins"] for a in ("colour", "shape")] == [1, 1]
    assert alone["attributes"]["colour"]["ties"] == 0 == alone["attributes"]["shape"]["ties"]
    with pytest.raises(score.MinimalPairsError, match="match logits of shape"):
        score.reranked_groups([{**groups[0], "match": [[1.0, 2.0]]}], 1.0)

    # the table prints the re-ranked column beside the cosine's, with the score it used
    record = {
        **by_cosine,
        "reranked": {"score": "sim+sic_logit", "checkpoint_score": "sim+sic_logit", "sic_weight": w, **r},
    }
    table = score.format_table(record)
    assert re.search(r"^  attribute +pairs +accuracy +re-ranked$", table, re.M), table
    assert re.search(r"^  colour +2 +50\.0 % +50\.0 %  \(1 re-ranked ties\)$", table, re.M), table
    assert re.search(r"^  shape +2 +100\.0 % +50\.0 %  \(1 re-ranked ties\)$", table, re.M), table
    assert re.search(r"^  mean +4 +75\.0 % +50\.0 %$", table, re.M), table
    assert "(chance 33.3 %), re-ranked 0.0 %" in table
    assert "sim+sic_logit (match logit + 4 x cosine, the checkpoint's)" in table
    assert "re-ranked" not in score.format_table({**by_cosine, "reranked": None})


def test_score_groups_refuses_mismatched_or_nonfinite_similarities():
    with pytest.raises(score.MinimalPairsError, match="1 base \\+ 2 variants"):
        score.score_groups([{"attributes": ["colour", "shape"], "similarities": [[0.1, 0.2]]}])
    with pytest.raises(score.MinimalPairsError, match="NaN"):
        score.score_groups([{"attributes": ["colour"], "similarities": [[0.1, float("nan")]]}])


# ---------------------------------------------------------------- with a model


@pytest.fixture(scope="module")
def checkpoint(tiny_encoders, tmp_path_factory):
    path, _ = make_checkpoint(str(tmp_path_factory.mktemp("mp_ck") / "checkpoint_best.pt"), tiny_encoders)
    return path


def test_cli_end_to_end_on_a_tiny_checkpoint(pairs, checkpoint, tmp_path):
    from cmd_plugin.inference import SpeechImageEncoder

    out, meta, _ = pairs
    result_json = tmp_path / "score.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(EXAMPLES, "score_minimal_pairs.py"),
            "--checkpoint",
            checkpoint,
            "--pairs-dir",
            str(out),
            "--output-json",
            str(result_json),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(result_json.read_text())
    assert record["format"] == score.RECORD_FORMAT
    assert record["checkpoint"] == os.path.abspath(checkpoint) and record["pairs_dir"] == str(out)
    assert record["excluded"] == [m["path"] for m in meta["excluded"]]
    assert list(record["attributes"]) == ATTRIBUTES
    for attribute, s in record["attributes"].items():
        assert s["pairs"] == NUM_BASES * CAPTIONS
        assert 0 <= s["wins"] + s["ties"] <= s["pairs"]
        assert s["accuracy"] == pytest.approx(100 * s["wins"] / s["pairs"])
    assert 0 <= record["mean_accuracy"] <= 100 and 0 <= record["group_r1"] <= 100
    assert record["group_r1_chance"] == pytest.approx(100 / 7) and record["pairwise_chance"] == 50.0
    assert record["counts"] == {
        "groups": NUM_BASES,
        "utterances": NUM_BASES * CAPTIONS,
        "pairs": NUM_BASES * CAPTIONS * 6,
        "variants": NUM_BASES * 6,
    }
    for line in ["Minimal pairs: 4 scenes x 6 variants, 8 spoken captions", "R@1 of the right image in its group"]:
        assert line in proc.stdout, proc.stdout
    for attribute in ATTRIBUTES + ["mean"]:
        assert re.search(rf"^  {attribute} +\d+ +\d+\.\d %", proc.stdout, re.M), proc.stdout

    # the function gives the same record, and its similarities are those of the right files: the
    # last group's first caption against its base and its background variant, embedded one by one
    encoder = SpeechImageEncoder.from_checkpoint(checkpoint)
    again = score.score_minimal_pairs(None, str(out), encoder=encoder)
    assert again["attributes"] == record["attributes"] and again["group_r1"] == record["group_r1"]
    group, scored = meta["groups"][-1], again["groups"][-1]
    assert scored["base"] == group["base"] and scored["attributes"] == ATTRIBUTES
    speech = encoder.embed_audio([str(out / "flickr_audio" / "wavs" / group["wavs"][0])])
    images = encoder.embed_images(
        [str(out / "Flicker8k_Dataset" / f"{s}.jpg") for s in (group["base"], group["variants"][-1]["stem"])]
    )
    expected = (speech @ images.T)[0].tolist()
    assert scored["similarities"][0][0] == pytest.approx(expected[0], abs=1e-5)
    assert scored["similarities"][0][-1] == pytest.approx(expected[1], abs=1e-5)


def test_written_caption_reference_scores_the_frozen_clips_own_text_tower(pairs, checkpoint, tmp_path):
    """--written-captions: the bases' written captions through the checkpoint's frozen CLIP text
    tower against the same image embeddings (the image encoder's own ceiling), printed beside."""
    import open_clip
    import torch

    from cmd_plugin.inference import SpeechImageEncoder

    out, meta, _ = pairs
    result_json = tmp_path / "score.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(EXAMPLES, "score_minimal_pairs.py"),
            "--checkpoint",
            checkpoint,
            "--pairs-dir",
            str(out),
            "--output-json",
            str(result_json),
            "--written-captions",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    ref = json.loads(result_json.read_text())["written_captions"]
    assert list(ref["attributes"]) == ATTRIBUTES and ref["counts"]["utterances"] == NUM_BASES * CAPTIONS
    assert "written captions, CLIP alone" in proc.stdout
    assert re.search(rf"^  mean +\d+ +\d+\.\d % +{ref['mean_accuracy']:.1f} %", proc.stdout, re.M), proc.stdout
    # one pair by hand: the first group's first written caption, base vs its colour variant
    encoder = SpeechImageEncoder.from_checkpoint(checkpoint)
    cfg = encoder.model.cfg
    clip = open_clip.create_model(cfg.image_model, pretrained=cfg.image_pretrained).eval()
    group = meta["groups"][0]
    with torch.inference_mode():
        text = torch.nn.functional.normalize(
            clip.encode_text(open_clip.get_tokenizer(cfg.image_model)(group["captions"][:1])), dim=-1
        )
    images = encoder.embed_images(
        [str(out / "Flicker8k_Dataset" / f"{s}.jpg") for s in (group["base"], group["variants"][0]["stem"])]
    )
    sims = (text @ images.T)[0].tolist()
    assert ref["groups"][0]["base"] == group["base"]
    assert ref["groups"][0]["similarities"][0][0] == pytest.approx(sims[0], abs=1e-5)
    assert ref["groups"][0]["similarities"][0][1] == pytest.approx(sims[1], abs=1e-5)


def test_bad_sets_are_refused_before_the_model_loads_naming_the_file(pairs, tmp_path, capsys):
    out, _, _ = pairs
    no_model = str(tmp_path / "no_checkpoint.pt")  # never reached: the set is checked first

    def run(pairs_dir):
        with pytest.raises(SystemExit) as exit_info:
            score_cli.main(["--checkpoint", no_model, "--pairs-dir", str(pairs_dir)])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert f"{tmp_path / 'missing'}: minimal-pairs set not found" in run(tmp_path / "missing")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "minimal_pairs.json").unlink()
    assert f"{bad / 'minimal_pairs.json'}: not found" in run(bad)
    (bad / "minimal_pairs.json").write_text('{"groups": [\n  {"base": "x",\n')
    assert f"{bad / 'minimal_pairs.json'}:3:1: not valid JSON" in run(bad)
    meta = json.loads((out / "minimal_pairs.json").read_text())
    del meta["groups"][1]["wavs"]
    (bad / "minimal_pairs.json").write_text(json.dumps(meta))
    err = run(bad)
    assert f"{bad / 'minimal_pairs.json'}: groups[1]" in err and "'wavs'" in err
    meta = json.loads((out / "minimal_pairs.json").read_text())
    (bad / "minimal_pairs.json").write_text(json.dumps(meta))
    missing_jpg = bad / "Flicker8k_Dataset" / f"{meta['groups'][2]['variants'][3]['stem']}.jpg"
    missing_jpg.unlink()
    assert f"{missing_jpg}: not found (named by {bad / 'minimal_pairs.json'}: groups[2]" in run(bad)
    # with a good set, a missing checkpoint is named
    assert f"checkpoint not found: {no_model}" in run(out)


# ---------------------------------------------------------------- re-ranked by a matching head


@pytest.fixture(scope="module")
def c2f_checkpoint(tiny_encoders, tmp_path_factory):
    """A coarse-to-fine checkpoint (a matching head), tuned with "sim+sic"."""
    from test_search_service import HEAD

    path, _ = make_checkpoint(
        str(tmp_path_factory.mktemp("mp_c2f") / "checkpoint_best.pt"),
        tiny_encoders,
        seed=1,
        task={"valid_rerank_score": "sim+sic"},
        **HEAD,
    )
    return path


def _by_hand(encoder, wav, images):
    """One caption against images, from the model's own methods: (match logits averaged over the
    caption's windows, cosines of its S_cls with the images' I_cls), and its number of windows."""
    import torch
    from PIL import Image

    from cmd_plugin.modules.multimodal import image_tokens

    model = encoder.model
    windows = encoder.windows(encoder.load_audio(wav), wav)
    with torch.no_grad():
        cls, patches = model.encode_image(
            torch.stack([encoder.transform(Image.open(p).convert("RGB")) for p in images])
        )
        tokens = image_tokens(cls, patches)
        logits, speech = [], []
        for window in windows:
            out = model.encode_speech_sequence(window[None])
            logits.append(model.match_logits(out["speech_seq"].expand(len(images), -1, -1), None, tokens)[:, 1])
            speech.append(out["speech"][0])
        s_cls = torch.nn.functional.normalize(torch.stack(speech).mean(0), dim=-1)
        cosines = torch.nn.functional.normalize(cls, dim=-1) @ s_cls
    return torch.stack(logits).mean(0).tolist(), cosines.tolist(), len(windows)


def test_a_coarse_to_fine_checkpoint_is_also_scored_by_its_reranking_score(pairs, c2f_checkpoint, tmp_path, capsys):
    from cmd_plugin.inference import SpeechImageEncoder

    out, meta, _ = pairs
    encoder = SpeechImageEncoder.from_checkpoint(c2f_checkpoint, keep_matching=True)
    record = score.score_minimal_pairs(None, str(out), encoder=encoder)
    rr = record["reranked"]
    # the checkpoint's own score: sim+sic, w = 1
    assert rr["score"] == rr["checkpoint_score"] == "sim+sic" and rr["sic_weight"] == 1.0
    assert rr["logit_scale"] == pytest.approx(encoder.model.logit_scale.exp().item())
    assert rr["counts"] == record["counts"] and list(rr["attributes"]) == ATTRIBUTES
    for s in rr["attributes"].values():
        assert s["pairs"] == NUM_BASES * CAPTIONS and s["accuracy"] == pytest.approx(100 * s["wins"] / s["pairs"])
    assert [g["base"] for g in rr["groups"]] == [g["base"] for g in meta["groups"]]
    for g, cos in zip(rr["groups"], record["groups"]):
        assert np.shape(g["match"]) == np.shape(g["similarities"]) == np.shape(cos["similarities"]) == (CAPTIONS, 7)
        assert np.allclose(g["similarities"], np.add(g["match"], cos["similarities"]), atol=2e-6)

    # one caption by hand: the last group's last caption against its base and every variant
    group = meta["groups"][-1]
    images = [
        str(out / "Flicker8k_Dataset" / f"{s}.jpg") for s in [group["base"]] + [v["stem"] for v in group["variants"]]
    ]
    match, cosines, num_windows = _by_hand(encoder, str(out / "flickr_audio" / "wavs" / group["wavs"][-1]), images)
    assert num_windows > 1  # the caption is longer than the tiny model's 2.5 s: the mean over windows
    assert rr["groups"][-1]["match"][-1] == pytest.approx(match, abs=1e-5)
    assert record["groups"][-1]["similarities"][-1] == pytest.approx(cosines, abs=1e-5)
    assert rr["groups"][-1]["similarities"][-1] == pytest.approx(np.add(match, cosines), abs=1e-5)

    # the CLI: another score asked for, or none; the cosine figures stay the same
    result_json = tmp_path / "score.json"
    argv = ["--checkpoint", c2f_checkpoint, "--pairs-dir", str(out), "--output-json", str(result_json)]
    assert score_cli.main(argv + ["--rerank-score", "sim"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^  mean +\d+ +\d+\.\d % +\d+\.\d %$", table, re.M) and "score sim (match logit + 0 x" in table
    by_sim = json.loads(result_json.read_text())
    assert by_sim["reranked"]["score"] == "sim" and by_sim["reranked"]["checkpoint_score"] == "sim+sic"
    assert by_sim["reranked"]["sic_weight"] == 0.0
    assert by_sim["reranked"]["groups"][-1]["similarities"] == by_sim["reranked"]["groups"][-1]["match"]
    assert by_sim["reranked"]["groups"][-1]["match"][-1] == pytest.approx(match, abs=1e-5)
    assert score_cli.main(argv + ["--no-rerank"]) == 0
    assert "re-ranked" not in capsys.readouterr().out
    plain = json.loads(result_json.read_text())
    assert plain["reranked"] is None
    for key in ("attributes", "mean_accuracy", "group_r1", "groups"):
        assert plain[key] == record[key] == by_sim[key], key
    with pytest.raises(SystemExit) as exit_info:
        score_cli.main(argv + ["--no-rerank", "--rerank-score", "sim"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_checkpoint_without_a_matching_head_is_scored_by_the_cosine_alone(pairs, checkpoint, c2f_checkpoint, capsys):
    from cmd_plugin.inference import SpeechImageEncoder

    out, _, _ = pairs
    encoder = SpeechImageEncoder.from_checkpoint(checkpoint, keep_matching=True)
    assert score.score_minimal_pairs(None, str(out), encoder=encoder)["reranked"] is None
    with pytest.raises(score.MinimalPairsError, match=r"has no matching head .*score by the cosine alone"):
        score.score_minimal_pairs(None, str(out), encoder=encoder, rerank=True)
    with pytest.raises(SystemExit) as exit_info:
        score_cli.main(["--checkpoint", checkpoint, "--pairs-dir", str(out), "--rerank-score", "sim+sic"])
    assert exit_info.value.code == 2 and "has no matching head" in capsys.readouterr().err
    # a coarse-to-fine checkpoint loaded without its head: nothing to re-rank with, said so when asked
    without = SpeechImageEncoder.from_checkpoint(c2f_checkpoint)
    assert score.score_minimal_pairs(None, str(out), encoder=without)["reranked"] is None
    with pytest.raises(score.MinimalPairsError, match="loaded without its matching head"):
        score.score_minimal_pairs(None, str(out), encoder=without, rerank_score="sim")
    with pytest.raises(score.MinimalPairsError, match="one of"):  # refused before anything loads
        score.score_minimal_pairs("never_loaded.pt", str(out), rerank_score="logit")
