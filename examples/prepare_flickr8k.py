#!/usr/bin/env python3
"""Write speech-image manifests (train / valid / test) for the Flickr 8k Audio Caption Corpus.

Inputs, as the archives unpack:
  flickr_audio/        wavs/<image stem>_<n>.wav, wav2capt.txt, wav2spk.txt
  Flicker8k_Dataset/   the jpgs (also accepted: Flickr8k_Dataset/, Images/, or a parent of one)
  Flickr8k_text/       Flickr_8k.{train,dev,test}Images.txt, Flickr8k.token.txt (flat folder)

Splits follow Flickr_8k.{train,dev,test}Images.txt (6000 / 1000 / 1000 images, 5 spoken captions
each). Every utterance gets its image (.img), speaker (.spk, from wav2spk.txt) and caption text
(.wrd, from Flickr8k.token.txt key ``<image>.jpg#<n>`` for the wav's caption index n).
Every image is decoded (threaded; JPEGs in draft mode) unless --no-check-images; only audio
headers are read. Nothing is written unless every split is valid.

Example:
  python examples/prepare_flickr8k.py --audio-dir /data/flickr_audio \\
      --image-dir /data/Flicker8k_Dataset --text-dir /data/Flickr8k_text --out-dir manifests/flickr8k
"""

import argparse
import os
import re
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

try:
    import cmd_plugin  # noqa: F401
except ImportError:  # run as a script from anywhere: the repository root holds cmd_plugin/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmd_plugin.data.corpus_utils import (  # noqa: E402
    SPLIT_NAMES,
    check_images,
    check_images_exist,
    check_unique,
    find_first_dir,
    format_summary,
    probe_audio,
    require_file,
    write_splits,
)
from cmd_plugin.data.manifest import ManifestError, SpeechImageManifest  # noqa: E402

IMAGE_DIR_NAMES = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "valid": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
TOKEN_FILE = "Flickr8k.token.txt"
TOKEN_KEY = re.compile(r"^(?P<image>[^#\s]+\.jpg)#(?P<index>\d+)$")


def _lines(path: str):
    """(line number, stripped line) for every non-blank line of ``path``."""
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if line:
                yield lineno, line


def resolve_image_dir(image_dir: str) -> str:
    found = find_first_dir(image_dir, IMAGE_DIR_NAMES)
    if found is None or not os.path.isdir(found):
        # a folder of jpgs under any other name is accepted as is
        if os.path.isdir(image_dir) and any(n.lower().endswith(".jpg") for n in os.listdir(image_dir)):
            return os.path.abspath(image_dir)
        raise ManifestError(
            f"{image_dir}: no Flickr8k image folder here (looked for jpgs and for {', '.join(IMAGE_DIR_NAMES)})"
        )
    return os.path.abspath(found)


def resolve_audio_dir(audio_dir: str) -> str:
    if not os.path.isfile(os.path.join(audio_dir, "wav2capt.txt")):
        nested = os.path.join(audio_dir, "flickr_audio")
        if os.path.isfile(os.path.join(nested, "wav2capt.txt")):
            audio_dir = nested
    require_file(os.path.join(audio_dir, "wav2capt.txt"), "wav2capt.txt of the Flickr 8k Audio Caption Corpus")
    return os.path.abspath(audio_dir)


def resolve_text_dir(text_dir: str) -> str:
    if not os.path.isfile(os.path.join(text_dir, TOKEN_FILE)):
        nested = os.path.join(text_dir, "Flickr8k_text")
        if os.path.isfile(os.path.join(nested, TOKEN_FILE)):
            text_dir = nested
    return os.path.abspath(text_dir)


def read_split_lists(text_dir: str, wanted: Sequence[str] = SPLIT_NAMES) -> Tuple[Dict[str, List[str]], Dict[str, str]]:
    """Image filenames of each split (an image may appear once over all split files), and
    where each is listed ('<split file>:<line>'). A split outside ``wanted`` may be empty."""
    splits, entries = {}, []
    for split in SPLIT_NAMES:
        path = require_file(os.path.join(text_dir, SPLIT_FILES[split]), f"Flickr8k {split} split list")
        images = []
        for lineno, line in _lines(path):
            images.append(line)
            entries.append((line, f"{path}:{lineno}"))
        if not images and split in wanted:
            raise ManifestError(f"{path}: split list is empty (split {split!r})")
        splits[split] = images
    check_unique(entries, "image in the split lists")
    return splits, dict(entries)


