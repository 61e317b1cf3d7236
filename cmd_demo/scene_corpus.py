"""The spoken-scene corpus of the CPU demo, in the Flickr 8k Audio Caption Corpus layout.

Every image is a rendered scene of 1-3 object groups (shape, colour, size, position, count) on a
coloured, lightly patterned background; each image gets several spoken captions, each a
different phrasing of the scene, synthesised by ``espeak-ng`` with varied voices, rates and
pitches and resampled to 16 kHz mono 16-bit PCM by ``sox``. The output is laid out exactly like
the real corpus, so that ``examples/prepare_flickr8k.py`` reads it unchanged::

    OUT/flickr_audio/wavs/<stem>_<n>.wav     16 kHz mono PCM_16
    OUT/flickr_audio/wav2capt.txt            "<stem>_<n>.wav <stem>.jpg #<n>"
    OUT/flickr_audio/wav2spk.txt             "<stem>_<n>.wav <speaker id>"
    OUT/Flicker8k_Dataset/<stem>.jpg         (the real corpus's misspelling)
    OUT/Flickr8k_text/Flickr_8k.{train,dev,test}Images.txt, Flickr8k.token.txt
    OUT/scene_corpus.json                    (extra: seed, options and each image's scene)

Everything (stems, scenes, captions, speakers, pixels, audio bytes) is a function of the seed
and the size options: :func:`plan_corpus` draws every random choice, sequentially from one
seeded generator, and the rendering and synthesis that follow are pure functions of the plan.
:func:`generate_corpus` writes into ``OUT.tmp-<pid>`` and renames it to ``OUT`` only when
complete, so an interrupted run never leaves a corpus that looks finished.

Its CLI is ``examples/generate_scene_corpus.py``; :mod:`cmd_demo.minimal_pairs` draws its scenes
with the same vocabulary and rules. Needs ``espeak-ng`` and ``sox`` on PATH (Debian/Ubuntu:
``apt-get install -y espeak-ng sox``) and Pillow.
"""

import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence, Tuple

from cmd_plugin.progress import CountProgress

INSTALL_HINT = (
    "install it with `apt-get install -y espeak-ng sox` (Debian/Ubuntu) or `brew install espeak-ng sox` (macOS)"
)
SAMPLE_RATE = 16000

# ---------------------------------------------------------------------------------------------
# Vocabulary. Each attribute value maps to the words that may name it (synonyms vary phrasing).

SHAPES: Dict[str, List[Tuple[str, str]]] = {  # name -> [(singular, plural), ...]
    "circle": [("circle", "circles"), ("disk", "disks")],
    "square": [("square", "squares"), ("box", "boxes")],
    "triangle": [("triangle", "triangles")],
    "star": [("star", "stars")],
    "diamond": [("diamond", "diamonds")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
    "hexagon": [("hexagon", "hexagons")],
}
COLOURS: Dict[str, Tuple[Tuple[int, int, int], List[str]]] = {
    "red": ((214, 32, 32), ["red"]),
    "green": ((34, 150, 52), ["green"]),
    "blue": ((32, 72, 214), ["blue"]),
    "yellow": ((240, 208, 24), ["yellow"]),
    "orange": ((244, 128, 20), ["orange"]),
    "purple": ((128, 40, 168), ["purple", "violet"]),
    "pink": ((240, 112, 180), ["pink"]),
    "black": ((18, 18, 18), ["black"]),
    "white": ((250, 250, 250), ["white"]),
    "brown": ((128, 78, 30), ["brown"]),
}
BACKGROUNDS: Dict[str, Tuple[Tuple[int, int, int], List[str]]] = {
    "grey": ((150, 150, 150), ["grey", "gray"]),
    "light blue": ((168, 200, 236), ["light blue", "pale blue"]),
    "beige": ((226, 212, 176), ["beige", "sandy"]),
    "light green": ((180, 222, 172), ["light green", "pale green"]),
    "dark blue": ((26, 36, 92), ["dark blue", "navy"]),
    "dark grey": ((58, 58, 62), ["dark grey", "dark gray", "charcoal"]),
}
SIZES: Dict[str, List[str]] = {"small": ["small", "little"], "big": ["big", "large"]}
POSITIONS: Dict[str, List[str]] = {
    "left": ["on the left", "on the left side", "to the left"],
    "right": ["on the right", "on the right side", "to the right"],
    "top": ["at the top", "near the top", "up at the top"],
    "bottom": ["at the bottom", "near the bottom", "down at the bottom"],
    "middle": ["in the middle", "in the center"],
}
COUNT_WORDS = {1: ["a", "one"], 2: ["two"], 3: ["three"]}
PATTERNS = ["plain", "gradient", "stripes", "dots", "checks"]

# Region centres as fractions of the image side; sized so that groups never overlap.
POSITION_CENTRES = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "middle": (0.5, 0.5),
}
SIZE_RADII = {"small": 0.075, "big": 0.13}
MIN_COLOUR_CONTRAST = 110.0  # RGB distance between an object and its background

