"""Hard negatives for the tiny CLIP's image-text pre-training: a training scene with ONE described
attribute changed (NegCLIP, Yuksekgonul et al. 2023, "When and why vision-language models behave
like bags-of-words").

A scene of the spoken-scene corpus (:mod:`cmd_demo.scene_corpus`) is described by every group's
count, size, colour, shape and position, and the background. :func:`negative_scene` changes one of
them with the minimal-pairs rules (:func:`cmd_demo.minimal_pairs.variant_candidates`: a new colour
keeps its contrast with the background, a new background with every object, a group moves to a
free position, a count to a neighbouring count, small <-> big, a shape to another shape) and draws
fresh rendering details (offset, rotation) for the changed scene, so that those details never tell
a negative image from a real one. :func:`negative_caption` describes the changed scene in the
corpus's own phrasings (naming the background whenever the background is what changed); it is
checked with :func:`caption_facts`, a parser of those phrasings, to be true of the changed scene and
false of the original one, and refused otherwise.

Everything here is pure (a function of the scene and the ``random.Random`` given); the images of
negative scenes are rendered with :func:`cmd_demo.scene_corpus.render_scene` by the caller.
"""

import random
import re
from dataclasses import replace
from typing import Collection, Dict, List, Optional, Tuple

from cmd_demo import scene_corpus as gen
from cmd_demo.minimal_pairs import ATTRIBUTES, variant_candidates


class NegativeCaptionError(ValueError):
    """A scene or caption the negatives cannot be made from or checked against; names what and why."""


# ---------------------------------------------------------------------------------------------
# Reading a caption back: which groups (count, size, colour, shape, position) and background it states

_COUNTS = {w: n for n, words in gen.COUNT_WORDS.items() for w in words}
_SIZES = {w: s for s, words in gen.SIZES.items() for w in words}
_COLOURS = {w: c for c, (_, words) in gen.COLOURS.items() for w in words}
_SHAPES = {w: (s, n) for s, forms in gen.SHAPES.items() for sing, plur in forms for w, n in ((sing, 1), (plur, 2))}
_POSITIONS = sorted(((p, pos) for pos, phrases in gen.POSITIONS.items() for p in phrases), key=lambda x: -len(x[0]))
_BACKGROUNDS = {w: b for b, (_, words) in gen.BACKGROUNDS.items() for w in words}
_BG = "|".join(sorted(map(re.escape, _BACKGROUNDS), key=len, reverse=True))
_BG_PATTERNS = [re.compile(rf"^an? ({_BG}) background with "), re.compile(rf" (?:on|against) an? ({_BG}) background$")]
_PREFIXES = ("a picture of ", "an image of ", "i can see ", "this shows ", "a drawing of ", "there is ", "there are ")
_NP = re.compile(
    r"^(?:there (?:is|are) |is |are )?({c}) ({s}) ({k}) ({n})$".format(
        c="|".join(map(re.escape, _COUNTS)),
        s="|".join(map(re.escape, _SIZES)),
        k="|".join(map(re.escape, _COLOURS)),
        n="|".join(sorted(map(re.escape, _SHAPES), key=len, reverse=True)),
    )
)

Group = Tuple[str, str, str, str, int]  # (position, shape, colour, size, count), as SceneObject.key()


def caption_facts(text: str) -> Tuple[Optional[str], Tuple[Group, ...]]:
    """What a caption in the corpus's phrasings states: (background or None when it names none,
    the groups sorted like ``Scene.key()``). Capitalisation and Flickr's final " ." are ignored.
    Raises :class:`NegativeCaptionError` on text that is not one of those phrasings."""
    s = text.strip().lower()
    s = s[:-2] if s.endswith(" .") else s.rstrip(".")
    background = None
    for pattern in _BG_PATTERNS:
        m = pattern.search(s)
        if m:
            background = _BACKGROUNDS[m.group(1)]
            s = s[: m.start()] + s[m.end() :] if m.start() > 0 else s[m.end() :]
            break
    for prefix in _PREFIXES:
        if s.startswith(prefix):
            s = s[len(prefix) :]
            break
    groups = []
    for chunk in re.split(r", | and ", s):
        for phrase, position in _POSITIONS:
            if chunk.startswith(phrase + " ") or chunk.endswith(" " + phrase):
                rest = chunk[len(phrase) + 1 :] if chunk.startswith(phrase + " ") else chunk[: -len(phrase) - 1]
                break
        else:
            raise NegativeCaptionError(f"caption {text!r}: no position phrase in {chunk!r}")
        m = _NP.match(rest)
        if not m:
            raise NegativeCaptionError(f"caption {text!r}: expected '<count> <size> <colour> <shape>' in {rest!r}")
        count, (shape, number) = _COUNTS[m.group(1)], _SHAPES[m.group(4)]
        if (count > 1) != (number > 1):
            raise NegativeCaptionError(f"caption {text!r}: count and noun disagree in {rest!r}")
        groups.append((position, shape, _COLOURS[m.group(3)], _SIZES[m.group(2)], count))
    return background, tuple(sorted(groups))


