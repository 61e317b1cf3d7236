"""Hard-negative captions for the tiny CLIP's pre-training (cmd_demo/negative_captions.py)."""

import random
from collections import Counter
from dataclasses import replace

import pytest

from cmd_demo import scene_corpus as gen
from cmd_demo.minimal_pairs import ATTRIBUTES, differing_attributes, variant_candidates
from cmd_demo.negative_captions import (
    NegativeCaptionError,
    caption_facts,
    caption_is_true_of,
    make_negatives,
    negative_caption,
    negative_scene,
    scene_from_record,
)


def _scenes(n, seed=0):
    rng = random.Random(seed)
    return [gen.sample_scene(rng) for _ in range(n)]


def test_every_corpus_phrasing_reads_back_as_its_scene():
    rng = random.Random(1)
    for scene in _scenes(300):
        for caption in gen.describe_scene(rng, scene, 6):
            background, groups = caption_facts(caption)
            assert groups == scene.key()[1], caption
            assert background in (None, scene.background), caption
            # Flickr8k.token.txt's written form (capitalised, " ." at the end) reads the same
            assert caption_facts(caption[0].upper() + caption[1:] + " .") == (background, groups)
        named = gen.describe_scene(rng, scene, 3, mention_background=True)
        assert all(caption_facts(c)[0] == scene.background for c in named)


def test_text_outside_the_phrasings_is_refused_with_the_caption_named():
    with pytest.raises(NegativeCaptionError, match=r"'a dog in the park'.*position"):
        caption_facts("a dog in the park")
    with pytest.raises(NegativeCaptionError, match="count and noun disagree"):
        caption_facts("two big red circle on the left")


def test_a_negative_changes_exactly_one_attribute_and_its_caption_is_false_of_the_scene():
    rng = random.Random(2)
    seen = Counter()
    for scene in _scenes(200, seed=3):
        for changed, change, caption in make_negatives(scene, rng, 3):
            seen[change["attribute"]] += 1
            diffs = differing_attributes(scene, changed)
            assert len(diffs) == 1 and diffs[0].startswith(change["attribute"]), (diffs, change)
            assert changed.key() != scene.key()
            assert caption_is_true_of(caption, changed), caption
            assert not caption_is_true_of(caption, scene), caption
            if change["attribute"] == "background":  # else the caption could still be true of the scene
                assert caption_facts(caption)[0] == changed.background
            # the corpus's rules: contrast with the background, one group per position
            bg = gen.BACKGROUNDS[changed.background][0]
            assert all(
                gen.colour_distance(gen.COLOURS[o.colour][0], bg) >= gen.MIN_COLOUR_CONTRAST for o in changed.objects
            )
            assert len({o.position for o in changed.objects}) == len(changed.objects)
    assert set(seen) == set(ATTRIBUTES)  # every attribute is changed at some point
    assert min(seen.values()) > 0.5 * max(seen.values())  # and roughly equally often


def test_avoided_scenes_and_attribute_choice_are_respected():
    scene = _scenes(1, seed=4)[0]
    candidates = variant_candidates(scene, "shape")
    keep = candidates[-1][0].key()
    avoid = {s.key() for s, _ in candidates if s.key() != keep}
    for seed in range(20):
        changed, change = negative_scene(scene, random.Random(seed), attributes=["shape"], avoid=avoid)
        assert changed.key() == keep and change["attribute"] == "shape"
    with pytest.raises(NegativeCaptionError, match="no attribute of"):
        negative_scene(scene, random.Random(0), attributes=["shape"], avoid=avoid | {keep})
    with pytest.raises(NegativeCaptionError, match="expected some of"):
        negative_scene(scene, random.Random(0), attributes=["texture"])


def test_a_caption_still_true_of_the_scene_is_refused():
    scene = _scenes(1, seed=5)[0]
    # a "change" that changes nothing: its description is true of the scene, so it is no negative
    with pytest.raises(NegativeCaptionError, match="not false of the scene"):
        negative_caption(scene, replace(scene, pattern_phase=0.5), {"attribute": "shape"}, random.Random(0))


def test_scene_records_are_read_and_bad_ones_name_where():
    scene = _scenes(1, seed=6)[0]
    record = gen.scene_record(scene)
    assert scene_from_record(record, "x").key() == scene.key()
    with pytest.raises(NegativeCaptionError, match=r"corpus.json: scenes\['s1'\].*objects"):
        scene_from_record({"background": "grey"}, "corpus.json: scenes['s1']")
    bad = dict(record, objects=[dict(record["objects"][0], shape="blob")])
    with pytest.raises(NegativeCaptionError, match="outside the generator's vocabulary"):
        scene_from_record(bad, "corpus.json: scenes['s1']")
