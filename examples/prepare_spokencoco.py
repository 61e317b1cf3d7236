#!/usr/bin/env python3
"""Write speech-image manifests (train / valid / test) for SpokenCOCO on the Karpathy split.

Inputs, as the archives unpack:
  SpokenCOCO/      SpokenCOCO_train.json, SpokenCOCO_val.json, wavs/{train,val}/<n>/<uttid>.wav
  COCO2014/        train2014/, val2014/ (the "image" of a SpokenCOCO record is relative to this)
  the Karpathy split, either Karpathy's dataset_coco.json (--karpathy-split; train = train +
  restval, valid = val, test = test; joined on "filepath/filename" == SpokenCOCO "image") or a
  folder of SpokenCOCO-schema split files (--karpathy-split-dir) named
  SpokenCOCO_ksplit_{train,val,test}.json or SpokenCOCO_{train,val,test}_karpathy.json.

The utterances come from SpokenCOCO_train.json + SpokenCOCO_val.json; the split decides which
split each image (and so each of its captions) belongs to. Both the usual records
(``"captions": [...]``) and the "unrolled" variant (one ``"caption"`` per record) are read;
unknown keys are ignored. Every image is decoded (threaded; JPEGs in draft mode) unless
--no-check-images; only audio headers are read. Nothing is written unless every split is valid.

Example:
  python examples/prepare_spokencoco.py --spokencoco-dir /data/SpokenCOCO \\
      --coco-image-root /data/COCO2014 --karpathy-split /data/dataset_coco.json --out-dir manifests/spokencoco
"""

import argparse
import json
import os
import posixpath
import sys
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Tuple

try:
    import cmd_plugin  # noqa: F401
except ImportError:  # run as a script from anywhere: the repository root holds cmd_plugin/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmd_plugin.data.corpus_utils import (  # noqa: E402
    SPLIT_NAMES,
    check_images,
    check_images_exist,
    check_unique,
    format_summary,
    probe_audio,
    require_file,
    write_splits,
)
from cmd_plugin.data.manifest import ManifestError, SpeechImageManifest  # noqa: E402

MASTER_FILES = ("SpokenCOCO_train.json", "SpokenCOCO_val.json")
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "valid", "test": "test"}
SPLIT_FILE_NAMES = {
    "train": ("SpokenCOCO_ksplit_train.json", "SpokenCOCO_train_karpathy.json"),
    "valid": ("SpokenCOCO_ksplit_val.json", "SpokenCOCO_val_karpathy.json"),
    "test": ("SpokenCOCO_ksplit_test.json", "SpokenCOCO_test_karpathy.json"),
}


class Utterance:
    __slots__ = ("wav", "image", "speaker", "text", "where", "key")

    def __init__(self, wav: str, image: str, speaker: str, text: str, where: str):
        self.wav, self.image, self.speaker, self.text, self.where = wav, image, speaker, text, where
        self.key = image_key(image)


def image_key(path: str) -> str:
    """Normalised relative image path used to join the split with SpokenCOCO records."""
    return posixpath.normpath(path.strip().replace("\\", "/"))


