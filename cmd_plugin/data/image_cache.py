"""Frozen image-encoder outputs computed once per unique image and memory-mapped.

With the image encoder frozen, encoding an image again at every step only repeats work (each
image has 5 captions, and training passes over the corpus hundreds of times). A cache directory
holds the encoder's outputs for every unique image:

    meta.json          identity of the encoder (see :func:`encoder_identity`), shapes, dtype,
                       creation time, cmd_plugin version
    images.txt         one absolute image path per row
    image_cls.npy      (U, E) float16: pooled embedding, projected, NOT normalised
                       (open_clip ``encode_image``; the model normalises it)
    image_patches.npy  (U, N, E) float16: patch tokens after ln_post, projected with visual.proj

The identity says which encoder made the cache: :func:`cmd_plugin.encoder_identity.image_encoder_identity`
(model name, the fingerprint of its weights, its open_clip model config, its preprocessing), the
fingerprint being the same one a search index of images records. A cache is refused by an encoder
that differs, naming the field.
"""

import datetime
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from numpy.lib.format import open_memmap
from PIL import Image
from tqdm import tqdm

from ..encoder_identity import (
    image_encoder_identity,
    open_clip_model_config,
    open_clip_preprocess,
    preprocess_identity,
    tensors_sha256,
)
from ..files import atomic_write_json, atomic_write_text
from .manifest import SpeechImageManifest

META_FILE = "meta.json"
INDEX_FILE = "images.txt"
CLS_FILE = "image_cls.npy"
PATCHES_FILE = "image_patches.npy"
CACHE_DTYPE = np.float16

# fields of an identity that must agree between a cache and the encoder using it, with the words
# an error uses for them ("weights_file" is informational: the same weights may move)
IDENTITY_FIELDS = {
    "model": "model name",
    "weights_sha256": "weights checksum",
    "model_config": "open_clip model config",
    "preprocess": "preprocessing",
}
# what "weights_sha256" is taken over: the encoder's tensors (cmd_plugin.encoder_identity). Caches
# written before it was recorded hold the sha256 of the weights FILE; they are still checked that way.
WEIGHTS_HASHED = "tensors"


class ImageCacheError(ValueError):
    """A cache that cannot be written, read or used; the message names the file or field."""


# ---- encoder identity ----


def check_weights_file(pretrained_path: str) -> None:
    """Refuse a missing weights file, or none (a randomly initialised encoder)."""
    if not pretrained_path:
        raise ImageCacheError(
            "an image feature cache needs the encoder's weights file (image_pretrained): "
            "a randomly initialised encoder has no reproducible outputs to cache"
        )
    if not os.path.isfile(pretrained_path):
        raise ImageCacheError(f"image encoder weights file not found: {pretrained_path}")


def cache_identity(upstream, pretrained_path: str) -> dict:
    """The identity a cache written by ``upstream`` (a ClipImageUpstream loaded from the weights
    file ``pretrained_path``) records: :func:`~cmd_plugin.encoder_identity.image_encoder_identity`
    plus "weights_file" (informational) and "weights_hashed"."""
    check_weights_file(pretrained_path)
    return {
        **image_encoder_identity(upstream),
        "weights_file": os.path.abspath(pretrained_path),
        "weights_hashed": WEIGHTS_HASHED,
    }


_WEIGHTS_SHA256_MEMO: Dict[tuple, str] = {}


