"""The pointing game on the spoken-scene corpus: does an explanation map point at what the query names?

A set of fresh scenes with two or three object groups (drawn like :mod:`cmd_demo.scene_corpus` draws
them, none a scene of ``--exclude-scenes``), and for every group one spoken caption that names that
group only ("three big green stars at the bottom"), in voices the excluded corpora never use. The
renderer's geometry gives every shape's box (:func:`cmd_demo.scene_corpus.group_boxes`), so for each
(caption, image) trial the map's maximum is a **hit** when its patch-grid cell overlaps a box of the
named group (Zhang et al.'s pointing game, on the map's own grid). Chance, per trial, is the share of
the grid's cells that would be hits: the named group's boxes' share of the image at that grid; the
reported chance is its mean over the trials.

Scored per explanation kind a checkpoint gives (:mod:`cmd_plugin.retrieval.explain`), overall and per
value of each attribute of the named group (shape, colour, size, count, position).

Layout::

    OUT/flickr_audio/wavs/<stem>_<n>.wav (+ wav2capt.txt, wav2spk.txt), OUT/Flicker8k_Dataset/<stem>.jpg,
    OUT/Flickr8k_text/..., OUT/pointing_game.json: options, scenes and the trials (image, wav, caption,
    the named group and its boxes as fractions of the image side)

Its CLI is ``examples/pointing_game.py`` (``make`` and ``score``).
"""

import json
import os
import random
import time
from dataclasses import asdict, replace
from typing import Dict, List, Optional, Sequence, Set, Tuple

from cmd_demo import scene_corpus as gen
from cmd_demo.minimal_pairs import PairsError, draw_speakers, load_exclusions
from cmd_plugin.files import atomic_write_json

POINTING_FILE = "pointing_game.json"
POINTING_FORMAT = "cmd_plugin.pointing_game.v1"
GROUP_ATTRIBUTES = ("shape", "colour", "size", "count", "position")
Box = Tuple[float, float, float, float]


class PointingGameError(ValueError):
    """A set or option the pointing game cannot use; the message names the file and key."""


# ---------------------------------------------------------------- the arithmetic


def hit_cells(boxes: Sequence[Box], rows: int, cols: int) -> Set[Tuple[int, int]]:
    """Cells (row, col) of a rows x cols grid over the unit square whose area overlaps a box
    (x0, y0, x1, y1), in fractions of the image side (touching edges do not count)."""
    cells = set()
    for x0, y0, x1, y1 in boxes:
        for r in range(rows):
            for c in range(cols):
                if c / cols < x1 and x0 < (c + 1) / cols and r / rows < y1 and y0 < (r + 1) / rows:
                    cells.add((r, c))
    return cells


def score_trials(trials: Sequence[Dict], peaks: Sequence[Tuple[int, int]], rows: int, cols: int) -> Dict:
    """Pure scoring. ``trials`` [{"boxes": [...], "object": {attribute: value}}], ``peaks`` the map's
    (row, col) maximum per trial on a rows x cols grid -> {"accuracy" %, "chance" % (mean share of hit
    cells), "hits", "trials", "by_attribute": {attribute: {value: {"accuracy", "hits", "trials"}}}}."""
    if len(trials) != len(peaks) or not trials:
        raise PointingGameError(f"{len(trials)} trials and {len(peaks)} map peaks: expected as many, at least one")
    hits, chance = 0, 0.0
    by: Dict[str, Dict[str, Dict[str, int]]] = {a: {} for a in GROUP_ATTRIBUTES}
    for trial, peak in zip(trials, peaks):
        cells = hit_cells(trial["boxes"], rows, cols)
        hit = tuple(peak) in cells
        hits += hit
        chance += len(cells) / (rows * cols)
        for attribute in GROUP_ATTRIBUTES:
            cell = by[attribute].setdefault(str(trial["object"][attribute]), {"hits": 0, "trials": 0})
            cell["hits"] += hit
            cell["trials"] += 1
    for values in by.values():
        for cell in values.values():
            cell["accuracy"] = 100.0 * cell["hits"] / cell["trials"]
    return {
        "accuracy": 100.0 * hits / len(trials),
        "chance": 100.0 * chance / len(trials),
        "hits": hits,
        "trials": len(trials),
        "grid": [rows, cols],
        "by_attribute": {a: dict(sorted(v.items())) for a, v in by.items()},
    }


# ---------------------------------------------------------------- the set


