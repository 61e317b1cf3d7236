"""The minimal-pairs test set of the spoken-scene corpus (CPU demo), in the Flickr 8k layout.

For each *base* scene (drawn like :mod:`cmd_demo.scene_corpus` draws its scenes), one *variant*
per attribute differs from it in exactly one described attribute:

    colour / shape / count / size / position   of one object group
    background                                 the background colour

The base's captions are spoken (every one names every group's count, size, colour, shape and
position, and here always the background too, so that every caption tells every pair apart);
the variants are only images. A model that aligns the words with the picture scores the base
image above each variant for the base's captions; :mod:`cmd_demo.minimal_pairs_scoring`
(``examples/score_minimal_pairs.py``) measures how often it does, per attribute (chance 50 %).

Changes keep the generator's rules: a new colour keeps ``MIN_COLOUR_CONTRAST`` with the
background, a new background keeps it with every object, a group moves to a free position,
counts change to a neighbouring count (1 <-> 2 <-> 3), sizes small <-> big, shapes to another
shape. Everything not described (pattern, jitter, rotation) is the base's.

Honesty: no base or variant equals a scene of ``--exclude-scenes`` (the training corpus's
``scene_corpus.json``, all its splits; repeatable), nor another scene of the set. Its voices are
its own: speakers are drawn from espeak-ng voice/variant pairs the excluded corpora's
``flickr_audio/wav2spk.txt`` never uses (and never one of their exact speakers), as far as there
are such pairs. The seed is the set's own: its random stream is seeded with
``"minimal-pairs/<seed>"``, never the corpus generator's ``Random(seed)``.

Layout (``examples/prepare_flickr8k.py --splits test`` reads it)::

    OUT/flickr_audio/wavs/<base stem>_<n>.wav, wav2capt.txt, wav2spk.txt
    OUT/Flicker8k_Dataset/<stem>.jpg            bases and variants
    OUT/Flickr8k_text/Flickr_8k.testImages.txt  the bases (train/dev lists are empty; the
                                                variants are extra jpgs in no list)
    OUT/Flickr8k_text/Flickr8k.token.txt        the bases' captions
    OUT/minimal_pairs.json                      options, every scene (like scene_corpus.json)
                                                and the groups: base, its wavs, its variants
                                                with attribute, object and from -> to

Its CLI is ``examples/generate_minimal_pairs.py``.
"""

import json
import os
import random
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Set, Tuple

from cmd_demo import scene_corpus as gen

PAIRS_FILE = "minimal_pairs.json"
PAIRS_FORMAT = "cmd_plugin.minimal_pairs.v1"
ATTRIBUTES = ("colour", "shape", "count", "size", "position", "background")
OBJECT_ATTRIBUTES = ("colour", "shape", "count", "size", "position")
COUNT_NEIGHBOURS = {1: (2,), 2: (1, 3), 3: (2,)}

SceneKey = Tuple


class PairsError(ValueError):
    """A file or option the minimal-pairs set cannot be made from; the message names it."""


# ---------------------------------------------------------------------------------------------
# What to exclude


def record_key(record: Dict, where: str) -> SceneKey:
    """The key (``Scene.key()``) of a scene as scene_corpus.json / minimal_pairs.json record it."""
    try:
        objects = tuple(
            sorted((o["position"], o["shape"], o["colour"], o["size"], int(o["count"])) for o in record["objects"])
        )
        return (record["background"], objects)
    except (KeyError, TypeError, ValueError) as e:
        raise PairsError(
            f"{where}: expected a scene with 'background' and 'objects' "
            f"(position, shape, colour, size, count), got {record!r} ({e!r})"
        ) from None