def encoder_identity(model_name: str, pretrained_path: str, model_config_path: str = "") -> dict:
    """The identity of the frozen image encoder ``model_name`` with weights ``pretrained_path``
    (and open_clip model JSON ``model_config_path``), as a cache made with it records it
    (:func:`cache_identity`). To be fingerprinted the tower is built from these files, once per
    process for each (weights file, size, mtime, model config without its preprocessing)."""
    check_weights_file(pretrained_path)
    try:
        model_config = open_clip_model_config(model_name, model_config_path)
    except ValueError as err:
        raise ImageCacheError(str(err)) from None
    st = os.stat(pretrained_path)
    architecture = {k: v for k, v in model_config.items() if k != "preprocess_cfg"}
    key = (
        model_name,
        os.path.abspath(pretrained_path),
        st.st_size,
        st.st_mtime_ns,
        json.dumps(architecture, sort_keys=True),
    )
    if key not in _WEIGHTS_SHA256_MEMO:
        from ..models.clip_upstream import ClipImageUpstream  # imports fairseq (cmd_plugin.models)

        upstream = ClipImageUpstream(model_name, pretrained_path, model_config_path, freeze=True)
        _WEIGHTS_SHA256_MEMO[key] = tensors_sha256(upstream)
    return {
        "model": model_name,
        "model_config": model_config,
        "preprocess": preprocess_identity(open_clip_preprocess(model_name)),
        "weights_sha256": _WEIGHTS_SHA256_MEMO[key],
        "weights_file": os.path.abspath(pretrained_path),
        "weights_hashed": WEIGHTS_HASHED,
    }


def _as_json(value):
    """The value as JSON reads it back (tuples become lists), so identities compare equal."""
    return json.loads(json.dumps(value))


_FILE_SHA256_MEMO: Dict[Tuple[str, int, int], str] = {}


def _file_sha256(path: str, chunk_bytes: int = 16 << 20) -> str:
    """sha256 of a file (what caches written before WEIGHTS_HASHED recorded), memoised per (path, size, mtime)."""
    path = os.path.abspath(path)
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _FILE_SHA256_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(chunk_bytes), b""):
                digest.update(chunk)
        _FILE_SHA256_MEMO[key] = digest.hexdigest()
    return _FILE_SHA256_MEMO[key]


def identity_differences(cached: dict, current: dict) -> List[str]:
    """Human-readable differences of the compared identity fields; [] when they agree."""
    out = []
    for key, words in IDENTITY_FIELDS.items():
        a, b = cached.get(key), current.get(key)
        if key == "weights_sha256" and cached.get("weights_hashed") != WEIGHTS_HASHED:
            # an older cache: its checksum is of the weights file
            path = current.get("weights_file", "")
            b = _file_sha256(path) if path and os.path.isfile(path) else None
            if a != b:
                out.append(
                    f"{words} ({key}) differs: cache {a!r} vs the encoder's weights file {path or '?'} {b!r} "
                    "(sha256 of the file, as this older cache recorded it)"
                )
            continue
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            detail = ", ".join(f"{k}: cache {a.get(k)!r} vs encoder {b.get(k)!r}" for k in keys)
            out.append(f"{words} ({key}) differs: {detail}")
        else:
            out.append(f"{words} ({key}) differs: cache {a!r} vs encoder {b!r}")
    return out


# ---- writing ----


def cache_bytes(num_images: int, embed_dim: int, num_patches: int) -> int:
    """Bytes of a cache's arrays (headers aside): (1 + N) * E float16 values per image.

    CLIP ViT-L/14 (E = 768, N = 256): 394,752 bytes per image, so SpokenCOCO's 123,287 COCO
    images take 48.7e9 bytes (45.3 GiB) and Flickr8k's 8,000 take 3.2e9 bytes."""
    return num_images * (1 + num_patches) * embed_dim * np.dtype(CACHE_DTYPE).itemsize


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], preprocess, where: Optional[Sequence[str]] = None):
        self.paths = paths
        self.preprocess = preprocess
        self.where = where

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        listed = f"{self.where[i]}: " if self.where is not None else ""
        try:
            with Image.open(path) as im:
                return self.preprocess(im.convert("RGB"))
        except Exception as e:  # PIL's errors do not name the file
            raise ImageCacheError(f"{listed}{path}: cannot read image ({type(e).__name__}: {e})") from None


def _is_cache_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def _cmd_plugin_version() -> str:
    try:
        return version("cmd_plugin")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


