"""Speech-image manifests: fairseq's audio ``.tsv`` plus parallel files.

A split ``{split}`` in a manifest directory is made of (see ``manifests/README.md``):

* ``{split}.tsv`` -- first line: audio root; then ``<wav relative to root>\\t<num samples>``.
* ``{split}.img`` -- first line: image root; then one image path (relative to that root)
  per utterance, in the order of the ``.tsv``. The relative path is the image's identity:
  utterances with the same path are captions of the same image (positives of each other).
* ``{split}.spk`` -- optional, one speaker id per utterance.
* ``{split}.wrd`` -- optional, the caption text per utterance (fairseq's word-label name).

This module has no fairseq dependency so that preparation scripts and tests can use it alone.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from ..files import atomic_write_all


class ManifestError(ValueError):
    """Bad manifest or corpus input; the message names the file and line (or key)."""


@dataclass
class SpeechImageManifest:
    audio_root: str
    audio_paths: List[str]
    num_samples: List[int]
    image_root: str
    image_paths: List[str]
    speakers: Optional[List[str]] = None
    texts: Optional[List[str]] = None
    # the files the manifest was read from (set by read_manifest): errors name their lines
    tsv_file: Optional[str] = None
    img_file: Optional[str] = None

    def __post_init__(self):
        n = len(self.audio_paths)
        for name in ("num_samples", "image_paths", "speakers", "texts"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ManifestError(
                    f"manifest field {name!r} has {len(value)} entries, expected {n} (one per utterance)"
                )

    def __len__(self) -> int:
        return len(self.audio_paths)

    @property
    def unique_images(self) -> List[str]:
        """Distinct image paths in order of first appearance."""
        return list(dict.fromkeys(self.image_paths))

    @property
    def image_ids(self) -> np.ndarray:
        """(N,) int64: index of each utterance's image in ``unique_images``."""
        index = {path: i for i, path in enumerate(self.unique_images)}
        return np.array([index[p] for p in self.image_paths], dtype=np.int64)

    def audio_path(self, i: int) -> str:
        return os.path.join(self.audio_root, self.audio_paths[i])

    def image_path(self, relative: str) -> str:
        return os.path.join(self.image_root, relative)

    def audio_where(self, row: int) -> str:
        """'<split>.tsv:<line>' of utterance ``row`` (0-based; line 1 is the root)."""
        return f"{self.tsv_file}:{row + 2}" if self.tsv_file else f"utterance {row} of the manifest"

    def image_where(self, relative: str) -> str:
        """'<split>.img:<line>' of the first utterance that names image ``relative``."""
        try:
            row = self.image_paths.index(relative)
        except ValueError:
            return f"image {relative!r} (not in the manifest)"
        return f"{self.img_file}:{row + 2}" if self.img_file else f"utterance {row} of the manifest"