def load_exclusions(paths: Sequence[str]):
    """Scenes, stems and speakers of the corpora in ``paths`` (scene_corpus.json or
    minimal_pairs.json files); speakers come from the ``flickr_audio/wav2spk.txt`` beside each.
    Returns (scene keys, stems, speaker names, a record per file)."""
    keys: Set[SceneKey] = set()
    stems: Set[str] = set()
    speakers: Set[str] = set()
    info = []
    for path in paths:
        path = os.path.abspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise PairsError(f"{path}: scene file to exclude not found (a corpus's scene_corpus.json)") from None
        except (OSError, ValueError) as e:
            raise PairsError(f"{path}: cannot read it as JSON ({e})") from None
        scenes = meta.get("scenes") if isinstance(meta, dict) else None
        if not isinstance(scenes, dict) or not scenes:
            raise PairsError(
                f"{path}: expected a JSON object with a non-empty 'scenes' mapping "
                "(stem -> scene), as generate_scene_corpus.py writes"
            )
        for stem, record in scenes.items():
            keys.add(record_key(record, f"{path}: scenes[{stem!r}]"))
            stems.add(stem)
        spk_path = os.path.join(os.path.dirname(path), "flickr_audio", "wav2spk.txt")
        corpus_speakers = set()
        if os.path.isfile(spk_path):
            with open(spk_path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    parts = line.split()
                    if not parts:
                        continue
                    if len(parts) != 2:
                        raise PairsError(f"{spk_path}:{lineno}: expected '<wav> <speaker>', got {line.strip()!r}")
                    corpus_speakers.add(parts[1])
        speakers |= corpus_speakers
        info.append(
            {
                "path": path,
                "seed": meta.get("seed"),
                "scenes": len(scenes),
                "speakers": len(corpus_speakers),
                "speakers_file": spk_path if corpus_speakers else None,
                "image_size": meta.get("image_size"),
                "speech_rates": meta.get("speech_rates"),
            }
        )
    return keys, stems, speakers, info


def voice_of(speaker_name: str) -> str:
    """'en-gb+m3_s250_p40' -> 'en-gb+m3' (the espeak-ng voice and variant, without rate and pitch)."""
    return speaker_name.rsplit("_", 2)[0]


def draw_speakers(
    rng: random.Random, num_speakers: int, excluded: Set[str], rates: Sequence[int]
) -> Tuple[List[gen.Speaker], int]:
    """``num_speakers`` espeak-ng speakers, none of ``excluded``; first from voice/variant pairs
    no excluded speaker uses, then (if those run out) from the other pairs at another rate or
    pitch. Returns (speakers, how many have an unseen voice/variant)."""
    combos = [
        gen.Speaker(v, var, r, p)
        for v in gen.ESPEAK_VOICES
        for var in gen.ESPEAK_VARIANTS
        for r in rates
        for p in gen.ESPEAK_PITCHES
    ]
    used_voices = {voice_of(s) for s in excluded}
    new_voice = [s for s in combos if voice_of(s.name) not in used_voices]
    other = [s for s in combos if voice_of(s.name) in used_voices and s.name not in excluded]
    # one speaker per unseen voice/variant pair before any pair gets a second
    rng.shuffle(new_voice)
    by_voice: Dict[str, gen.Speaker] = {}
    for s in new_voice:
        by_voice.setdefault(voice_of(s.name), s)
    firsts = list(by_voice.values())
    rest = [s for s in new_voice if by_voice[voice_of(s.name)] is not s]
    picks = firsts[:num_speakers]
    if len(picks) < num_speakers:
        picks += rest[: num_speakers - len(picks)]
    fresh = len(picks)
    if len(picks) < num_speakers:
        picks += rng.sample(other, min(len(other), num_speakers - len(picks)))
    if len(picks) < num_speakers:
        raise PairsError(
            f"only {len(picks)} espeak-ng speakers are not in the excluded corpora; asked for {num_speakers}"
        )
    return picks, fresh


# ---------------------------------------------------------------------------------------------
# Variants


def _bg_rgb(name: str):
    return gen.BACKGROUNDS[name][0]


def _contrasts(colour: str, background: str) -> bool:
    return gen.colour_distance(gen.COLOURS[colour][0], _bg_rgb(background)) >= gen.MIN_COLOUR_CONTRAST


def variant_candidates(scene: gen.Scene, attribute: str) -> List[Tuple[gen.Scene, Dict]]:
    """Every scene that differs from ``scene`` in ``attribute`` only (of one object group, or the
    background), with the change: {"attribute", "object" (the group's position in the base, or
    None for the background), "from", "to"}. Undescribed details stay the base's."""
    out = []
    if attribute == "background":
        for bg in sorted(gen.BACKGROUNDS):
            if bg != scene.background and all(_contrasts(o.colour, bg) for o in scene.objects):
                out.append(
                    (
                        replace(scene, background=bg),
                        {"attribute": "background", "object": None, "from": scene.background, "to": bg},
                    )
                )
        return out
    if attribute not in OBJECT_ATTRIBUTES:
        raise PairsError(f"unknown attribute {attribute!r}; expected one of {', '.join(ATTRIBUTES)}")
    taken = {o.position for o in scene.objects}
    for i, obj in enumerate(scene.objects):
        if attribute == "colour":
            values = [c for c in sorted(gen.COLOURS) if c != obj.colour and _contrasts(c, scene.background)]
        elif attribute == "shape":
            values = [s for s in sorted(gen.SHAPES) if s != obj.shape]
        elif attribute == "count":
            values = list(COUNT_NEIGHBOURS[obj.count])
        elif attribute == "size":
            values = [s for s in sorted(gen.SIZES) if s != obj.size]
        else:  # position: a free one
            values = [p for p in sorted(gen.POSITIONS) if p not in taken]
        for value in values:
            objects = list(scene.objects)
            objects[i] = replace(obj, **{attribute: value})
            out.append(
                (
                    replace(scene, objects=tuple(objects)),
                    {"attribute": attribute, "object": obj.position, "from": getattr(obj, attribute), "to": value},
                )
            )
    return out


def differing_attributes(a: gen.Scene, b: gen.Scene) -> List[str]:
    """The described attributes in which ``b`` differs from ``a``, groups matched by order (as
    :func:`variant_candidates` keeps them); used to check that a variant is minimal."""
    diffs = ["background"] if a.background != b.background else []
    if len(a.objects) != len(b.objects):
        return diffs + ["number of groups"]
    for x, y in zip(a.objects, b.objects):
        diffs += [
            f"{attr} of the group {x.position}" for attr in OBJECT_ATTRIBUTES if getattr(x, attr) != getattr(y, attr)
        ]
    return diffs


def plan_minimal_pairs(
    seed: int,
    num_bases: int,
    captions_per_base: int,
    excluded_keys: Set[SceneKey],
    excluded_stems: Set[str] = frozenset(),
    excluded_speakers: Set[str] = frozenset(),
    speech_rates: Optional[Sequence[int]] = None,
    num_speakers: int = 8,
    attributes: Sequence[str] = ATTRIBUTES,
):
    """Plan the set (no files): returns (images, groups, speaker info).

    ``images``: PlannedImage per base (split "test", spoken captions) and per variant (split
    "variant", no captions); ``groups``: [{"base": stem, "variants": [{"stem", "attribute",
    "object", "from", "to"}]}] with one variant per attribute, in ``attributes`` order."""
    if num_bases < 1 or captions_per_base < 1:
        raise PairsError("need at least one base scene and one caption per base")
    if captions_per_base > num_speakers:
        raise PairsError(
            f"{captions_per_base} captions per base need at least as many speakers (--num-speakers {num_speakers})"
        )
    for attribute in attributes:
        if attribute not in ATTRIBUTES:
            raise PairsError(f"unknown attribute {attribute!r}; expected some of {', '.join(ATTRIBUTES)}")
    rng = random.Random(f"minimal-pairs/{seed}")  # never the corpus generator's Random(seed) stream
    rates = sorted(set(speech_rates or gen.ESPEAK_RATES))
    speakers, fresh = draw_speakers(rng, num_speakers, set(excluded_speakers), rates)

    seen: Set[SceneKey] = set()
    stems: Set[str] = set(excluded_stems)
    images: List[gen.PlannedImage] = []
    groups: List[Dict] = []
    rejected = 0

    def new_stem() -> str:
        stem = gen.make_stem(rng)
        while stem in stems:
            stem = gen.make_stem(rng)
        stems.add(stem)
        return stem

    for _ in range(num_bases):
        for _attempt in range(10_000):
            base = gen.sample_scene(rng)
            if base.key() in excluded_keys or base.key() in seen:
                rejected += 1
                continue
            group_keys = {base.key()}
            chosen = []
            for attribute in attributes:
                candidates = variant_candidates(base, attribute)
                rng.shuffle(candidates)
                pick = next(
                    (
                        (s, c)
                        for s, c in candidates
                        if s.key() not in excluded_keys and s.key() not in seen and s.key() not in group_keys
                    ),
                    None,
                )
                if pick is None:  # e.g. no other background contrasts with every object
                    break
                group_keys.add(pick[0].key())
                chosen.append(pick)
            if len(chosen) == len(attributes):
                break
            rejected += 1
        else:
            raise PairsError(
                "could not draw a new base scene whose variants are all new; too many scenes excluded or asked for"
            )
        seen |= group_keys
        spoken = gen.describe_scene(rng, base, captions_per_base, mention_background=True)
        image = gen.PlannedImage(stem=new_stem(), split="test", scene=base)
        image.spoken = spoken
        image.captions = [c[0].upper() + c[1:] + " ." for c in spoken]
        image.speakers = rng.sample(speakers, captions_per_base)
        images.append(image)
        variants = []
        for scene, change in chosen:
            variant = gen.PlannedImage(stem=new_stem(), split="variant", scene=scene)
            images.append(variant)
            variants.append({"stem": variant.stem, **change})
        groups.append({"base": image.stem, "variants": variants})
    speaker_info = {
        "names": sorted(s.name for s in speakers),
        "with_unseen_voice": fresh,
        "rejected_base_draws": rejected,
    }
    return images, groups, speaker_info


# ---------------------------------------------------------------------------------------------
# Writing


def generate_minimal_pairs(
    out_dir: str,
    exclude_scenes: Sequence[str] = (),
    seed: int = 1,
    num_bases: int = 40,
    captions_per_base: int = 3,
    image_size: Optional[int] = None,
    speech_rates: Optional[Sequence[int]] = None,
    num_speakers: int = 8,
    num_workers: int = 0,
    overwrite: bool = False,
    attributes: Sequence[str] = ATTRIBUTES,
) -> Dict:
    """Write the set to ``out_dir`` (atomically); returns its record (minimal_pairs.json's content
    plus "out_dir" and "seconds"). ``image_size`` / ``speech_rates`` default to the first excluded
    corpus's (so only the scenes and voices differ from it), else 224 px and the generator's rates."""
    gen.check_tools()
    start = time.time()
    keys, stems, excluded_speakers, excluded_info = load_exclusions(exclude_scenes)
    if image_size is None:
        image_size = next((i["image_size"] for i in excluded_info if i["image_size"]), 224)
    if speech_rates is None:
        speech_rates = next((i["speech_rates"] for i in excluded_info if i["speech_rates"]), None)
    if speech_rates is not None and (not speech_rates or min(speech_rates) < 80 or max(speech_rates) > 500):
        raise PairsError(f"speech rates must be words per minute in [80, 500], got {speech_rates}")
    if image_size < 16:
        raise PairsError(f"image size must be at least 16 pixels, got {image_size}")
    out_dir = gen.check_out_dir(out_dir, overwrite)
    num_workers = num_workers or min(8, os.cpu_count() or 1)

    images, groups, speaker_info = plan_minimal_pairs(
        seed, num_bases, captions_per_base, keys, stems, excluded_speakers, speech_rates, num_speakers, attributes
    )
    by_stem = {im.stem: im for im in images}
    with gen.atomic_output_dir(out_dir) as tmp_dir:
        num_samples = gen.write_flickr_layout(tmp_dir, images, image_size, num_workers)
        for group in groups:
            base = by_stem[group["base"]]
            group["wavs"] = [f"{base.stem}_{n}.wav" for n in range(len(base.spoken))]
            group["captions"] = list(base.captions)
        meta = {
            "format": PAIRS_FORMAT,
            "generator": "examples/generate_minimal_pairs.py",
            "seed": seed,
            "image_size": image_size,
            "speech_rates": sorted(set(speech_rates or gen.ESPEAK_RATES)),
            "captions_per_base": captions_per_base,
            "attributes": list(attributes),
            "counts": {
                "groups": len(groups),
                "variants": sum(len(g["variants"]) for g in groups),
                "utterances": len(num_samples),
                "variants_per_attribute": {
                    a: sum(v["attribute"] == a for g in groups for v in g["variants"]) for a in attributes
                },
            },
            "audio_minutes": round(sum(num_samples) / gen.SAMPLE_RATE / 60.0, 2),
            "excluded": excluded_info,
            "speakers": speaker_info["names"],
            "speakers_with_unseen_voice": speaker_info["with_unseen_voice"],
            "scenes": {
                im.stem: {"role": "base" if im.split == "test" else "variant", **gen.scene_record(im.scene)}
                for im in images
            },
            "groups": groups,
        }
        with open(os.path.join(tmp_dir, PAIRS_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
    return dict(meta, out_dir=out_dir, seconds=round(time.time() - start, 1))


def format_summary(record: Dict) -> str:
    counts = record["counts"]
    per = ", ".join(f"{a} {n}" for a, n in counts["variants_per_attribute"].items())
    lines = [
        f"Wrote {record['out_dir']} in {record['seconds']} s (seed {record['seed']}):",
        f"  {counts['groups']} base scenes, {counts['variants']} variants ({per}), "
        f"{record['image_size']}x{record['image_size']} jpg",
        f"  {counts['utterances']} spoken captions ({record['captions_per_base']} per base), "
        f"{len(record['speakers'])} speakers ({record['speakers_with_unseen_voice']} with a voice the excluded "
        f"corpora do not use), {record['audio_minutes']:.1f} min of audio",
    ]
    for ex in record["excluded"]:
        lines.append(f"  excluded: {ex['scenes']} scenes and {ex['speakers']} speakers of {ex['path']}")
    if not record["excluded"]:
        lines.append("  excluded: nothing (--no-exclude): scenes may repeat a training corpus's")
    group = record["groups"][0]
    lines.append(f'  e.g. {group["base"]}: "{group["captions"][0]}"')
    for v in group["variants"]:
        what = "background" if v["object"] is None else f"{v['attribute']} of the group {v['object']}"
        lines.append(f"    {v['stem']}: {what} {v['from']} -> {v['to']}")
    return "\n".join(lines)