# espeak-ng voices that ship with the program itself (the mbrola ones need extra packages).
ESPEAK_VOICES = [
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
]
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]
# Words per minute. Fast speech keeps utterances short (about 3.3 s instead of 5.9 s at 135-180 wpm),
# which the CPU demo needs: the upstream's attention cost grows with the square of the length.
ESPEAK_RATES = [250, 280, 310, 340]
ESPEAK_PITCHES = [30, 40, 50, 60, 70]  # 0-99


class ToolMissingError(RuntimeError):
    """A required external program (espeak-ng or sox) is not on PATH."""


# ---------------------------------------------------------------------------------------------
# Planning: everything random is drawn here, sequentially from one seeded generator, so that the
# parallel rendering/synthesis afterwards is a pure function of the plan.


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    count: int
    # Rendering details that captions do not mention.
    dx: float = 0.0
    dy: float = 0.0
    angle: float = 0.0

    def key(self) -> Tuple:
        return (self.position, self.shape, self.colour, self.size, self.count)


@dataclass(frozen=True)
class Scene:
    background: str
    pattern: str
    pattern_phase: float
    objects: Tuple[SceneObject, ...]

    def key(self) -> Tuple:
        """What the captions describe; two scenes with the same key are the same scene."""
        return (self.background, tuple(sorted(o.key() for o in self.objects)))


@dataclass(frozen=True)
class Speaker:
    voice: str
    variant: str
    rate: int
    pitch: int

    @property
    def name(self) -> str:
        return f"{self.voice}+{self.variant}_s{self.rate}_p{self.pitch}"


@dataclass
class PlannedImage:
    stem: str
    split: str  # "train", "valid" or "test"
    scene: Scene
    captions: List[str] = field(default_factory=list)  # text as written in Flickr8k.token.txt
    spoken: List[str] = field(default_factory=list)  # text given to espeak-ng
    speakers: List[Speaker] = field(default_factory=list)


