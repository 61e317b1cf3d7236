"""The pointing game: its arithmetic, boxes that are where the renderer draws, and a set scored end to end."""

import os

import numpy as np
import pytest
from PIL import Image
from test_search import make_checkpoint
from test_search_service import HEAD

from cmd_demo import scene_corpus as gen
from cmd_demo.pointing_game import (
    PointingGameError,
    format_scores,
    hit_cells,
    load_pointing_game,
    make_pointing_game,
    score_pointing_game,
    score_trials,
    written_caption_pointing,
)


def test_hit_cells_are_the_cells_a_box_overlaps():
    assert hit_cells([(0.1, 0.1, 0.2, 0.2)], 4, 4) == {(0, 0)}
    assert hit_cells([(0.2, 0.2, 0.3, 0.3)], 4, 4) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert hit_cells([(0.25, 0.0, 0.5, 0.25)], 4, 4) == {(0, 1)}  # touching edges do not count
    assert hit_cells([(0.1, 0.1, 0.2, 0.2), (0.8, 0.8, 0.9, 0.9)], 2, 2) == {(0, 0), (1, 1)}


def test_score_trials_counts_hits_chance_and_attributes():
    obj = {"shape": "star", "colour": "red", "size": "big", "count": 1, "position": "left"}
    trials = [
        {"boxes": [(0.0, 0.0, 0.2, 0.2)], "object": obj},  # cell (0, 0) of 4 x 4: chance 1/16
        {"boxes": [(0.55, 0.55, 0.95, 0.95)], "object": dict(obj, shape="circle")},  # cells (2..3, 2..3): 4/16
    ]
    out = score_trials(trials, [(0, 0), (0, 3)], 4, 4)
    assert out["hits"] == 1 and out["trials"] == 2 and out["accuracy"] == 50.0
    assert out["chance"] == pytest.approx(100.0 * (1 / 16 + 4 / 16) / 2)
    assert out["by_attribute"]["shape"] == {
        "circle": {"hits": 0, "trials": 1, "accuracy": 0.0},
        "star": {"hits": 1, "trials": 1, "accuracy": 100.0},
    }
    assert out["by_attribute"]["position"]["left"]["trials"] == 2
    with pytest.raises(PointingGameError, match="2 trials and 1 map peaks"):
        score_trials(trials, [(0, 0)], 4, 4)


@pytest.mark.parametrize("shape", ["circle", "star", "square", "cross"])
def test_the_boxes_are_where_the_renderer_draws(shape):
    obj = gen.SceneObject(shape=shape, colour="blue", size="big", position="left", count=2, dx=0.01, angle=10.0)
    scene = gen.Scene(background="beige", pattern="plain", pattern_phase=0.0, objects=(obj,))
    size = 128
    pixels = np.asarray(gen.render_scene(scene, size)).astype(int)
    background = np.array(gen.BACKGROUNDS["beige"][0])
    ys, xs = np.nonzero(np.abs(pixels - background).sum(axis=2) > 60)
    boxes = gen.group_boxes(obj, size)
    assert len(boxes) == 2
    # every drawn pixel lies in a box (1 px of antialiasing), and each box holds drawn pixels
    inside = np.zeros(len(xs), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        inside |= (xs >= x0 - 1.5) & (xs <= x1 + 1.5) & (ys >= y0 - 1.5) & (ys <= y1 + 1.5)
        assert ((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)).sum() > 20
    assert inside.all()


@pytest.fixture(scope="module")
def pointing_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("pg") / "set"
    record = make_pointing_game(str(out), (), seed=3, num_scenes=3, image_size=64, num_speakers=2)
    return str(out), record


def test_a_set_names_one_group_per_caption_and_is_scored_for_every_map(pointing_set, tiny_encoders, tmp_path):
    from cmd_plugin.inference import SpeechImageEncoder

    out, record = pointing_set
    meta = load_pointing_game(out)
    assert len(meta["scenes"]) == 3 and len(meta["trials"]) == sum(len(s["objects"]) for s in meta["scenes"].values())
    for trial in meta["trials"]:
        scene = meta["scenes"][trial["image"]]
        assert len(scene["objects"]) >= 2 and trial["object"] == scene["objects"][trial["group"]]
        assert os.path.isfile(trial["wav_path"]) and os.path.isfile(trial["image_path"])
    path, _ = make_checkpoint(str(tmp_path / "c2f" / "checkpoint_best.pt"), tiny_encoders, seed=1, **HEAD)
    encoder = SpeechImageEncoder.from_checkpoint(path, keep_matching=True)
    done = []
    scores = score_pointing_game(encoder, out, progress=lambda d, t: done.append((d, t)))
    assert list(scores["kinds"]) == ["dense_similarity", "matching_gradcam", "patch_similarity"]
    assert done[-1] == (len(meta["trials"]), len(meta["trials"]))
    for kind, s in scores["kinds"].items():
        assert s["trials"] == len(meta["trials"]) and 0 < s["chance"] < 100 and s["grid"] == [8, 8]
    # the aggregate is the trials' own: each map's peak against the named group's cells
    hits = {"dense_similarity": 0, "matching_gradcam": 0}
    for trial in meta["trials"]:
        for e in encoder.explain(trial["wav_path"], trial["image_path"])[:2]:
            hits[e.kind] += e.peak() in hit_cells(trial["boxes"], 8, 8)
    assert {kind: scores["kinds"][kind]["hits"] for kind in hits} == hits
    assert "pointing game" in format_scores(scores) and "by position" in format_scores(scores)

    # the reference: the frozen CLIP alone, its text tower on the written captions against its patches
    import open_clip
    import torch
    import torch.nn.functional as F

    written = written_caption_pointing(encoder, out)
    assert list(written["kinds"]) == ["dense_similarity", "patch_similarity"]
    clip = open_clip.create_model(tiny_encoders["image_model"], pretrained=tiny_encoders["image_pretrained"]).eval()
    tokenizer = open_clip.get_tokenizer(tiny_encoders["image_model"])
    recount = 0
    with torch.no_grad():
        for trial in meta["trials"]:
            text = F.normalize(clip.encode_text(tokenizer([trial["caption"]])), dim=-1)[0]
            pixels = encoder.transform(Image.open(trial["image_path"]).convert("RGB"))[None]
            _, _, dense = encoder.model.image_encoder.value_path_patches(pixels)
            peak = divmod(int(torch.argmax(F.normalize(dense[0], dim=-1) @ text)), 8)
            recount += peak in hit_cells(trial["boxes"], 8, 8)
    assert written["kinds"]["dense_similarity"]["hits"] == recount
    scores["written_captions"] = written
    assert "own text tower on the WRITTEN captions" in format_scores(scores)