def read_captions(text_dir: str) -> Tuple[Dict[Tuple[str, int], str], List[str]]:
    """Caption text keyed by (image filename, caption index); also the keys that do not parse."""
    path = require_file(os.path.join(text_dir, TOKEN_FILE), "Flickr8k caption file")
    captions: Dict[Tuple[str, int], str] = {}
    where: Dict[Tuple[str, int], str] = {}
    skipped = []
    for lineno, line in _lines(path):
        key, sep, text = line.partition("\t")
        if not sep:  # tolerate a copy whose tabs became spaces
            key, sep, text = line.partition(" ")
        match = TOKEN_KEY.match(key.strip())
        if match is None:
            # e.g. the known bogus key "2258277193_586949ec62.jpg.1#0" with no image behind it
            skipped.append(f"{path}:{lineno}: {key.strip()!r}")
            continue
        k = (match["image"], int(match["index"]))
        if k in captions:
            raise ManifestError(f"{path}:{lineno}: duplicate caption key {key.strip()!r} (already at {where[k]})")
        captions[k] = text.strip()
        where[k] = f"{path}:{lineno}"
    return captions, skipped


def read_wav2capt(path: str) -> List[Tuple[str, str, int, str]]:
    """(wav name, image filename, caption index, 'file:line') per line of wav2capt.txt."""
    rows = []
    for lineno, line in _lines(path):
        parts = line.split()
        if len(parts) == 2 and "#" in parts[1]:  # "<image>.jpg#<n>" written without a space
            image, _, index = parts[1].partition("#")
            parts = [parts[0], image, "#" + index]
        if len(parts) != 3 or not parts[2].lstrip("#").isdigit():
            raise ManifestError(f"{path}:{lineno}: expected '<wav> <image>.jpg #<caption index>', got {line!r}")
        rows.append((parts[0], parts[1], int(parts[2].lstrip("#")), f"{path}:{lineno}"))
    check_unique(((wav, w) for wav, _, _, w in rows), "wav")
    return rows


def read_wav2spk(path: str) -> Dict[str, str]:
    speakers, entries = {}, []
    for lineno, line in _lines(path):
        parts = line.split()
        if len(parts) != 2:
            raise ManifestError(f"{path}:{lineno}: expected '<wav> <speaker id>', got {line!r}")
        speakers[parts[0]] = parts[1]
        entries.append((parts[0], f"{path}:{lineno}"))
    check_unique(entries, "wav")
    return speakers