def caption_is_true_of(text: str, scene: gen.Scene) -> bool:
    """True when every group the caption states is the scene's (and no other), and the background it
    names (if any) is the scene's."""
    background, groups = caption_facts(text)
    bg_key, scene_groups = scene.key()
    return groups == scene_groups and background in (None, bg_key)


# ---------------------------------------------------------------------------------------------
# Making negatives


def negative_scene(
    scene: gen.Scene, rng: random.Random, attributes: Collection[str] = ATTRIBUTES, avoid: Collection[Tuple] = ()
) -> Tuple[gen.Scene, Dict]:
    """``scene`` with one of ``attributes`` changed (attribute drawn uniformly among those that can
    change, then the change among its candidates), and the change {"attribute", "object", "from",
    "to"}. A scene whose key is in ``avoid`` (e.g. every training scene, so that a negative is never
    another image's positive) is never returned. The changed group gets fresh rendering details."""
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown or not attributes:
        raise NegativeCaptionError(f"attributes {list(attributes)!r}: expected some of {', '.join(ATTRIBUTES)}")
    order = list(attributes)
    rng.shuffle(order)
    for attribute in order:
        candidates = [(s, c) for s, c in variant_candidates(scene, attribute) if s.key() not in avoid]
        if candidates:
            changed, change = candidates[rng.randrange(len(candidates))]
            objects = tuple(
                replace(
                    o,
                    dx=round(rng.uniform(-0.02, 0.02), 4),
                    dy=round(rng.uniform(-0.02, 0.02), 4),
                    angle=round(rng.uniform(-15.0, 15.0), 2),
                )
                for o in changed.objects
            )
            return replace(changed, objects=objects), change
    raise NegativeCaptionError(f"scene {scene.key()!r}: no attribute of {order} can change to a scene not avoided")


def negative_caption(scene: gen.Scene, changed: gen.Scene, change: Dict, rng: random.Random) -> str:
    """One phrasing of ``changed`` (a :func:`negative_scene` of ``scene``), checked to be true of
    ``changed`` and false of ``scene``; a background change is always named."""
    text = gen.describe_scene(rng, changed, 1, mention_background=change["attribute"] == "background")[0]
    if not caption_is_true_of(text, changed) or caption_is_true_of(text, scene):
        raise NegativeCaptionError(
            f"negative caption {text!r} of change {change!r} is not false of the scene {scene.key()!r} only"
        )
    return text


def make_negatives(
    scene: gen.Scene,
    rng: random.Random,
    num: int,
    attributes: Collection[str] = ATTRIBUTES,
    avoid: Collection[Tuple] = (),
) -> List[Tuple[gen.Scene, Dict, str]]:
    """``num`` hard negatives of ``scene``: [(changed scene, change, caption)], each one attribute away."""
    out = []
    for _ in range(num):
        changed, change = negative_scene(scene, rng, attributes, avoid)
        out.append((changed, change, negative_caption(scene, changed, change, rng)))
    return out


def scene_from_record(record: Dict, where: str) -> gen.Scene:
    """A :class:`~cmd_demo.scene_corpus.Scene` from a scene_corpus.json record (its described
    attributes and pattern; the undescribed offset and rotation, which the record leaves out, are 0)."""
    try:
        objects = tuple(
            gen.SceneObject(
                shape=o["shape"], colour=o["colour"], size=o["size"], position=o["position"], count=int(o["count"])
            )
            for o in record["objects"]
        )
        scene = gen.Scene(
            background=record["background"],
            pattern=record.get("pattern", "plain"),
            pattern_phase=float(record.get("pattern_phase", 0.0)),
            objects=objects,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise NegativeCaptionError(
            f"{where}: expected a scene with 'background' and 'objects' (shape, colour, size, "
            f"position, count), got {record!r} ({e!r})"
        ) from None
    for o in objects:
        if (
            o.shape not in gen.SHAPES
            or o.colour not in gen.COLOURS
            or o.size not in gen.SIZES
            or o.position not in gen.POSITIONS
            or o.count not in gen.COUNT_WORDS
        ):
            raise NegativeCaptionError(f"{where}: object {o!r} has a value outside the generator's vocabulary")
    if scene.background not in gen.BACKGROUNDS:
        raise NegativeCaptionError(f"{where}: unknown background {scene.background!r}")
    return scene
