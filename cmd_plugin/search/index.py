"""A searchable index of image (or spoken-clip) embeddings: the file format, incremental updates
and top-k search.

Pure torch/numpy (FAISS optional); no fairseq import: the model side is in
:mod:`cmd_plugin.inference`, the command line in ``examples/search.py``.

The index file (``torch.save`` of plain tensors, lists, dicts and strings; read back with the
weights-only unpickler and memory-mapped, so a query touches only what it reads):

    format        "cmd_plugin.search_index.v1"
    root          absolute directory the image paths are relative to
    paths         N relative paths ("/"-separated), one per row
    embeddings    (N, E) unit-norm joint-space image embeddings (float16 or float32)
    mtimes_ns     (N,) int64  modification time of each file when it was embedded
    sizes         (N,) int64  size in bytes of each file when it was embedded
    ids           (N,) int64  stable row ids, increasing (the approximate index's ids)
    next_id       int         first id not used yet
    identity      dict        what the embeddings depend on (``inference.image_identity``, or
                              ``inference.speech_identity`` for spoken clips); an index is refused
                              by a model whose identity differs
    modality      "image" or "audio" (absent in files written before spoken-clip indexes: "image")
    approximate   None or {"params": {...}, "data": (B,) uint8 serialized FAISS index}
    meta          dict        informational: checkpoint, creation/update times, counts

Every write is atomic (:func:`cmd_plugin.files.atomic_write`): an interrupted run leaves the
previous index usable.

Search is exact by default: scores are the dot products of unit vectors (cosine similarity),
computed in blocks of index rows (bounded memory), keeping the top k by partial selection.
Above a size, or on request, an approximate FAISS IVF index shortlists the candidates, which
are then re-scored exactly from the stored embeddings.
"""

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..files import atomic_write

INDEX_FORMAT = "cmd_plugin.search_index.v1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3")  # what libsndfile >= 1.1 reads
MODALITIES = {"image": ("images", IMAGE_EXTENSIONS), "audio": ("spoken clips", AUDIO_EXTENSIONS)}
EMBEDDING_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class SearchIndexError(ValueError):
    """An index, folder or option that cannot be used; the message names the file and what was expected."""


# ---------------------------------------------------------------- configuration


@dataclass
class ApproximateIndexConfig:
    """FAISS inverted-file index (IVF) parameters; every value is recorded in the index file."""

    mode: str = field(
        default="auto",
        metadata={
            "help": "auto: build an approximate index when the collection has at least min_images images "
            "(and faiss is installed); always; never (exact search only)"
        },
    )
    min_images: int = field(
        default=200_000,
        metadata={
            "help": "size from which mode=auto builds the approximate index (a choice: exact search times in "
            "benchmarks/README.md, bench_search.py)"
        },
    )
    nlist: int = field(
        default=0, metadata={"help": "number of inverted lists (k-means cells); 0 = the power of two nearest 4 sqrt(N)"}
    )
    nprobe: int = field(
        default=0,
        metadata={
            "help": "cells visited per query by default (a query may ask for another); 0 = nlist / 8 "
            "(its recall in benchmarks/README.md, bench_search.py)"
        },
    )
    encoding: str = field(
        default="SQfp16",
        metadata={
            "help": "how FAISS stores vectors in the cells: Flat (float32), SQfp16 (half the memory, "
            "same ranking in practice) or SQ8 (a quarter, lower recall); candidates are "
            "re-scored exactly from the stored embeddings either way"
        },
    )
    train_points_per_list: int = field(
        default=40,
        metadata={
            "help": "k-means training sample = this x nlist embeddings (sampled with seed; FAISS asks "
            "for at least 39; more costs build time linearly)"
        },
    )
    retrain_factor: float = field(
        default=2.0,
        metadata={
            "help": "an incremental update re-trains the cells when the collection grew or shrank by "
            "more than this factor since they were trained; otherwise it adds/removes vectors"
        },
    )
    seed: int = field(default=1, metadata={"help": "seed of the training sample and of k-means"})

    def __post_init__(self):
        if self.mode not in ("auto", "always", "never"):
            raise SearchIndexError(f"approximate index mode must be auto, always or never, got {self.mode!r}")
        if self.encoding not in ("Flat", "SQfp16", "SQ8"):
            raise SearchIndexError(f"approximate index encoding must be Flat, SQfp16 or SQ8, got {self.encoding!r}")
        for name in ("min_images", "train_points_per_list"):
            if getattr(self, name) < 1:
                raise SearchIndexError(f"approximate index {name} must be positive, got {getattr(self, name)}")
        if self.nlist < 0 or self.nprobe < 0 or self.retrain_factor <= 1.0:
            raise SearchIndexError("approximate index nlist and nprobe must be >= 0 and retrain_factor > 1")


