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
from dataclasses import dataclass
from typing import List, Optional

import numpy as np


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
        raise ManifestError(
            f"{path}: has {len(lines)} lines, expected {expected} (one per utterance of {tsv_path})"
        )
    return lines


def read_manifest(data_dir: str, split: str) -> SpeechImageManifest:
    """Read split ``split`` from ``data_dir``; raise :class:`ManifestError` naming file:line."""
    tsv = os.path.join(data_dir, f"{split}.tsv")
    img = os.path.join(data_dir, f"{split}.img")
    for path in (tsv, img):
        if not os.path.isfile(path):
            raise ManifestError(f"{path}: missing (split {split!r} of manifest directory {data_dir})")
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
    )


def _atomic_write(path: str, lines: List[str]) -> str:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
    except BaseException:  # the caller only knows about temporaries that were completed
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


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
        "tsv": [manifest.audio_root]
        + [f"{p}\t{n}" for p, n in zip(manifest.audio_paths, manifest.num_samples)],
        "img": [manifest.image_root] + list(manifest.image_paths),
    }
    if manifest.speakers is not None:
        contents["spk"] = list(manifest.speakers)
    if manifest.texts is not None:
        contents["wrd"] = [" ".join(t.split()) for t in manifest.texts]
    written = []
    try:
        for ext, lines in contents.items():
            written.append((_atomic_write(os.path.join(data_dir, f"{split}.{ext}"), lines), ext))
    except BaseException:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for tmp, ext in written:
        os.replace(tmp, os.path.join(data_dir, f"{split}.{ext}"))
    # a stale optional file from an earlier run would no longer be parallel
    for ext in ("spk", "wrd"):
        if ext not in contents:
            stale = os.path.join(data_dir, f"{split}.{ext}")
            if os.path.exists(stale):
                os.remove(stale)