PROGRESS_FILE = "progress.json"


def partial_dir_of(out_dir: str) -> str:
    """Where an unfinished build of ``out_dir`` keeps its rows: a hidden sibling directory,
    never mistaken for a cache (no meta.json until complete, and not at ``out_dir``)."""
    out_dir = os.path.abspath(out_dir)
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial")


def _build_key(identity: dict, paths: Sequence[str], embed_dim: int, num_patches: int) -> dict:
    """What a partial build must share with this one to be resumed."""
    digest = hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()
    return _as_json(
        {
            "identity": identity,
            "paths_sha256": digest,
            "num_images": len(paths),
            "embed_dim": embed_dim,
            "num_patches": num_patches,
            "dtype": np.dtype(CACHE_DTYPE).name,
        }
    )


def _resumable_rows(partial: str, key: dict, log) -> Optional[int]:
    """Rows already encoded by an earlier, interrupted build with the same key, else None."""
    try:
        with open(os.path.join(partial, PROGRESS_FILE), encoding="utf-8") as f:
            progress = json.load(f)
        if progress.get("key") != key:
            log(f"{partial}: an unfinished build of other images or another encoder: starting over")
            return None
        rows = int(progress["rows_done"])
        shapes = {
            CLS_FILE: [key["num_images"], key["embed_dim"]],
            PATCHES_FILE: [key["num_images"], key["num_patches"], key["embed_dim"]],
        }
        for name, shape in shapes.items():
            array = np.load(os.path.join(partial, name), mmap_mode="r")
            if list(array.shape) != shape or array.dtype != CACHE_DTYPE:
                raise ValueError(f"{name} is {array.dtype} {list(array.shape)}")
            del array
        return rows
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"{partial}: unfinished build is unreadable ({type(e).__name__}: {e}): starting over")
        return None


LOCK_FILE = ".lock"