def auto_nprobe(nlist: int) -> int:
    """nlist / 8 cells per query (at least 1): see ApproximateIndexConfig.nprobe."""
    return max(1, nlist // 8)


def auto_nlist(num_images: int) -> int:
    """The power of two nearest 4 sqrt(N) (the low end of FAISS's guideline of 4-16 sqrt(N)),
    at most the power of two below N / 39 (FAISS's minimum of training points per cell); the
    choice is measured in benchmarks/README.md (bench_search.py)."""
    if num_images < 39:
        return 1
    nlist = 2 ** int(round(math.log2(4 * math.sqrt(num_images))))
    return min(nlist, 2 ** int(math.log2(num_images // 39)))


# ---------------------------------------------------------------- the index


@dataclass
class ImageFile:
    """A file found under the index root: path relative to it, mtime (ns) and size (bytes)."""

    path: str
    mtime_ns: int
    size: int


@dataclass
class SearchIndex:
    root: str
    paths: List[str]
    embeddings: torch.Tensor
    mtimes_ns: torch.Tensor
    sizes: torch.Tensor
    ids: torch.Tensor
    next_id: int
    identity: Dict[str, Any]
    approximate: Optional[Dict[str, Any]] = None
    meta: Dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file it was read from ("" when built in memory)
    modality: str = "image"  # what the rows are: "image" files or "audio" clips

    @property
    def what(self) -> str:
        """ "images" or "spoken clips"."""
        return MODALITIES[self.modality][0]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def absolute_path(self, row: int) -> str:
        return os.path.join(self.root, *self.paths[row].split("/"))

    def rows_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """Row of each stable id (-1 where absent: a FAISS 'no result' or a removed id)."""
        ids = np.asarray(ids, dtype=np.int64)
        all_ids = self.ids.numpy()
        pos = np.searchsorted(all_ids, ids)
        pos_clipped = np.minimum(pos, max(len(all_ids) - 1, 0))
        found = (len(all_ids) > 0) & (pos < len(all_ids)) & (all_ids[pos_clipped] == ids)
        return np.where(found, pos_clipped, -1)


def scan_images(root: str, modality: str = "image") -> List[ImageFile]:
    """Every jpg/jpeg/png/webp file under ``root`` (``modality="audio"``: every wav/flac/ogg/opus/mp3
    file), recursively, symlinked files followed, hidden directories skipped, sorted by relative path."""
    what, extensions = MODALITIES[modality]
    if not os.path.isdir(root):
        raise SearchIndexError(f"{root}: not a directory (expected a folder of {what})")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(extensions):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:  # a dangling symlink or a file removed during the scan
                continue
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            found.append(ImageFile(rel, int(st.st_mtime_ns), int(st.st_size)))
    found.sort(key=lambda f: f.path)
    return found


@dataclass
class UpdatePlan:
    """What an incremental update does: rows of the old index kept as they are, files to
    embed (new or modified), relative paths dropped (deleted, or to be re-embedded)."""

    keep_rows: List[int]
    to_embed: List[ImageFile]
    removed: List[str]
    modified: List[str]


def plan_update(old: Optional[SearchIndex], files: Sequence[ImageFile]) -> UpdatePlan:
    """Compare the files found now with an old index (None: embed everything).

    A file is unchanged when its relative path, mtime and size all equal the index's."""
    if old is None:
        return UpdatePlan([], list(files), [], [])
    row_of = {p: i for i, p in enumerate(old.paths)}
    mtimes, sizes = old.mtimes_ns.tolist(), old.sizes.tolist()
    keep, embed, modified = [], [], []
    present = set()
    for f in files:
        present.add(f.path)
        row = row_of.get(f.path)
        if row is not None and mtimes[row] == f.mtime_ns and sizes[row] == f.size:
            keep.append(row)
        else:
            embed.append(f)
            if row is not None:
                modified.append(f.path)
    removed = [p for p in old.paths if p not in present]
    return UpdatePlan(sorted(keep), embed, removed + modified, modified)


def merged_index(
    old: Optional[SearchIndex],
    plan: UpdatePlan,
    new_files: Sequence[ImageFile],
    new_embeddings: torch.Tensor,
    root: str,
    identity: Dict[str, Any],
    dtype: str = "float32",
    modality: str = "image",
) -> SearchIndex:
    """The index after ``plan``: kept rows (same ids, same order) followed by the newly
    embedded files (fresh ids). ``new_embeddings`` (M, E) are the rows of ``new_files``
    (a subset of ``plan.to_embed``: unreadable files are left out). The approximate index of
    ``old`` is carried over unchanged; :func:`update_approximate` brings it up to date."""
    if dtype not in EMBEDDING_DTYPES:
        raise SearchIndexError(f"embedding dtype must be one of {sorted(EMBEDDING_DTYPES)}, got {dtype!r}")
    if modality not in MODALITIES or (old is not None and old.modality != modality):
        raise SearchIndexError(
            f"cannot merge {modality!r} rows into an index of {old.modality if old is not None else '?'!r} rows"
        )
    torch_dtype = EMBEDDING_DTYPES[dtype]
    if new_embeddings.dim() != 2 or new_embeddings.shape[0] != len(new_files):
        raise SearchIndexError(f"{len(new_files)} new files but embeddings of shape {tuple(new_embeddings.shape)}")
    keep = torch.as_tensor(plan.keep_rows, dtype=torch.long)
    next_id = old.next_id if old is not None else 0
    new_ids = torch.arange(next_id, next_id + len(new_files), dtype=torch.long)
    if old is not None and len(keep):
        if old.embed_dim != new_embeddings.shape[1] and len(new_files):
            raise SearchIndexError(
                f"{old.source}: embeddings of dim {old.embed_dim}, the model gives {new_embeddings.shape[1]}"
            )
        kept_emb = old.embeddings[keep].to(torch_dtype)
        parts = (
            [old.paths[r] for r in plan.keep_rows],
            old.mtimes_ns[keep],
            old.sizes[keep],
            old.ids[keep],
        )
    else:
        kept_emb = torch.empty(0, new_embeddings.shape[1], dtype=torch_dtype)
        parts = (
            [],
            torch.empty(0, dtype=torch.long),
            torch.empty(0, dtype=torch.long),
            torch.empty(0, dtype=torch.long),
        )
    paths = parts[0] + [f.path for f in new_files]
    return SearchIndex(
        root=os.path.abspath(root),
        paths=paths,
        embeddings=torch.cat([kept_emb, new_embeddings.to(torch_dtype)]).contiguous(),
        mtimes_ns=torch.cat([parts[1], torch.tensor([f.mtime_ns for f in new_files], dtype=torch.long)]),
        sizes=torch.cat([parts[2], torch.tensor([f.size for f in new_files], dtype=torch.long)]),
        ids=torch.cat([parts[3], new_ids]),
        next_id=next_id + len(new_files),
        identity=identity,
        approximate=old.approximate if old is not None else None,
        meta=dict(old.meta) if old is not None else {},
        modality=modality,
    )


# ---------------------------------------------------------------- files


def save_index(index: SearchIndex, path: str) -> None:
    """Write ``index`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    for p in index.paths:
        if "\n" in p or "\r" in p:
            raise SearchIndexError(f"{p!r}: paths with newlines cannot be indexed")
    payload = {
        "format": INDEX_FORMAT,
        "root": index.root,
        "paths": list(index.paths),
        "embeddings": index.embeddings.contiguous(),
        "mtimes_ns": index.mtimes_ns.contiguous(),
        "sizes": index.sizes.contiguous(),
        "ids": index.ids.contiguous(),
        "next_id": int(index.next_id),
        "identity": index.identity,
        "approximate": index.approximate,
        "meta": index.meta,
        "modality": index.modality,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_index(path: str) -> SearchIndex:
    """Read an index file (weights-only unpickling, tensors memory-mapped), checking every field.

    Raises :class:`FileNotFoundError` for a missing file and :class:`SearchIndexError` naming
    the file for anything that is not a complete index of this format."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"index file not found: {path} (write one with examples/search.py index)")
    expected = "an index written by examples/search.py index"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise SearchIndexError(
            f"{path}: not a search index, expected {expected} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != INDEX_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise SearchIndexError(f"{path}: not a search index (format {found!r}), expected {expected}")

    def bad(what):
        return SearchIndexError(f"{path}: corrupt search index: {what}; rebuild it with examples/search.py index")

    emb = payload.get("embeddings")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.dtype not in EMBEDDING_DTYPES.values():
        raise bad("'embeddings' is not an (N, E) float16/float32 tensor")
    n = emb.shape[0]
    paths = payload.get("paths")
    if not isinstance(paths, list) or len(paths) != n or not all(isinstance(p, str) for p in paths):
        raise bad(f"'paths' is not a list of {n} strings")
    for key in ("mtimes_ns", "sizes", "ids"):
        value = payload.get(key)
        if not isinstance(value, torch.Tensor) or value.dtype != torch.long or tuple(value.shape) != (n,):
            raise bad(f"'{key}' is not an int64 tensor of shape ({n},)")
    ids = payload["ids"]
    if n > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise bad("'ids' are not increasing")
    next_id = payload.get("next_id")
    if not isinstance(next_id, int) or (n and next_id <= int(ids[-1])):
        raise bad("'next_id' is missing or not above every id")
    if not isinstance(payload.get("root"), str) or not isinstance(payload.get("identity"), dict):
        raise bad("'root' or 'identity' missing")
    approximate = payload.get("approximate")
    if approximate is not None and (
        not isinstance(approximate, dict)
        or not isinstance(approximate.get("params"), dict)
        or not isinstance(approximate.get("data"), torch.Tensor)
        or approximate["data"].dtype != torch.uint8
    ):
        raise bad("'approximate' is not {'params': dict, 'data': uint8 tensor}")
    modality = payload.get("modality", "image")
    if modality not in MODALITIES:
        raise bad(f"'modality' is {modality!r}, expected one of {sorted(MODALITIES)}")
    return SearchIndex(
        root=payload["root"],
        paths=paths,
        embeddings=emb,
        mtimes_ns=payload["mtimes_ns"],
        sizes=payload["sizes"],
        ids=ids,
        next_id=next_id,
        identity=payload["identity"],
        approximate=approximate,
        meta=payload.get("meta") or {},
        source=os.path.abspath(path),
        modality=modality,
    )


# ---------------------------------------------------------------- exact search


@torch.no_grad()
def exact_top_k(
    queries: torch.Tensor, embeddings: torch.Tensor, k: int, block_rows: int = 16384
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k rows of ``embeddings`` by dot product with each query, in bounded memory.

    Args:
        queries: (Q, E) float query embeddings (unit norm: scores are cosine similarities).
        embeddings: (N, E) float16/float32 (may be memory-mapped); read ``block_rows`` rows at a
            time and converted to the queries' dtype block by block.
        k: results per query; min(k, N) are returned.
        block_rows: rows per block; peak extra memory is about ``block_rows * (E + Q)`` floats.

    Returns:
        (scores (Q, k'), rows (Q, k') int64), k' = min(k, N), each row sorted by decreasing
        score; equal scores are ordered by row (lower first) among the rows kept.
    """
    if queries.dim() != 2 or embeddings.dim() != 2 or queries.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"queries (Q, E) and embeddings (N, E) must share E, got "
            f"{tuple(queries.shape)} and {tuple(embeddings.shape)}"
        )
    if k < 1 or block_rows < 1:
        raise ValueError(f"k and block_rows must be positive, got {k} and {block_rows}")
    num_q, n = queries.shape[0], embeddings.shape[0]
    k = min(k, n)
    best_scores = torch.empty(num_q, 0, dtype=queries.dtype)
    best_rows = torch.empty(num_q, 0, dtype=torch.long)
    # one conversion buffer and one score buffer for every block: fresh allocations of this
    # size are page-faulted in on every use and cost more than the conversion itself
    convert = embeddings.dtype != queries.dtype
    block_buf = torch.empty(min(block_rows, n), embeddings.shape[1], dtype=queries.dtype) if convert else None
    score_buf = torch.empty(num_q, min(block_rows, n), dtype=queries.dtype)
    for start in range(0, n, block_rows):
        block = embeddings[start : start + block_rows]
        m = block.shape[0]
        if convert:
            block = block_buf[:m].copy_(block)
        scores = torch.mm(queries, block.T, out=score_buf[:, :m])  # (Q, m)
        kb = min(k, m)
        values, idx = scores.topk(kb, dim=1, sorted=False)
        best_scores = torch.cat([best_scores, values], dim=1)
        best_rows = torch.cat([best_rows, idx + start], dim=1)
        if best_scores.shape[1] > k:
            best_scores, best_rows = _sorted_by_score_then_row(best_scores, best_rows)
            best_scores, best_rows = best_scores[:, :k], best_rows[:, :k]
    return _sorted_by_score_then_row(best_scores, best_rows)


def _sorted_by_score_then_row(scores: torch.Tensor, rows: torch.Tensor):
    """Sort each query's candidates by decreasing score, ties by increasing row."""
    order = rows.argsort(dim=1, stable=True)
    scores, rows = scores.gather(1, order), rows.gather(1, order)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return scores.gather(1, order), rows.gather(1, order)


def rescore(queries: torch.Tensor, embeddings: torch.Tensor, rows: np.ndarray):
    """Exact scores of candidate ``rows`` (Q, C) (-1 = none) -> (scores, rows) sorted as
    :func:`exact_top_k`, without the -1 entries (lists may then be shorter than C: padded
    with score -inf and row -1)."""
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    valid = rows_t >= 0
    gathered = embeddings[rows_t.clamp(min=0).reshape(-1)].to(queries.dtype).reshape(*rows_t.shape, -1)
    scores = torch.einsum("qe,qce->qc", queries, gathered)
    scores = scores.masked_fill(~valid, float("-inf"))
    rows_t = rows_t.masked_fill(~valid, torch.iinfo(torch.long).max)
    scores, rows_t = _sorted_by_score_then_row(scores, rows_t)
    rows_t = rows_t.masked_fill(rows_t == torch.iinfo(torch.long).max, -1)
    return scores, rows_t


# ---------------------------------------------------------------- approximate search (FAISS)


def import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise SearchIndexError(
            "the approximate index needs FAISS: pip install faiss-cpu (or use exact search)"
        ) from err
    return faiss


def wants_approximate(cfg: ApproximateIndexConfig, num_images: int) -> bool:
    if cfg.mode == "never":
        return False
    if cfg.mode == "always":
        import_faiss()
        return True
    if num_images < cfg.min_images:
        return False
    try:
        import_faiss()
    except SearchIndexError:
        return False
    return True


def build_approximate(
    embeddings: torch.Tensor, ids: torch.Tensor, cfg: ApproximateIndexConfig, block_rows: int = 65536
) -> Dict[str, Any]:
    """Train an IVF index on a sample of ``embeddings`` (N, E) and add every row under its id.

    Returns {"params": every parameter and the build time, "data": the serialized index as a
    uint8 tensor} -- the ``approximate`` entry of an index file."""
    faiss = import_faiss()
    n, dim = embeddings.shape
    if n == 0:
        raise SearchIndexError("cannot build an approximate index of no images")
    started = time.time()
    nlist = cfg.nlist or auto_nlist(n)
    nlist = min(nlist, n)
    index = faiss.index_factory(dim, f"IVF{nlist},{cfg.encoding}", faiss.METRIC_INNER_PRODUCT)
    num_train = min(n, max(nlist * cfg.train_points_per_list, nlist))
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(n, size=num_train, replace=False)) if num_train < n else np.arange(n)
    train = embeddings[torch.from_numpy(sample)].float().numpy()
    index.cp.seed = cfg.seed
    index.cp.min_points_per_centroid = 1  # a small training set is allowed, not warned about
    index.train(train)
    del train
    _add_in_blocks(index, embeddings, ids, block_rows)
    params = dataclasses.asdict(cfg)
    params.update(
        nlist=int(nlist),
        nprobe=int(cfg.nprobe or auto_nprobe(nlist)),
        factory=f"IVF{nlist},{cfg.encoding}",
        metric="inner_product",
        trained_on=int(n),
        train_sample=int(num_train),
        faiss_version=faiss.__version__,
        build_seconds=round(time.time() - started, 3),
        num_vectors=int(index.ntotal),
    )
    return {"params": params, "data": torch.from_numpy(faiss.serialize_index(index).copy())}


def _add_in_blocks(index, embeddings, ids, block_rows):
    for start in range(0, embeddings.shape[0], block_rows):
        block = embeddings[start : start + block_rows].float().numpy()
        index.add_with_ids(block, ids[start : start + block_rows].numpy().astype(np.int64))


def load_approximate(approximate: Dict[str, Any]):
    faiss = import_faiss()
    return faiss.deserialize_index(approximate["data"].numpy())


def update_approximate(index: SearchIndex, old: Optional[SearchIndex], cfg: ApproximateIndexConfig) -> None:
    """Bring ``index.approximate`` up to date after :func:`merged_index` (in place).

    Dropped when not wanted; re-trained when absent, when its parameters (nlist, encoding)
    changed, or when the collection grew or shrank by more than ``cfg.retrain_factor`` since it
    was trained; otherwise the removed ids are removed and the new rows added (cells kept)."""
    if not wants_approximate(cfg, len(index)) or len(index) == 0:
        index.approximate = None
        return
    current = index.approximate
    if current is not None:
        params = current["params"]
        trained_on = max(1, int(params.get("trained_on", 1)))
        ratio = max(len(index) / trained_on, trained_on / max(1, len(index)))
        same = (
            params.get("encoding") == cfg.encoding
            and (not cfg.nlist or params.get("nlist") == cfg.nlist)
            and ratio <= cfg.retrain_factor
        )
        if same and old is not None:
            faiss = import_faiss()
            ann = load_approximate(current)
            kept = set(index.ids.tolist())
            gone = np.array([i for i in old.ids.tolist() if i not in kept], dtype=np.int64)
            if len(gone):
                ann.remove_ids(faiss.IDSelectorBatch(gone))
            new_rows = torch.nonzero(index.ids >= old.next_id).flatten()
            if len(new_rows):
                _add_in_blocks(ann, index.embeddings[new_rows], index.ids[new_rows], 65536)
            if ann.ntotal != len(index):
                raise SearchIndexError(
                    f"approximate index holds {ann.ntotal} vectors after the update, the index {len(index)}"
                )
            nprobe = int(cfg.nprobe or auto_nprobe(params["nlist"]))
            params = dict(params, nprobe=nprobe, num_vectors=int(ann.ntotal))
            index.approximate = {"params": params, "data": torch.from_numpy(faiss.serialize_index(ann).copy())}
            return
    index.approximate = build_approximate(index.embeddings, index.ids, cfg)


def approximate_candidates(ann, queries: torch.Tensor, k: int, nprobe: int) -> np.ndarray:
    """FAISS search -> (Q, k) candidate ids (-1 where a query found fewer than k)."""
    ann.nprobe = nprobe
    _, ids = ann.search(np.ascontiguousarray(queries.float().numpy()), k)
    return ids


# ---------------------------------------------------------------- searching an index


@dataclass
class SearchResults:
    """Per query: ``rows`` and ``scores`` (best first), and how they were found."""

    rows: List[List[int]]
    scores: List[List[float]]
    method: str
    seconds: float


def check_identity(index: SearchIndex, identity: Dict[str, Any], words=None) -> None:
    """Raise :class:`SearchIndexError` when the index's embeddings come from another image
    encoder (for spoken clips: speech encoder) than ``identity`` describes, naming the differing fields."""
    diffs = []
    for key in sorted(set(index.identity) | set(identity)):
        if key.startswith("_"):  # informational fields
            continue
        a, b = index.identity.get(key), identity.get(key)
        if a != b:
            name = (words or {}).get(key, key)
            diffs.append(f"{name} ({key}): index {_short(a)} vs model {_short(b)}")
    if diffs:
        encoder, command = (
            ("speech encoder", "index-audio") if index.modality == "audio" else ("image encoder", "index")
        )
        raise SearchIndexError(
            f"{index.source or 'index'} was built with another {encoder} than this checkpoint's: "
            + "; ".join(diffs)
            + f" -- build an index with this checkpoint (examples/search.py {command})"
        )


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def search(
    index: SearchIndex,
    queries: torch.Tensor,
    k: int = 10,
    exact: Optional[bool] = None,
    nprobe: Optional[int] = None,
    block_rows: int = 16384,
    ann=None,
) -> SearchResults:
    """Top-k images of ``index`` for each query embedding (Q, E).

    ``exact=None`` uses the approximate index when the file has one, exact search otherwise;
    approximate candidates are re-scored exactly. ``ann`` is an already deserialized FAISS
    index (to search many times without reloading it)."""
    if len(index) == 0:
        raise SearchIndexError(f"{index.source}: the index holds no {index.what}")
    if queries.dim() != 2 or queries.shape[1] != index.embed_dim:
        raise SearchIndexError(
            f"{index.source}: embeddings of dim {index.embed_dim}, queries of shape {tuple(queries.shape)}"
        )
    queries = queries.float()
    use_ann = (index.approximate is not None) if exact is None else not exact
    if use_ann and index.approximate is None:
        raise SearchIndexError(f"{index.source}: has no approximate index (build it with --approximate always)")
    note = ""
    if use_ann and exact is None and ann is None:
        try:
            import_faiss()
        except SearchIndexError:  # the file has one, this machine cannot read it: exact is always right
            use_ann, note = False, " (faiss is not installed: the approximate index was not used)"
    started = time.perf_counter()
    if use_ann:
        ann = ann if ann is not None else load_approximate(index.approximate)
        probe = nprobe or int(index.approximate["params"]["nprobe"])
        cand = approximate_candidates(ann, queries, min(k, len(index)), probe)
        scores, rows = rescore(queries, index.embeddings, index.rows_of_ids(cand))
        method = f"approximate ({index.approximate['params']['factory']}, nprobe {probe}, re-scored)"
    else:
        scores, rows = exact_top_k(queries, index.embeddings, k, block_rows=block_rows)
        method = "exact" + note
    seconds = time.perf_counter() - started
    out_rows, out_scores = [], []
    for r, s in zip(rows.tolist(), scores.tolist()):
        keep = [i for i, row in enumerate(r) if row >= 0]
        out_rows.append([r[i] for i in keep])
        out_scores.append([s[i] for i in keep])
    return SearchResults(out_rows, out_scores, method, seconds)