def colour_distance(a: Sequence[int], b: Sequence[int]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def sample_scene(rng: random.Random) -> Scene:
    background = rng.choice(sorted(BACKGROUNDS))
    bg_rgb = BACKGROUNDS[background][0]
    colours = [c for c in sorted(COLOURS) if colour_distance(COLOURS[c][0], bg_rgb) >= MIN_COLOUR_CONTRAST]
    num_objects = rng.choices([1, 2, 3], weights=[3, 5, 3])[0]
    positions = rng.sample(sorted(POSITIONS), num_objects)
    objects = []
    for position in positions:
        objects.append(
            SceneObject(
                shape=rng.choice(sorted(SHAPES)),
                colour=rng.choice(colours),
                size=rng.choice(sorted(SIZES)),
                position=position,
                count=rng.choices([1, 2, 3], weights=[7, 2, 1])[0],
                dx=round(rng.uniform(-0.02, 0.02), 4),
                dy=round(rng.uniform(-0.02, 0.02), 4),
                angle=round(rng.uniform(-15.0, 15.0), 2),
            )
        )
    return Scene(
        background=background,
        pattern=rng.choice(PATTERNS),
        pattern_phase=round(rng.random(), 4),
        objects=tuple(objects),
    )


def _join(items: List[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _noun_phrase(rng: random.Random, obj: SceneObject) -> str:
    singular, plural = rng.choice(SHAPES[obj.shape])
    noun = singular if obj.count == 1 else plural
    words = [rng.choice(COUNT_WORDS[obj.count]), rng.choice(SIZES[obj.size]), rng.choice(COLOURS[obj.colour][1]), noun]
    return " ".join(words)


def _describe(rng: random.Random, scene: Scene, template: int, mention_background: bool = False) -> str:
    """One phrasing of ``scene``; ``template`` picks the sentence frame, ``rng`` the wording.

    Every phrasing names each object group's count, size, colour, shape and position; the
    background only in some frames (and at random in others) unless ``mention_background``."""
    objects = list(scene.objects)
    rng.shuffle(objects)
    nps = [_noun_phrase(rng, o) for o in objects]
    pos = [rng.choice(POSITIONS[o.position]) for o in objects]
    plural = [o.count > 1 for o in objects]
    background = rng.choice(BACKGROUNDS[scene.background][1])
    bg_suffix = rng.choice([f" on a {background} background", f" against a {background} background"])

    if template == 0:  # "a big red circle on the left and two small blue squares at the top"
        text = _join([f"{n} {p}" for n, p in zip(nps, pos)])
        if mention_background or rng.random() < 0.5:
            text += bg_suffix
    elif template == 1:  # "there is a ... and ..."
        verb = "there are" if plural[0] else "there is"
        text = f"{verb} " + _join([f"{n} {p}" for n, p in zip(nps, pos)]) + bg_suffix
    elif template == 2:  # "on the left there is a ..., and at the top there are ..."
        clauses = [f"{p} there {'are' if pl else 'is'} {n}" for n, p, pl in zip(nps, pos, plural)]
        text = _join(clauses)
        if mention_background:
            text += bg_suffix
    elif template == 3:  # "a picture of ..."
        prefix = rng.choice(["a picture of", "an image of", "i can see", "this shows", "a drawing of"])
        text = f"{prefix} " + _join([f"{n} {p}" for n, p in zip(nps, pos)])
        if mention_background or rng.random() < 0.5:
            text += bg_suffix
    elif template == 4:  # "a grey background with ..."
        text = f"a {background} background with " + _join([f"{n} {p}" for n, p in zip(nps, pos)])
    else:  # "on the left is a big red circle and at the top are two small blue squares"
        clauses = [f"{p} {'are' if pl else 'is'} {n}" for n, p, pl in zip(nps, pos, plural)]
        text = _join(clauses)
        if mention_background:
            text += bg_suffix
    return text


NUM_TEMPLATES = 6


def describe_scene(rng: random.Random, scene: Scene, num_captions: int, mention_background: bool = False) -> List[str]:
    """``num_captions`` phrasings of ``scene``, distinct whenever the vocabulary allows
    (``mention_background``: every phrasing names the background colour)."""
    captions: List[str] = []
    templates: List[int] = []
    attempts = 0
    while len(captions) < num_captions:
        if not templates:
            templates = rng.sample(range(NUM_TEMPLATES), NUM_TEMPLATES)
        text = _describe(rng, scene, templates.pop(), mention_background)
        attempts += 1
        if text not in captions or attempts > 50 * num_captions:
            captions.append(text)
    return captions


def make_stem(rng: random.Random) -> str:
    """A stem shaped like Flickr's: ``<8-10 digits>_<10 lowercase hex>``."""
    return f"{rng.randrange(10_000_000, 4_000_000_000)}_{rng.getrandbits(40):010x}"


def make_speakers(rng: random.Random, num_speakers: int, rates: Sequence[int] = None) -> List[Speaker]:
    rates = list(rates) if rates else ESPEAK_RATES
    combos = [
        Speaker(v, var, r, p) for v in ESPEAK_VOICES for var in ESPEAK_VARIANTS for r in rates for p in ESPEAK_PITCHES
    ]
    return rng.sample(combos, min(num_speakers, len(combos)))


def plan_corpus(
    seed: int,
    num_train: int,
    num_valid: int,
    num_test: int,
    captions_per_image: int = 5,
    num_speakers: int = 40,
    speech_rates: Sequence[int] = None,
) -> List[PlannedImage]:
    rng = random.Random(seed)
    speakers = make_speakers(rng, max(num_speakers, captions_per_image), speech_rates)
    splits = ["train"] * num_train + ["valid"] * num_valid + ["test"] * num_test
    seen_scenes = set()
    seen_stems = set()
    images = []
    for split in splits:
        stem = make_stem(rng)
        while stem in seen_stems:
            stem = make_stem(rng)
        seen_stems.add(stem)
        for _ in range(10_000):
            scene = sample_scene(rng)
            if scene.key() not in seen_scenes:
                break
        else:
            raise RuntimeError("could not draw a new unique scene; the corpus is too large")
        seen_scenes.add(scene.key())
        captions = describe_scene(rng, scene, captions_per_image)
        image = PlannedImage(stem=stem, split=split, scene=scene)
        image.spoken = captions
        # Flickr8k.token.txt style: capitalised, tokenised final full stop.
        image.captions = [c[0].upper() + c[1:] + " ." for c in captions]
        image.speakers = rng.sample(speakers, captions_per_image)
        images.append(image)
    return images


# ---------------------------------------------------------------------------------------------
# Rendering


def _shape_points(shape: str, cx: float, cy: float, r: float, angle_deg: float) -> List[Tuple[float, float]]:
    def polar(radii: Sequence[float], start_deg: float) -> List[Tuple[float, float]]:
        n = len(radii)
        pts = []
        for i, rad in enumerate(radii):
            a = math.radians(start_deg + angle_deg + 360.0 * i / n)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts

    if shape == "square":
        return polar([r * 1.15] * 4, 45.0)
    if shape == "triangle":
        return polar([r * 1.2] * 3, -90.0)
    if shape == "star":
        return polar([r * 1.2, r * 0.5] * 5, -90.0)
    if shape == "diamond":
        pts = polar([r * 1.2] * 4, 0.0 - angle_deg)  # diamonds stay upright, narrowed
        return [(cx + (x - cx) * 0.7, y) for x, y in pts]
    if shape == "hexagon":
        return polar([r * 1.05] * 6, 0.0)
    if shape == "cross":
        w = r * 0.38
        base = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        a = math.radians(angle_deg)
        ca, sa = math.cos(a), math.sin(a)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in base]
    raise ValueError(f"unknown shape {shape!r}")


def _group_centres(obj: SceneObject, side: float) -> Tuple[List[Tuple[float, float]], float]:
    fx, fy = POSITION_CENTRES[obj.position]
    cx, cy = (fx + obj.dx) * side, (fy + obj.dy) * side
    r = SIZE_RADII[obj.size] * side * {1: 1.0, 2: 0.66, 3: 0.54}[obj.count]
    step = 2.1 * r
    offsets = [(i - (obj.count - 1) / 2.0) * step for i in range(obj.count)]
    if obj.position in ("left", "right"):  # columns stack vertically, rows horizontally
        return [(cx, cy + o) for o in offsets], r
    return [(cx + o, cy) for o in offsets], r


def group_boxes(obj: SceneObject, image_size: float) -> List[Tuple[float, float, float, float]]:
    """The box (x0, y0, x1, y1) in pixels of each shape of a group, in an image ``image_size`` pixels
    wide, with the renderer's own geometry (where :func:`render_scene` draws it)."""
    centres, r = _group_centres(obj, float(image_size))
    boxes = []
    for cx, cy in centres:
        if obj.shape == "circle":
            points = [(cx - r, cy - r), (cx + r, cy + r)]
        else:
            points = _shape_points(obj.shape, cx, cy, r, obj.angle)
        xs, ys = zip(*points)
        boxes.append((min(xs), min(ys), max(xs), max(ys)))
    return boxes


def _shade(rgb: Sequence[int], delta: int) -> Tuple[int, int, int]:
    return tuple(max(0, min(255, c + delta)) for c in rgb)


def render_scene(scene: Scene, image_size: int, supersample: int = 2):
    from PIL import Image, ImageDraw

    side = image_size * supersample
    bg = BACKGROUNDS[scene.background][0]
    # Texture contrast is kept low so that the pattern never reads as an object.
    delta = 14 if sum(bg) / 3 < 128 else -14
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    phase = scene.pattern_phase
    if scene.pattern == "gradient":
        for y in range(side):
            t = 0.5 * (1.0 + math.cos(2.0 * math.pi * (y / side + phase)))  # smooth, no seam
            draw.line([(0, y), (side, y)], fill=_shade(bg, int(round(delta * 1.5 * t))))
    elif scene.pattern == "stripes":
        period = side / 8.0
        for k in range(-9, 18):
            x0 = (k + phase) * period
            draw.polygon(
                [(x0, 0), (x0 + period / 2, 0), (x0 + period / 2 - side, side), (x0 - side, side)],
                fill=_shade(bg, delta),
            )
    elif scene.pattern == "dots":
        period = side / 10.0
        rad = period * 0.15
        for i in range(11):
            for j in range(11):
                x, y = (i + phase) * period, (j + phase) * period
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=_shade(bg, delta))
    elif scene.pattern == "checks":
        period = side / 6.0
        for i in range(7):
            for j in range(7):
                if (i + j) % 2 == 0:
                    x, y = (i - phase) * period, (j - phase) * period
                    draw.rectangle([x, y, x + period, y + period], fill=_shade(bg, delta // 2))
    for obj in scene.objects:
        fill = COLOURS[obj.colour][0]
        outline = _shade(fill, -60 if sum(fill) > 300 else 50)
        centres, r = _group_centres(obj, side)
        width = max(1, int(round(r * 0.06)))
        for cx, cy in centres:
            if obj.shape == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
            else:
                draw.polygon(_shape_points(obj.shape, cx, cy, r, obj.angle), fill=fill, outline=outline, width=width)
    return img.resize((image_size, image_size), Image.LANCZOS)


# ---------------------------------------------------------------------------------------------
# Speech


def check_tools() -> None:
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise ToolMissingError(f"`{tool}` was not found on PATH; {INSTALL_HINT}.")


def synthesise(text: str, speaker: Speaker, out_path: str, scratch_dir: str) -> int:
    """Speak ``text`` into ``out_path`` (16 kHz mono PCM_16); returns the number of samples."""
    fd, raw = tempfile.mkstemp(suffix=".wav", dir=scratch_dir)
    os.close(fd)
    try:
        subprocess.run(
            [
                "espeak-ng",
                "-v",
                f"{speaker.voice}+{speaker.variant}",
                "-s",
                str(speaker.rate),
                "-p",
                str(speaker.pitch),
                "-w",
                raw,
                text,
            ],
            check=True,
            capture_output=True,
        )
        # -R: repeatable (fixed seeds), -D: no dither, so identical input gives identical bytes.
        subprocess.run(
            [
                "sox",
                "-R",
                "-D",
                "-q",
                raw,
                "-r",
                str(SAMPLE_RATE),
                "-c",
                "1",
                "-b",
                "16",
                "-e",
                "signed-integer",
                out_path,
            ],
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError as e:
        raise RuntimeError(
            f"{e.cmd[0]} failed (exit {e.returncode}) for {out_path!r}: {e.stderr.decode(errors='replace')}"
        ) from e
    finally:
        os.unlink(raw)
    with wave.open(out_path, "rb") as w:
        return w.getnframes()


# ---------------------------------------------------------------------------------------------
# Writing the corpus

SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "valid": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def _write_lines(path: str, lines: List[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)


def _is_nonempty_dir(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


def check_out_dir(out_dir: str, overwrite: bool) -> str:
    """The absolute ``out_dir``, refused if it is a file or a non-empty folder (unless ``overwrite``)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if _is_nonempty_dir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    return out_dir


@contextlib.contextmanager
def atomic_output_dir(out_dir: str):
    """Yields ``OUT.tmp-<pid>`` to write into; renamed to ``out_dir`` only when the block completes
    (an existing ``out_dir`` is replaced), removed if it raises."""
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    if os.path.exists(tmp_dir):
        shutil.rmtree(tmp_dir)
    os.makedirs(tmp_dir)
    try:
        yield tmp_dir
        if os.path.exists(out_dir):
            # Either empty, or --overwrite: move the old output aside before the new one lands.
            old_dir = f"{out_dir}.old-{os.getpid()}"
            os.rename(out_dir, old_dir)
            os.rename(tmp_dir, out_dir)
            shutil.rmtree(old_dir)
        else:
            os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def write_flickr_layout(
    root: str, images: List[PlannedImage], image_size: int, num_workers: int, log=print
) -> List[int]:
    """Render every image and speak every caption of ``images`` into ``root`` in the Flickr 8k
    layout (wavs, jpgs, wav2capt/wav2spk/token files, the three split lists; an image whose split
    is none of train/valid/test is rendered but listed in no split, as the real corpus's extra
    jpgs are). Returns the number of samples of each utterance, in wav2capt.txt order; ``log`` gets
    a progress line every 30 s."""
    audio_dir = os.path.join(root, "flickr_audio")
    wav_dir = os.path.join(audio_dir, "wavs")
    image_dir = os.path.join(root, "Flicker8k_Dataset")
    text_dir = os.path.join(root, "Flickr8k_text")
    scratch_dir = os.path.join(root, "scratch")
    for d in (wav_dir, image_dir, text_dir, scratch_dir):
        os.makedirs(d)

    def render(image: PlannedImage) -> None:
        render_scene(image.scene, image_size).save(os.path.join(image_dir, image.stem + ".jpg"), quality=92)

    jobs = [
        (image.spoken[n], image.speakers[n], os.path.join(wav_dir, f"{image.stem}_{n}.wav"))
        for image in images
        for n in range(len(image.spoken))
    ]
    # The work is in child processes (espeak-ng, sox) and PIL's C code, so threads suffice.
    with ThreadPoolExecutor(num_workers) as pool:
        list(pool.map(render, images))
        progress = CountProgress("spoken captions", len(jobs), "written", log)
        num_samples = []
        for samples in pool.map(lambda job: synthesise(*job, scratch_dir), jobs):
            num_samples.append(samples)
            progress.update(len(num_samples))
    os.rmdir(scratch_dir)

    wav2capt, wav2spk, tokens = [], [], []
    for image in images:
        for n in range(len(image.spoken)):
            wav = f"{image.stem}_{n}.wav"
            wav2capt.append(f"{wav} {image.stem}.jpg #{n}")
            wav2spk.append(f"{wav} {image.speakers[n].name}")
            tokens.append(f"{image.stem}.jpg#{n}\t{image.captions[n]}")
    _write_lines(os.path.join(audio_dir, "wav2capt.txt"), wav2capt)
    _write_lines(os.path.join(audio_dir, "wav2spk.txt"), wav2spk)
    _write_lines(os.path.join(text_dir, "Flickr8k.token.txt"), tokens)
    for split, name in SPLIT_FILES.items():
        _write_lines(os.path.join(text_dir, name), [f"{im.stem}.jpg" for im in images if im.split == split])
    return num_samples


def scene_record(scene: Scene) -> Dict:
    """What scene_corpus.json records of a scene (the described attributes, and the pattern)."""
    return {
        "background": scene.background,
        "pattern": scene.pattern,
        "objects": [{k: v for k, v in asdict(o).items() if k not in ("dx", "dy", "angle")} for o in scene.objects],
    }


def generate_corpus(
    out_dir: str,
    seed: int = 1,
    num_train: int = 400,
    num_valid: int = 50,
    num_test: int = 100,
    captions_per_image: int = 5,
    image_size: int = 224,
    num_speakers: int = 40,
    num_workers: int = 0,
    overwrite: bool = False,
    speech_rates: Sequence[int] = None,
    log=print,
) -> Dict:
    """Write the corpus to ``out_dir``; returns a summary dict."""
    check_tools()
    if speech_rates is not None and (not speech_rates or min(speech_rates) < 80 or max(speech_rates) > 500):
        raise ValueError(f"speech rates must be words per minute in [80, 500], got {speech_rates}")
    if captions_per_image < 1 or min(num_train, num_valid, num_test) < 0 or num_train + num_valid + num_test < 1:
        raise ValueError("need at least one image and one caption per image")
    out_dir = check_out_dir(out_dir, overwrite)
    num_workers = num_workers or min(8, os.cpu_count() or 1)

    start = time.time()
    images = plan_corpus(seed, num_train, num_valid, num_test, captions_per_image, num_speakers, speech_rates)

    with atomic_output_dir(out_dir) as tmp_dir:
        num_samples = write_flickr_layout(tmp_dir, images, image_size, num_workers, log)
        speakers_used = sorted({s.name for im in images for s in im.speakers})
        summary = {
            "out_dir": out_dir,
            "seed": seed,
            "images": {split: sum(im.split == split for im in images) for split in SPLIT_FILES},
            "captions_per_image": captions_per_image,
            "utterances": len(num_samples),
            "speakers": len(speakers_used),
            "audio_hours": round(sum(num_samples) / SAMPLE_RATE / 3600.0, 4),
            "image_size": image_size,
            "speech_rates": sorted(set(speech_rates or ESPEAK_RATES)),
        }
        meta = dict(summary)
        meta.pop("out_dir")
        meta["generator"] = "examples/generate_scene_corpus.py"
        meta["scenes"] = {im.stem: {"split": im.split, **scene_record(im.scene)} for im in images}
        with open(os.path.join(tmp_dir, "scene_corpus.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, sort_keys=True)

    summary["seconds"] = round(time.time() - start, 1)
    summary["sample_captions"] = [c for im in images[:2] for c in im.captions]
    return summary


def format_summary(summary: Dict) -> str:
    """What the CLI prints of :func:`generate_corpus`'s summary (the splits named train / valid / test)."""
    im = summary["images"]
    lines = [
        f"Wrote {summary['out_dir']} in {summary['seconds']} s (seed {summary['seed']}):",
        f"  images: {im['train']} train / {im['valid']} valid / {im['test']} test, "
        f"{summary['image_size']}x{summary['image_size']} jpg",
        f"  utterances: {summary['utterances']} ({summary['captions_per_image']} per image), "
        f"{summary['speakers']} speakers, {summary['audio_hours'] * 60:.1f} min of 16 kHz audio",
        "  sample captions:",
    ]
    lines += [f"    {caption}" for caption in summary["sample_captions"]]
    return "\n".join(lines)