def _lock(partial: str):
    """An exclusive lock on ``partial/.lock`` (released when the process ends, even killed)."""
    handle = open(os.path.join(partial, LOCK_FILE), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ImageCacheError(f"another process is building this image feature cache (in {partial})") from None
    return handle


def _clear(partial: str) -> None:
    for name in os.listdir(partial):
        if name != LOCK_FILE:
            path = os.path.join(partial, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def _finished_meta(partial: str, identity: dict, paths: Sequence[str]) -> Optional[dict]:
    """The meta of a build that completed in ``partial`` but was stopped before its rename."""
    try:
        with open(os.path.join(partial, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        with open(os.path.join(partial, INDEX_FILE), encoding="utf-8") as f:
            listed = f.read().splitlines()
    except (OSError, ValueError):
        return None
    return meta if meta.get("identity") == _as_json(identity) and listed == list(paths) else None


def write_image_cache(
    out_dir: str,
    image_paths: Sequence[str],
    upstream,
    identity: dict,
    batch_size: int = 64,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    where: Optional[Sequence[str]] = None,
    sync_interval: float = 30.0,
    log=print,
) -> dict:
    """Encode each image once with ``upstream`` (a ClipImageUpstream) and write a cache to ``out_dir``.

    Images are read as training reads them (PIL open, convert RGB, the upstream's own
    ``preprocess``); ``where`` (one per path, e.g. 'train.img:12') is named in read errors.

    Interruptions lose little and never leave a cache that looks complete: rows are written
    into ``partial_dir_of(out_dir)``; at most every ``sync_interval`` seconds (and at the end)
    they are flushed to disk and counted in its progress.json. Run again with the same images
    and encoder after a crash, a kill or an error, and encoding resumes from the last recorded
    row (an unfinished build of other images or another encoder is discarded). Only a complete
    build gets its meta.json and is renamed to ``out_dir``, replacing an existing cache there
    only then. The upstream is moved to ``device``. Returns the cache's meta (also in meta.json).
    """
    paths = [os.path.abspath(p) for p in image_paths]
    for given, p in zip(image_paths, paths):
        if not os.path.isabs(given):
            raise ImageCacheError(f"image path {given!r} is not absolute")
        if "\n" in p or "\r" in p:
            raise ImageCacheError(f"image path {p!r} contains a newline")
    if len(set(paths)) != len(paths):
        seen = set()
        dup = next(p for p in paths if p in seen or seen.add(p))
        raise ImageCacheError(f"image path {dup} is listed more than once: give each image once")
    if not paths:
        raise ImageCacheError("no images to cache")
    if where is not None and len(where) != len(paths):
        raise ImageCacheError(f"{len(where)} 'where' entries for {len(paths)} images")
    if identity.get("model") != upstream.model_name:
        raise ImageCacheError(
            f"identity is of model {identity.get('model')!r} but the upstream is {upstream.model_name!r}"
        )
    built = getattr(upstream.visual, "preprocess_cfg", None)
    if built and preprocess_identity(built) != identity.get("preprocess"):
        raise ImageCacheError(
            f"identity preprocessing {identity.get('preprocess')} differs from the upstream's {preprocess_identity(built)}"
        )
    if identity.get("weights_sha256") != tensors_sha256(upstream):
        raise ImageCacheError(
            "identity weights checksum (weights_sha256) is not the upstream's: give the identity "
            "of the encoder that writes the cache (cache_identity(upstream, weights_file))"
        )

    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir) or (os.listdir(out_dir) and not _is_cache_dir(out_dir)):
            raise ImageCacheError(f"{out_dir} exists and is not an image feature cache: refusing to replace it")
    parent = os.path.dirname(out_dir)
    partial = partial_dir_of(out_dir)
    os.makedirs(partial, exist_ok=True)
    lock = _lock(partial)
    num_images, embed_dim, num_patches = len(paths), upstream.embed_dim, upstream.num_patches
    key = _build_key(identity, paths, embed_dim, num_patches)
    started = time.time()
    was_training = upstream.training
    try:
        finished = _finished_meta(partial, identity, paths)
        if finished is not None:
            log(f"{partial}: a complete build of these images was not yet moved into place: moving it")
            os.remove(os.path.join(partial, LOCK_FILE))
            _move_into_place(partial, out_dir)
            return finished
        start = None
        if os.path.isfile(os.path.join(partial, PROGRESS_FILE)):
            start = _resumable_rows(partial, key, log)
        if start is None:
            _clear(partial)
            needed = cache_bytes(num_images, embed_dim, num_patches)
            free = shutil.disk_usage(parent).free
            if needed > free:
                raise ImageCacheError(
                    f"the cache of {num_images} images needs {needed / 1e9:.1f} GB; {parent} has {free / 1e9:.1f} GB free"
                )
            cls_out = open_memmap(
                os.path.join(partial, CLS_FILE), mode="w+", dtype=CACHE_DTYPE, shape=(num_images, embed_dim)
            )
            patches_out = open_memmap(
                os.path.join(partial, PATCHES_FILE),
                mode="w+",
                dtype=CACHE_DTYPE,
                shape=(num_images, num_patches, embed_dim),
            )
            cls_out.flush()
            patches_out.flush()
            start = 0
            atomic_write_json(os.path.join(partial, PROGRESS_FILE), {"key": key, "rows_done": 0})
        else:
            log(f"resuming the unfinished build in {partial}: {start} of {num_images} images already encoded")
            cls_out = np.load(os.path.join(partial, CLS_FILE), mmap_mode="r+")
            patches_out = np.load(os.path.join(partial, PATCHES_FILE), mmap_mode="r+")

        def record(rows_done: int, *arrays) -> None:
            # rows reach the disk before the count that says they are there
            for array in arrays:
                array.flush()
            atomic_write_json(os.path.join(partial, PROGRESS_FILE), {"key": key, "rows_done": rows_done})

        upstream.to(device).eval()
        loader = torch.utils.data.DataLoader(
            _ImageFiles(paths[start:], upstream.preprocess, where[start:] if where is not None else None),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=str(device).startswith("cuda"),
        )
        row = start
        last_sync = time.time()
        with (
            torch.inference_mode(),
            tqdm(total=num_images, initial=start, unit="img", disable=not progress, desc="encoding images") as bar,
        ):
            for pixels in loader:
                pooled, patches = upstream(pixels.to(device, non_blocking=True))
                n = pooled.size(0)
                if pooled.shape != (n, embed_dim) or patches.shape != (n, num_patches, embed_dim):
                    raise ImageCacheError(
                        f"upstream returned pooled {tuple(pooled.shape)} and patches {tuple(patches.shape)}, "
                        f"expected ({n}, {embed_dim}) and ({n}, {num_patches}, {embed_dim})"
                    )
                pooled = pooled.float().cpu().numpy()
                patches = patches.float().cpu().numpy()
                if (
                    np.abs(pooled).max() > np.finfo(CACHE_DTYPE).max
                    or np.abs(patches).max() > np.finfo(CACHE_DTYPE).max
                ):
                    raise ImageCacheError(f"encoder outputs near {paths[row]} overflow {np.dtype(CACHE_DTYPE).name}")
                cls_out[row : row + n] = pooled
                patches_out[row : row + n] = patches
                row += n
                bar.update(n)
                if time.time() - last_sync >= sync_interval:
                    record(row, cls_out, patches_out)
                    last_sync = time.time()
        assert row == num_images, (row, num_images)
        record(row, cls_out, patches_out)
        del cls_out, patches_out
        atomic_write_text(os.path.join(partial, INDEX_FILE), "".join(p + "\n" for p in paths))
        meta = {
            "identity": identity,
            "num_images": num_images,
            "embed_dim": embed_dim,
            "num_patches": num_patches,
            "shapes": {CLS_FILE: [num_images, embed_dim], PATCHES_FILE: [num_images, num_patches, embed_dim]},
            "dtype": np.dtype(CACHE_DTYPE).name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "encode_seconds": round(time.time() - started, 3),
            "resumed_from_row": start,
            "cmd_plugin_version": _cmd_plugin_version(),
        }
        # meta.json last: a directory with it is complete
        atomic_write_json(os.path.join(partial, META_FILE), meta)
        os.remove(os.path.join(partial, PROGRESS_FILE))
        os.remove(os.path.join(partial, LOCK_FILE))  # the open handle keeps the lock until the end
        _move_into_place(partial, out_dir)
    except BaseException:
        # an interrupted build stays in the partial directory, to be resumed; one that failed
        # before encoding anything leaves nothing behind
        if not os.path.isfile(os.path.join(partial, PROGRESS_FILE)) or _rows_recorded(partial) == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        upstream.train(was_training)
        lock.close()
    return meta


def _rows_recorded(partial: str) -> int:
    try:
        with open(os.path.join(partial, PROGRESS_FILE), encoding="utf-8") as f:
            return int(json.load(f)["rows_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _move_into_place(tmp_dir: str, out_dir: str) -> None:
    """Rename the complete ``tmp_dir`` to ``out_dir``; an old cache there is removed only after."""
    if not os.path.lexists(out_dir):
        os.rename(tmp_dir, out_dir)
        return
    old = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix=f".{os.path.basename(out_dir)}.old-")
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
        os.rename(tmp_dir, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # put the old cache back
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- reading ----


class ImageFeatureCache:
    """A cache directory opened read-only; the arrays are memory-mapped on first use.

    Picklable (DataLoader workers): the memory maps are reopened in each process, not copied.
    """

    def __init__(self, cache_dir: str):
        self.cache_dir = os.path.abspath(cache_dir)
        meta_path = os.path.join(self.cache_dir, META_FILE)
        if not os.path.isfile(meta_path):
            raise ImageCacheError(
                f"{self.cache_dir}: not an image feature cache (no {META_FILE}); "
                "write one with examples/cache_image_features.py"
            )
        with open(meta_path, encoding="utf-8") as f:
            self.meta = json.load(f)
        with open(os.path.join(self.cache_dir, INDEX_FILE), encoding="utf-8") as f:
            self.paths = f.read().splitlines()
        if len(self.paths) != self.meta["num_images"]:
            raise ImageCacheError(
                f"{os.path.join(self.cache_dir, INDEX_FILE)}: {len(self.paths)} paths, "
                f"{META_FILE} says {self.meta['num_images']} images"
            )
        self._rows = {p: i for i, p in enumerate(self.paths)}
        self._cls: Optional[np.ndarray] = None
        self._patches: Optional[np.ndarray] = None

    @property
    def identity(self) -> dict:
        return self.meta["identity"]

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def num_patches(self) -> int:
        return int(self.meta["num_patches"])

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, path: str) -> bool:
        return os.path.abspath(path) in self._rows

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cls"] = state["_patches"] = None
        return state

    def _arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._cls is None:
            arrays = []
            for name in (CLS_FILE, PATCHES_FILE):
                path = os.path.join(self.cache_dir, name)
                array = np.load(path, mmap_mode="r")
                if list(array.shape) != self.meta["shapes"][name] or array.dtype.name != self.meta["dtype"]:
                    raise ImageCacheError(
                        f"{path}: {array.dtype.name} {list(array.shape)}, {META_FILE} says "
                        f"{self.meta['dtype']} {self.meta['shapes'][name]}"
                    )
                arrays.append(array)
            self._cls, self._patches = arrays
        return self._cls, self._patches

    def check_identity(self, identity: dict) -> None:
        """Raise :class:`ImageCacheError` naming each field in which ``identity`` differs."""
        diffs = identity_differences(self.identity, identity)
        if diffs:
            raise ImageCacheError(
                f"image feature cache {self.cache_dir} was made by another image encoder: "
                + "; ".join(diffs)
                + " -- rebuild it with examples/cache_image_features.py for this encoder"
            )

    def missing(self, abs_paths: Sequence[str]) -> List[str]:
        return [p for p in abs_paths if os.path.abspath(p) not in self._rows]

    def rows(self, abs_paths: Sequence[str]) -> np.ndarray:
        rows = []
        for p in abs_paths:
            row = self._rows.get(os.path.abspath(p))
            if row is None:
                raise ImageCacheError(f"{p}: not in image feature cache {self.cache_dir}")
            rows.append(row)
        return np.asarray(rows, dtype=np.int64)

    def lookup(self, abs_paths: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images by absolute path -> (cls (U, E), patches (U, N, E)) float32 tensors."""
        rows = self.rows(abs_paths)
        cls, patches = self._arrays()
        return (
            torch.from_numpy(cls[rows].astype(np.float32)),
            torch.from_numpy(patches[rows].astype(np.float32)),
        )


class CachedImages:
    """Drop-in for ``PixelImages``: relative image paths -> {"image_cls", "image_patches"}.

    Every image of ``manifest`` must be in the cache: checked here, before training starts.
    """

    def __init__(self, manifest: SpeechImageManifest, cache: ImageFeatureCache):
        self.manifest = manifest
        self.cache = cache
        missing = cache.missing([manifest.image_path(rel) for rel in manifest.unique_images])
        if missing:
            raise ImageCacheError(
                f"{len(missing)} image(s) of the manifest are not in image feature cache "
                f"{cache.cache_dir}, e.g. {os.path.abspath(missing[0])}: cache the split with "
                "examples/cache_image_features.py"
            )

    def __call__(self, relative_paths: List[str]) -> Dict[str, torch.Tensor]:
        cls, patches = self.cache.lookup([self.manifest.image_path(rel) for rel in relative_paths])
        return {"image_cls": cls, "image_patches": patches}
