"""Helpers shared by the corpus preparation scripts (``examples/prepare_*.py``).

* :func:`probe_audio` reads wav headers only (``soundfile.info``, no decoding) and checks
  the sample rate and channel count, in a small thread pool with a progress bar.
* :func:`check_images` decodes every image as training will read it (JPEGs in draft mode),
  in the same kind of pool, so a truncated or corrupt file stops preparation, not training.
* :func:`check_unique` stops on the first duplicate entry, naming where both copies are.
* :func:`write_splits` writes several splits so that either all of them replace the previous
  output or none does.
* :func:`format_summary` gives images / utterances / hours per split.

Every problem with the input is raised as :class:`~cmd_plugin.data.manifest.ManifestError`
whose message names the offending file and line (or JSON key).
"""

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import soundfile
from PIL import Image
from tqdm import tqdm

from cmd_plugin.data.manifest import ManifestError, SpeechImageManifest, write_manifest

SAMPLE_RATE = 16000
SPLIT_NAMES = ("train", "valid", "test")
MANIFEST_EXTS = ("tsv", "img", "spk", "wrd")

# (absolute wav path, where it was listed, e.g. "wav2capt.txt:12") -> number of samples
AudioItem = Tuple[str, str]


def progress(iterable: Iterable, enabled: bool, **kwargs):
    """tqdm over ``iterable`` on stderr; a plain iterable when progress bars are off."""
    if not enabled:
        return iterable
    return tqdm(iterable, mininterval=1.0, dynamic_ncols=True, **kwargs)


def _probe_one(item: AudioItem, sample_rate: int) -> int:
    path, where = item
    if not os.path.isfile(path):
        raise ManifestError(f"{where}: wav file {path} is missing")
    try:
        info = soundfile.info(path)
    except Exception as exc:  # libsndfile's errors carry no file name
        raise ManifestError(f"{where}: cannot read the audio header of {path}: {exc}") from None
    if info.samplerate != sample_rate:
        raise ManifestError(
            f"{where}: {path} has sample rate {info.samplerate} Hz, expected {sample_rate} Hz "
            "(resample the corpus first)"
        )
    if info.channels != 1:
        raise ManifestError(f"{where}: {path} has {info.channels} channels, expected mono")
    if info.frames <= 0:
        raise ManifestError(f"{where}: {path} holds no audio samples")
    return int(info.frames)


def _probe_chunk(chunk: Sequence[AudioItem], sample_rate: int) -> List[int]:
    return [_probe_one(item, sample_rate) for item in chunk]


def _map_in_order(fn, items: Sequence, workers: int, show_progress: bool, desc: str, unit: str) -> List:
    """``[fn(item) for item in items]`` in a thread pool, in chunks, with a progress bar.

    The first exception in the order of ``items`` is raised, whatever order the threads finish in.
    """
    chunk_size = 256
    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    results: List = []
    bar = tqdm(total=len(items), desc=desc, unit=unit, mininterval=1.0, disable=not show_progress)
    try:
        if workers <= 1:
            for chunk in chunks:
                results.extend(fn(chunk))
                bar.update(len(chunk))
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                for chunk, chunk_results in zip(chunks, pool.map(fn, chunks)):
                    results.extend(chunk_results)
                    bar.update(len(chunk))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return results


def probe_audio(
    items: Sequence[AudioItem],
    sample_rate: int = SAMPLE_RATE,
    workers: int = 8,
    show_progress: bool = True,
    desc: str = "audio headers",
) -> List[int]:
    """Number of samples of each wav in ``items``, in order; headers only.

    Raises ManifestError for a missing or unreadable file, a sample rate other than
    ``sample_rate`` or more than one channel. The error reported is the first bad item in
    the order of ``items``, whatever order the threads finish in (libsndfile releases the GIL,
    so threads overlap the file-system latency of hundreds of thousands of small files).
    """
    return _map_in_order(lambda chunk: _probe_chunk(chunk, sample_rate), items, workers, show_progress, desc, "wav")


# (absolute image path, where it is listed, e.g. "Flickr_8k.testImages.txt:12 (split 'test')")
ImageItem = Tuple[str, str]