def _missing_in_chunk(chunk: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
    return [(where, path) for where, path in chunk if not os.path.isfile(path)]


def missing_files(manifest: SpeechImageManifest, images: bool = True, workers: int = 8) -> List[Tuple[str, str]]:
    """(where, path) of every listed wav (and, with ``images``, every distinct image) that is not
    a file, in manifest order. Only ``stat`` calls, in a thread pool (network file systems)."""
    items = [(manifest.audio_where(i), manifest.audio_path(i)) for i in range(len(manifest))]
    if images:
        seen = set()
        for row, rel in enumerate(manifest.image_paths):
            if rel not in seen:
                seen.add(rel)
                where = f"{manifest.img_file}:{row + 2}" if manifest.img_file else f"utterance {row}"
                items.append((where, manifest.image_path(rel)))
    chunks = [items[i : i + 4096] for i in range(0, len(items), 4096)]
    if workers <= 1 or len(chunks) <= 1:
        return [m for chunk in chunks for m in _missing_in_chunk(chunk)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [m for found in pool.map(_missing_in_chunk, chunks) for m in found]


def check_files_exist(manifest: SpeechImageManifest, images: bool = True, show: int = 5) -> None:
    """Raise :class:`ManifestError` listing the count and the first ``show`` missing files."""
    missing = missing_files(manifest, images=images)
    if missing:
        what = "wavs and images" if images else "wavs"
        listing = "\n".join(f"  {where}: {path}" for where, path in missing[:show])
        more = f"\n  ... and {len(missing) - show} more" if len(missing) > show else ""
        raise ManifestError(
            f"{len(missing)} of the files listed in {manifest.tsv_file or 'the manifest'}"
            f"{' / ' + manifest.img_file if images and manifest.img_file else ''} are missing "
            f"(checked {what}; moved or deleted since preparation?):\n{listing}{more}"
        )


def _read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def _read_rooted(path: str, with_sizes: bool):
    lines = _read_lines(path)
    if not lines or not lines[0].strip():
        raise ManifestError(f"{path}:1: expected the root directory on the first line")
    root = lines[0].strip()
    items, sizes = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            raise ManifestError(f"{path}:{lineno}: empty line")
        if with_sizes:
            parts = line.split("\t")
            if len(parts) != 2 or not parts[1].strip().isdigit():
                raise ManifestError(
                    f"{path}:{lineno}: expected '<relative wav path>\\t<number of samples>', got {line!r}"
                )
            items.append(parts[0])
            sizes.append(int(parts[1]))
        else:
            items.append(line)
    return root, items, sizes


def _read_parallel(path: str, expected: int, tsv_path: str) -> List[str]:
    lines = _read_lines(path)
    if len(lines) != expected:
        raise ManifestError(f"{path}: has {len(lines)} lines, expected {expected} (one per utterance of {tsv_path})")
    return lines


def available_splits(data_dir: str) -> List[str]:
    """The splits of manifest directory ``data_dir``: names with both a ``.tsv`` and an ``.img`` file."""
    try:
        names = os.listdir(data_dir)
    except OSError:
        return []
    return sorted(n[: -len(".tsv")] for n in names if n.endswith(".tsv") and n[: -len(".tsv")] + ".img" in names)


def check_split(data_dir: str, split: str) -> None:
    """Raise :class:`ManifestError` unless ``data_dir`` holds split ``split``, naming the splits it has.

    Cheap (the directory's listing): scripts call it before loading a model."""
    if not os.path.isdir(data_dir):
        raise ManifestError(f"{data_dir}: no such manifest directory (looking for split {split!r})")
    for ext in ("tsv", "img"):
        path = os.path.join(data_dir, f"{split}.{ext}")
        if not os.path.isfile(path):
            splits = available_splits(data_dir)
            there = f"splits there: {', '.join(splits)}" if splits else "no split there (<split>.tsv + <split>.img)"
            raise ManifestError(f"{path}: missing (split {split!r} of manifest directory {data_dir}; {there})")


def read_manifest(data_dir: str, split: str) -> SpeechImageManifest:
    """Read split ``split`` from ``data_dir``; raise :class:`ManifestError` naming file:line."""
    tsv = os.path.join(data_dir, f"{split}.tsv")
    img = os.path.join(data_dir, f"{split}.img")
    check_split(data_dir, split)
    audio_root, audio_paths, num_samples = _read_rooted(tsv, with_sizes=True)
    image_root, image_paths, _ = _read_rooted(img, with_sizes=False)
    if len(image_paths) != len(audio_paths):
        raise ManifestError(
            f"{img}: has {len(image_paths)} image lines, expected {len(audio_paths)} "
            f"(one per utterance of {tsv}, after the root line)"
        )
    optional = {}
    for ext, name in (("spk", "speakers"), ("wrd", "texts")):
        path = os.path.join(data_dir, f"{split}.{ext}")
        optional[name] = _read_parallel(path, len(audio_paths), tsv) if os.path.isfile(path) else None
    return SpeechImageManifest(
        audio_root=audio_root,
        audio_paths=audio_paths,
        num_samples=num_samples,
        image_root=image_root,
        image_paths=image_paths,
        **optional,
        tsv_file=tsv,
        img_file=img,
    )


def _lines_writer(lines: List[str]):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")

    return write


def write_manifest(data_dir: str, split: str, manifest: SpeechImageManifest) -> None:
    """Write all files of a split to temporary names first, then rename them into place.

    If anything fails while writing, no file of the split is replaced or left half-written.
    """
    if len(manifest) == 0:
        raise ManifestError(f"split {split!r} for {data_dir} is empty: refusing to write it")
    for value, what in ((manifest.audio_paths, "wav path"), (manifest.image_paths, "image path")):
        for v in value:
            if "\t" in v or "\n" in v:
                raise ManifestError(f"{what} {v!r} contains a tab or newline")
    os.makedirs(data_dir, exist_ok=True)
    contents = {
        "tsv": [manifest.audio_root] + [f"{p}\t{n}" for p, n in zip(manifest.audio_paths, manifest.num_samples)],
        "img": [manifest.image_root] + list(manifest.image_paths),
    }
    if manifest.speakers is not None:
        contents["spk"] = list(manifest.speakers)
    if manifest.texts is not None:
        contents["wrd"] = [" ".join(t.split()) for t in manifest.texts]
    atomic_write_all(
        {os.path.join(data_dir, f"{split}.{ext}"): _lines_writer(lines) for ext, lines in contents.items()}
    )
    # a stale optional file from an earlier run would no longer be parallel
    for ext in ("spk", "wrd"):
        if ext not in contents:
            stale = os.path.join(data_dir, f"{split}.{ext}")
            if os.path.exists(stale):
                os.remove(stale)