def plan_pointing_game(
    seed: int,
    num_scenes: int,
    excluded_keys: Set,
    excluded_stems: Set[str] = frozenset(),
    excluded_speakers: Set[str] = frozenset(),
    speech_rates: Optional[Sequence[int]] = None,
    num_speakers: int = 8,
):
    """(images with one spoken caption per object group, trials, speaker info); no files."""
    if num_scenes < 1:
        raise PointingGameError("need at least one scene")
    rng = random.Random(f"pointing-game/{seed}")  # the set's own stream, never a corpus's
    rates = sorted(set(speech_rates or gen.ESPEAK_RATES))
    speakers, fresh = draw_speakers(rng, num_speakers, set(excluded_speakers), rates)
    stems, seen = set(excluded_stems), set()
    images, trials = [], []
    draws = 0
    while len(images) < num_scenes:
        draws += 1
        if draws > 100 * num_scenes + 1000:
            raise PointingGameError("could not draw enough new scenes with two or more groups")
        scene = gen.sample_scene(rng)
        if len(scene.objects) < 2 or scene.key() in excluded_keys or scene.key() in seen:
            continue
        seen.add(scene.key())
        stem = gen.make_stem(rng)
        while stem in stems:
            stem = gen.make_stem(rng)
        stems.add(stem)
        spoken = [gen.describe_scene(rng, replace(scene, objects=(obj,)), 1)[0] for obj in scene.objects]
        image = gen.PlannedImage(stem=stem, split="test", scene=scene)
        image.spoken = spoken
        image.captions = [c[0].upper() + c[1:] + " ." for c in spoken]
        image.speakers = [rng.choice(speakers) for _ in spoken]
        images.append(image)
        for n, obj in enumerate(scene.objects):
            described = {k: v for k, v in asdict(obj).items() if k not in ("dx", "dy", "angle")}
            trials.append(
                {
                    "image": stem,
                    "wav": f"{stem}_{n}.wav",
                    "caption": image.captions[n],
                    "group": n,
                    "object": described,
                    "boxes": [tuple(round(v, 5) for v in box) for box in gen.group_boxes(obj, 1.0)],
                }
            )
    return images, trials, {"names": sorted(s.name for s in speakers), "with_unseen_voice": fresh}