def build_splits(
    audio_dir: str,
    image_dir: str,
    text_dir: str,
    with_text: bool = True,
    with_speakers: bool = True,
    workers: int = 8,
    show_progress: bool = True,
    log=print,
    check_image_data: bool = True,
    splits: Sequence[str] = SPLIT_NAMES,
) -> Dict[str, SpeechImageManifest]:
    """Read and check the corpus; return the splits named in ``splits`` (by default all three;
    nothing is written here). Captions of the other splits are not read further.

    ``check_image_data`` decodes every image; otherwise images are only checked to exist."""
    unknown = [s for s in splits if s not in SPLIT_NAMES]
    if unknown or not splits:
        raise ManifestError(f"splits must be some of {', '.join(SPLIT_NAMES)}, got {', '.join(splits) or 'none'}")
    wanted = [s for s in SPLIT_NAMES if s in splits]
    audio_dir = resolve_audio_dir(audio_dir)
    image_dir = resolve_image_dir(image_dir)
    text_dir = resolve_text_dir(text_dir)
    wav_dir = os.path.join(audio_dir, "wavs")
    if not os.path.isdir(wav_dir):
        raise ManifestError(f"{wav_dir}: folder of wavs not found")

    split_images, listed_at = read_split_lists(text_dir, wanted)
    split_of = {image: split for split, images in split_images.items() for image in images}

    rows = read_wav2capt(os.path.join(audio_dir, "wav2capt.txt"))
    speakers: Optional[Dict[str, str]] = None
    spk_path = os.path.join(audio_dir, "wav2spk.txt")
    if with_speakers:
        speakers = read_wav2spk(require_file(spk_path, "wav2spk.txt (use --no-speakers to go without)"))
    captions: Optional[Dict[Tuple[str, int], str]] = None
    if with_text:
        captions, skipped = read_captions(text_dir)
        if skipped:
            log(
                f"warning: skipped {len(skipped)} caption key(s) that are not '<image>.jpg#<n>': {skipped[0]}"
                + (" ..." if len(skipped) > 1 else "")
            )

    per_image: Dict[str, List[Tuple[int, str, str]]] = defaultdict(list)
    for wav, image, index, where in rows:
        if image not in split_of:
            raise ManifestError(
                f"{where}: caption {wav!r} is of image {image!r}, which is in none of the split lists "
                f"({', '.join(SPLIT_FILES.values())} in {text_dir})"
            )
        if split_of[image] not in wanted:
            continue
        if speakers is not None and wav not in speakers:
            raise ManifestError(f"{where}: wav {wav!r} has no speaker in {spk_path} (use --no-speakers to go without)")
        if captions is not None and (image, index) not in captions:
            raise ManifestError(
                f"{where}: no caption text for key '{image}#{index}' in {os.path.join(text_dir, TOKEN_FILE)} "
                "(use --no-text to go without)"
            )
        per_image[image].append((index, wav, where))

    # images are checked once each, in split order; an error names the caption line that needs
    # the image and the split-list line that lists it
    image_items = [
        (os.path.join(image_dir, image), f"{per_image[image][0][2]} ({listed_at[image]}, split {split!r})")
        for split in wanted
        for image in split_images[split]
        if image in per_image
    ]
    if check_image_data:
        check_images(image_items, workers=workers, show_progress=show_progress)
    else:
        check_images_exist(image_items)

    manifests = {}
    for split in wanted:
        utterances = []  # (wav, image, caption index, where) in split-list order, captions by index
        without_audio = 0
        for image in split_images[split]:
            if image not in per_image:
                without_audio += 1
                continue
            utterances.extend((wav, image, index, where) for index, wav, where in sorted(per_image[image]))
        if without_audio:
            log(f"warning: {without_audio} image(s) of split {split!r} have no spoken caption")
        if not utterances:
            raise ManifestError(
                f"{os.path.join(text_dir, SPLIT_FILES[split])}: split {split!r} has no utterance "
                f"(none of its images is in {os.path.join(audio_dir, 'wav2capt.txt')})"
            )
        sizes = probe_audio(
            [(os.path.join(wav_dir, wav), where) for wav, _, _, where in utterances],
            workers=workers,
            show_progress=show_progress,
            desc=f"{split} audio headers",
        )
        manifests[split] = SpeechImageManifest(
            audio_root=wav_dir,
            audio_paths=[u[0] for u in utterances],
            num_samples=sizes,
            image_root=image_dir,
            image_paths=[u[1] for u in utterances],
            speakers=[speakers[u[0]] for u in utterances] if speakers is not None else None,
            texts=[captions[(u[1], u[2])] for u in utterances] if captions is not None else None,
        )
    return manifests


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write train/valid/test speech-image manifests for the Flickr 8k Audio Caption Corpus.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--audio-dir", required=True, help="the unpacked flickr_audio/ folder (holds wavs/, wav2capt.txt, wav2spk.txt)"
    )
    parser.add_argument(
        "--image-dir",
        required=True,
        help="the Flickr8k jpg folder (Flicker8k_Dataset/, Flickr8k_Dataset/ or Images/), "
        "or a folder that contains one of them",
    )
    parser.add_argument(
        "--text-dir",
        required=True,
        help="the unpacked Flickr8k_text folder (Flickr_8k.*Images.txt, Flickr8k.token.txt)",
    )
    parser.add_argument(
        "--out-dir", default="manifests/flickr8k", help="where train/valid/test .tsv/.img/.spk/.wrd are written"
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=SPLIT_NAMES,
        default=list(SPLIT_NAMES),
        help="the splits to write (e.g. `--splits test` for a test-only set such as "
        "generate_minimal_pairs.py writes); the others' split lists may be empty",
    )
    parser.add_argument("--no-text", action="store_true", help="do not write .wrd caption text")
    parser.add_argument("--no-speakers", action="store_true", help="do not write .spk speaker ids")
    parser.add_argument("--workers", type=int, default=8, help="threads reading audio headers and decoding images")
    parser.add_argument(
        "--no-check-images",
        action="store_true",
        help="only check that images exist, do not decode them (for data known to be intact)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        splits = build_splits(
            args.audio_dir,
            args.image_dir,
            args.text_dir,
            with_text=not args.no_text,
            with_speakers=not args.no_speakers,
            workers=args.workers,
            show_progress=not args.no_progress,
            check_image_data=not args.no_check_images,
            splits=args.splits,
        )
        write_splits(args.out_dir, splits)
    except ManifestError as exc:
        print(f"{os.path.basename(sys.argv[0] or 'prepare_flickr8k.py')}: error: {exc}", file=sys.stderr)
        print("nothing was written", file=sys.stderr)
        return 1
    print(format_summary(splits))
    print(f"wrote {', '.join(splits)} to {os.path.abspath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