def decode_image(path: str) -> None:
    """Decode ``path`` to the end of its data as training does (PIL, converted to RGB).

    A JPEG is decoded in draft mode (libjpeg's 1/8 DCT scaling): every entropy-coded block is
    still read, so truncation and corrupt data are found, at a fraction of the full cost.
    Raises whatever PIL raises.
    """
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (1, 1))
        im.load()
        im.convert("RGB")


def _check_image(item: ImageItem) -> None:
    path, where = item
    if not os.path.isfile(path):
        raise ManifestError(f"{where}: image {path} is missing")
    try:
        decode_image(path)
    except Exception as exc:  # PIL's errors do not name the file
        raise ManifestError(
            f"{where}: image {path} cannot be decoded ({type(exc).__name__}: {exc}); replace the file "
            "(--no-check-images skips this check)"
        ) from None


def _check_image_chunk(chunk: Sequence[ImageItem]) -> List[None]:
    return [_check_image(item) for item in chunk]


def check_images(
    items: Sequence[ImageItem], workers: int = 8, show_progress: bool = True, desc: str = "decoding images"
) -> None:
    """Decode every image of ``items`` (see :func:`decode_image`) in a thread pool.

    Raises ManifestError for the first missing or undecodable image in the order of ``items``,
    naming the file and where it is listed. PIL's decoders release the GIL, so threads overlap.
    """
    _map_in_order(_check_image_chunk, items, workers, show_progress, desc, "img")


def check_images_exist(items: Sequence[ImageItem]) -> None:
    """Existence only (``--no-check-images``): raise for the first missing image."""
    for path, where in items:
        if not os.path.isfile(path):
            raise ManifestError(f"{where}: image {path} is missing")


def check_unique(entries: Iterable[Tuple[str, str]], what: str) -> None:
    """Raise on the first key seen twice; ``entries`` are ``(key, where)`` pairs."""
    seen: Dict[str, str] = {}
    for key, where in entries:
        if key in seen:
            raise ManifestError(f"{where}: duplicate {what} {key!r} (already listed at {seen[key]})")
        seen[key] = where


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: {what} not found")
    return path


def format_summary(splits: Dict[str, SpeechImageManifest], sample_rate: int = SAMPLE_RATE) -> str:
    """A small table: images, utterances, speakers and hours of audio per split."""
    rows = [("split", "images", "utterances", "speakers", "hours")]
    for name, m in splits.items():
        speakers = str(len(set(m.speakers))) if m.speakers is not None else "-"
        hours = sum(m.num_samples) / sample_rate / 3600.0
        rows.append((name, str(len(m.unique_images)), str(len(m)), speakers, f"{hours:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def write_splits(out_dir: str, splits: Dict[str, SpeechImageManifest]) -> List[str]:
    """Write every split, replacing earlier output only when all of them are written.

    The splits are first written into a staging folder inside ``out_dir`` (same file system,
    so the final moves are renames); a failure removes the staging folder and leaves whatever
    was in ``out_dir`` before untouched. Returns the paths written.
    """
    for name, m in splits.items():
        if len(m) == 0:
            raise ManifestError(f"split {name!r} for {out_dir} is empty: refusing to write any split")
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=out_dir)
    try:
        for name, m in splits.items():
            write_manifest(staging, name, m)
        moves = []
        for name in splits:
            for ext in MANIFEST_EXTS:
                src = os.path.join(staging, f"{name}.{ext}")
                moves.append((src if os.path.exists(src) else None, os.path.join(out_dir, f"{name}.{ext}")))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            try:
                os.rmdir(out_dir)
            except OSError:
                pass
        raise
    written = []
    for src, dst in moves:
        if src is None:
            if os.path.exists(dst):  # an optional file of an earlier run is no longer parallel
                os.remove(dst)
        else:
            os.replace(src, dst)
            written.append(dst)
    shutil.rmtree(staging, ignore_errors=True)
    return written


def find_first_dir(base: str, names: Sequence[str]) -> Optional[str]:
    """``base`` itself if its name is one of ``names``, else the first ``base/<name>`` that exists."""
    base = os.path.normpath(base)
    if os.path.basename(base) in names:
        return base
    for name in names:
        candidate = os.path.join(base, name)
        if os.path.isdir(candidate):
            return candidate
    return None