def make_pointing_game(
    out_dir: str,
    exclude_scenes: Sequence[str] = (),
    seed: int = 1,
    num_scenes: int = 60,
    image_size: Optional[int] = None,
    num_speakers: int = 8,
    num_workers: int = 0,
    overwrite: bool = False,
) -> Dict:
    """Write the set (atomically); returns pointing_game.json's content plus "out_dir", "seconds"."""
    gen.check_tools()
    start = time.time()
    try:
        keys, stems, excluded_speakers, excluded_info = load_exclusions(exclude_scenes)
    except PairsError as e:
        raise PointingGameError(str(e)) from None
    if image_size is None:
        image_size = next((i["image_size"] for i in excluded_info if i["image_size"]), 224)
    speech_rates = next((i["speech_rates"] for i in excluded_info if i["speech_rates"]), None)
    out_dir = gen.check_out_dir(out_dir, overwrite)
    images, trials, speakers = plan_pointing_game(
        seed, num_scenes, keys, stems, excluded_speakers, speech_rates, num_speakers
    )
    with gen.atomic_output_dir(out_dir) as tmp_dir:
        gen.write_flickr_layout(tmp_dir, images, image_size, num_workers or min(8, os.cpu_count() or 1))
        meta = {
            "format": POINTING_FORMAT,
            "generator": "examples/pointing_game.py make",
            "seed": seed,
            "image_size": image_size,
            "excluded": excluded_info,
            "speakers": speakers["names"],
            "speakers_with_unseen_voice": speakers["with_unseen_voice"],
            "scenes": {im.stem: gen.scene_record(im.scene) for im in images},
            "trials": trials,
        }
        with open(os.path.join(tmp_dir, POINTING_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
    return dict(meta, out_dir=out_dir, seconds=round(time.time() - start, 1))


def load_pointing_game(set_dir: str) -> Dict:
    """Read and check SET/pointing_game.json; trials get absolute "wav_path" and "image_path"."""
    path = os.path.join(os.path.abspath(set_dir), POINTING_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise PointingGameError(f"{path}: not found (make the set with examples/pointing_game.py make)") from None
    except (OSError, ValueError) as e:
        raise PointingGameError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != POINTING_FORMAT or not meta.get("trials"):
        raise PointingGameError(f"{path}: expected a {POINTING_FORMAT} record with a non-empty 'trials' list")
    root = os.path.dirname(path)
    for i, trial in enumerate(meta["trials"]):
        try:
            trial["wav_path"] = os.path.join(root, "flickr_audio", "wavs", trial["wav"])
            trial["image_path"] = os.path.join(root, "Flicker8k_Dataset", trial["image"] + ".jpg")
            boxes, obj = trial["boxes"], trial["object"]
            if not boxes or any(len(b) != 4 for b in boxes) or any(a not in obj for a in GROUP_ATTRIBUTES):
                raise ValueError("boxes of 4 numbers and the group's attributes")
        except (KeyError, TypeError, ValueError) as e:
            raise PointingGameError(f"{path}: trials[{i}]: expected 'wav', 'image', 'boxes', 'object' ({e})") from None
        for f in (trial["wav_path"], trial["image_path"]):
            if not os.path.isfile(f):
                raise PointingGameError(f"{f}: not found (named by {path}: trials[{i}])")
    meta["path"] = path
    return meta


# ---------------------------------------------------------------- with a model


def score_pointing_game(encoder, set_dir: str, progress=None) -> Dict:
    """Every trial's maps from ``encoder`` (:meth:`SpeechImageEncoder.explain`; load the checkpoint
    with ``keep_matching`` / ``keep_fusion`` for the maps those need) -> {"kinds": {kind:
    :func:`score_trials` figures}, "labels", "seconds_per_trial", ...}."""
    meta = load_pointing_game(set_dir)
    trials = meta["trials"]
    peaks: Dict[str, List] = {}
    grids: Dict[str, Tuple[int, int]] = {}
    labels: Dict[str, str] = {}
    start = time.time()
    for i, trial in enumerate(trials):
        for e in encoder.explain(trial["wav_path"], trial["image_path"]):
            peaks.setdefault(e.kind, []).append(e.peak())
            grids[e.kind] = tuple(e.image_map.shape)
            labels[e.kind] = e.label
        if progress is not None:
            progress(i + 1, len(trials))
    seconds = time.time() - start
    return {
        "format": "cmd_plugin.pointing_game_score.v1",
        "checkpoint": os.path.abspath(encoder.checkpoint) if encoder.checkpoint else None,
        "set": os.path.dirname(meta["path"]),
        "set_seed": meta.get("seed"),
        "kinds": {kind: score_trials(trials, p, *grids[kind]) for kind, p in peaks.items()},
        "labels": labels,
        "seconds_per_trial": round(seconds / len(trials), 4),
    }


def written_caption_pointing(encoder, set_dir: str) -> Dict:
    """The same trials pointed at by the checkpoint's frozen CLIP alone: its text tower's embedding of
    each WRITTEN caption against its image tower's patch tokens, the value-path ones
    (``dense_similarity``) and the plain ones (``patch_similarity``) -> {"kinds": {kind:
    :func:`score_trials` figures}}. How well the image tower's own patches localise what its own text
    names bounds the speech maps built on them (the speech is trained against that frozen tower)."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from cmd_plugin.inference import load_image
    from cmd_plugin.retrieval.explain import patch_grid, patch_similarity

    meta = load_pointing_game(set_dir)
    cfg = encoder.model.cfg  # a custom tower's config was registered when the encoder's tower was built
    clip = open_clip.create_model(cfg.image_model, pretrained=cfg.image_pretrained or None).eval()
    tokenizer = open_clip.get_tokenizer(cfg.image_model)
    tower = encoder.model.image_encoder
    peaks: Dict[str, List] = {"dense_similarity": [], "patch_similarity": []}
    tokens_of: Dict[str, Dict] = {}  # the tower runs once per image (each has a caption per group)
    grid = None
    with torch.inference_mode():
        for trial in meta["trials"]:
            if trial["image_path"] not in tokens_of:
                pixels = load_image(trial["image_path"], encoder.transform)[None].to(encoder.device)
                _, patches, dense = tower.value_path_patches(pixels)
                tokens_of[trial["image_path"]] = {"dense_similarity": dense[0], "patch_similarity": patches[0]}
            text = F.normalize(clip.encode_text(tokenizer([trial["caption"]])).float(), dim=-1)[0]
            for kind, tokens in tokens_of[trial["image_path"]].items():
                sims = patch_grid(patch_similarity(text.to(tokens.device), tokens))
                grid = tuple(sims.shape)
                peaks[kind].append(divmod(int(torch.argmax(sims)), grid[1]))
    return {"kinds": {kind: score_trials(meta["trials"], p, *grid) for kind, p in peaks.items()}}


def format_scores(record: Dict) -> str:
    lines = [
        f"pointing game ({next(iter(record['kinds'].values()))['trials']} captions naming one group; hit = the "
        "map's maximum in the named group's boxes):"
    ]
    for kind, s in record["kinds"].items():
        lines.append(
            f"  {kind}: {s['accuracy']:.1f} % (chance {s['chance']:.1f} %, {s['hits']}/{s['trials']}, "
            f"{s['grid'][0]}x{s['grid'][1]} grid)"
        )
        for attribute in ("position", "size", "count", "shape"):
            values = s["by_attribute"][attribute]
            lines.append(
                f"    by {attribute}: "
                + ", ".join(f"{v} {c['accuracy']:.0f} ({c['trials']})" for v, c in values.items())
            )
    if record.get("written_captions"):
        lines.append(
            "  the image tower's own text tower on the WRITTEN captions (a reference for the tower's patches):"
        )
        for kind, s in record["written_captions"]["kinds"].items():
            lines.append(f"    {kind}: {s['accuracy']:.1f} % (chance {s['chance']:.1f} %, {s['hits']}/{s['trials']})")
    return "\n".join(lines)


def write_score(record: Dict, path: str) -> None:
    atomic_write_json(path, record)