def load_json(path: str):
    require_file(path, "JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def iter_records(path: str, content) -> Iterator[Tuple[str, List[dict], bool, str]]:
    """(image, captions, unrolled, where) for each record of a SpokenCOCO-schema file."""
    records = content.get("data") if isinstance(content, dict) else content
    if not isinstance(records, list):
        raise ManifestError(f"{path}: expected a SpokenCOCO JSON object with a 'data' list of records")
    for i, record in enumerate(records):
        where = f"{path}: data[{i}]"
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise ManifestError(f"{where}: record has no 'image' path")
        if isinstance(record.get("captions"), list):
            yield record["image"], record["captions"], False, where
        elif isinstance(record.get("caption"), dict):
            yield record["image"], [record["caption"]], True, where
        else:
            raise ManifestError(f"{where}: record has neither a 'captions' list nor a 'caption' object")


def read_utterances(spokencoco_dir: str) -> List[Utterance]:
    utterances = []
    for name in MASTER_FILES:
        path = os.path.join(spokencoco_dir, name)
        for image, captions, unrolled, where in iter_records(path, load_json(path)):
            for j, caption in enumerate(captions):
                cwhere = where if unrolled else f"{where}.captions[{j}]"
                if not isinstance(caption, dict) or not isinstance(caption.get("wav"), str):
                    raise ManifestError(f"{cwhere}: caption has no 'wav' path")
                uttid = caption.get("uttid") or os.path.splitext(os.path.basename(caption["wav"]))[0]
                speaker = caption.get("speaker") or uttid.split("-")[0]
                text = caption.get("text") or ""
                utterances.append(Utterance(caption["wav"], image, str(speaker), str(text), cwhere))
    check_unique(((posixpath.normpath(u.wav), u.where) for u in utterances), "wav")
    return utterances


SplitLists = Dict[str, List[Tuple[str, str]]]


def read_karpathy_json(path: str) -> SplitLists:
    """Per split: (image key, where it is listed) in file order."""
    content = load_json(path)
    images = content.get("images") if isinstance(content, dict) else None
    if not isinstance(images, list):
        raise ManifestError(f"{path}: expected Karpathy's dataset_coco.json with an 'images' list")
    splits: SplitLists = {name: [] for name in SPLIT_NAMES}
    for i, entry in enumerate(images):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or "filename" not in entry or "split" not in entry:
            raise ManifestError(f"{where}: entry needs 'filepath', 'filename' and 'split'")
        if entry["split"] not in KARPATHY_SPLITS:
            raise ManifestError(
                f"{where}: unknown split {entry['split']!r} (expected one of {', '.join(KARPATHY_SPLITS)})"
            )
        key = image_key(posixpath.join(entry.get("filepath", ""), entry["filename"]))
        splits[KARPATHY_SPLITS[entry["split"]]].append((key, where))
    return splits


def find_split_files(split_dir: str) -> Dict[str, str]:
    found = {}
    for split, names in SPLIT_FILE_NAMES.items():
        for name in names:
            if os.path.isfile(os.path.join(split_dir, name)):
                found[split] = os.path.join(split_dir, name)
                break
        else:
            raise ManifestError(
                f"{split_dir}: no {split} split file (looked for {' or '.join(names)}; "
                "or pass Karpathy's dataset_coco.json with --karpathy-split)"
            )
    return found


def read_split_files(split_dir: str) -> SplitLists:
    splits: SplitLists = {}
    for split, path in find_split_files(split_dir).items():
        entries, seen = [], set()
        for image, _, unrolled, where in iter_records(path, load_json(path)):
            key = image_key(image)
            if unrolled and key in seen:  # one record per caption: the image repeats by design
                continue
            entries.append((key, where))  # a repeat of a "captions" record is a duplicate (checked later)
            seen.add(key)
        splits[split] = entries
    return splits


def read_split(karpathy_split: Optional[str], karpathy_split_dir: Optional[str]):
    if karpathy_split_dir is not None:
        if os.path.isfile(os.path.join(karpathy_split_dir, "dataset_coco.json")):
            return read_karpathy_json(os.path.join(karpathy_split_dir, "dataset_coco.json"))
        return read_split_files(karpathy_split_dir)
    if os.path.isdir(karpathy_split):
        return read_split(None, karpathy_split)
    return read_karpathy_json(karpathy_split)


def resolve_spokencoco_dir(spokencoco_dir: str) -> str:
    if not os.path.isfile(os.path.join(spokencoco_dir, MASTER_FILES[0])):
        nested = os.path.join(spokencoco_dir, "SpokenCOCO")
        if os.path.isfile(os.path.join(nested, MASTER_FILES[0])):
            spokencoco_dir = nested
    return os.path.abspath(spokencoco_dir)


def build_splits(
    spokencoco_dir: str,
    coco_image_root: str,
    karpathy_split: Optional[str] = None,
    karpathy_split_dir: Optional[str] = None,
    workers: int = 8,
    show_progress: bool = True,
    log=print,
    check_image_data: bool = True,
) -> Dict[str, SpeechImageManifest]:
    """Read and check the corpus; return the three splits (nothing is written here).

    ``check_image_data`` decodes every image; otherwise images are only checked to exist."""
    if (karpathy_split is None) == (karpathy_split_dir is None):
        raise ManifestError("give exactly one of --karpathy-split and --karpathy-split-dir")
    spokencoco_dir = resolve_spokencoco_dir(spokencoco_dir)
    coco_image_root = os.path.abspath(coco_image_root)

    split_lists = read_split(karpathy_split, karpathy_split_dir)
    check_unique((entry for split in SPLIT_NAMES for entry in split_lists[split]), "image in the split")
    split_of = {key: split for split in SPLIT_NAMES for key, _ in split_lists[split]}
    listed_at = {key: where for split in SPLIT_NAMES for key, where in split_lists[split]}
    # SpokenCOCO and the split normally agree on "<folder>2014/<file>"; COCO file names are unique,
    # so the bare file name is a safe second key for a copy that prefixes paths differently.
    key_of_basename = {posixpath.basename(key): key for key in split_of}
    source = karpathy_split or karpathy_split_dir

    utterances = read_utterances(spokencoco_dir)
    per_image: Dict[str, List[Utterance]] = defaultdict(list)
    image_of_key: Dict[str, str] = {}  # one relative path per image, as SpokenCOCO first names it
    for u in utterances:
        if u.key not in split_of:
            u.key = key_of_basename.get(posixpath.basename(u.key), u.key)
        if u.key not in split_of:
            raise ManifestError(
                f"{u.where}: caption {u.wav!r} is of image {u.image!r}, which is in no split of {source}"
            )
        per_image[u.key].append(u)
        image_of_key.setdefault(u.key, u.image)

    # an error names the first caption record that needs the image and the split entry listing it
    image_items = [
        (os.path.join(coco_image_root, image), f"{per_image[key][0].where} ({listed_at[key]}, split {split_of[key]!r})")
        for key, image in image_of_key.items()
    ]
    if check_image_data:
        check_images(image_items, workers=workers, show_progress=show_progress)
    else:
        check_images_exist(image_items)

    splits = {}
    for split in SPLIT_NAMES:
        chosen: List[Utterance] = []
        without_audio = 0
        for key, _ in split_lists[split]:
            if key in per_image:
                chosen.extend(per_image[key])
            else:
                without_audio += 1
        if without_audio:
            log(f"warning: {without_audio} image(s) of split {split!r} have no spoken caption")
        if not chosen:
            raise ManifestError(f"{source}: split {split!r} has no utterance (no image of it has a SpokenCOCO caption)")
        sizes = probe_audio(
            [(os.path.join(spokencoco_dir, u.wav), u.where) for u in chosen],
            workers=workers,
            show_progress=show_progress,
            desc=f"{split} audio headers",
        )
        splits[split] = SpeechImageManifest(
            audio_root=spokencoco_dir,
            audio_paths=[u.wav for u in chosen],
            num_samples=sizes,
            image_root=coco_image_root,
            image_paths=[image_of_key[u.key] for u in chosen],
            speakers=[u.speaker for u in chosen],
            texts=[u.text for u in chosen],
        )
    return splits


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write train/valid/test speech-image manifests for SpokenCOCO on the Karpathy split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--spokencoco-dir",
        required=True,
        help="the unpacked SpokenCOCO/ folder (SpokenCOCO_{train,val}.json and wavs/)",
    )
    parser.add_argument(
        "--coco-image-root",
        required=True,
        help="folder holding COCO 2014 train2014/ and val2014/ (SpokenCOCO 'image' is relative to it)",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--karpathy-split", help="Karpathy's dataset_coco.json")
    group.add_argument(
        "--karpathy-split-dir",
        help="folder with SpokenCOCO_ksplit_{train,val,test}.json or SpokenCOCO_{train,val,test}_karpathy.json",
    )
    parser.add_argument(
        "--out-dir", default="manifests/spokencoco", help="where train/valid/test .tsv/.img/.spk/.wrd are written"
    )
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
            args.spokencoco_dir,
            args.coco_image_root,
            karpathy_split=args.karpathy_split,
            karpathy_split_dir=args.karpathy_split_dir,
            workers=args.workers,
            show_progress=not args.no_progress,
            check_image_data=not args.no_check_images,
        )
        write_splits(args.out_dir, splits)
    except ManifestError as exc:
        print(f"{os.path.basename(sys.argv[0] or 'prepare_spokencoco.py')}: error: {exc}", file=sys.stderr)
        print("nothing was written", file=sys.stderr)
        return 1
    print(format_summary(splits))
    print(f"wrote {', '.join(splits)} to {os.path.abspath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
