"""Cross-modal retrieval recall (R@K) between spoken captions and images.

Pure torch; no fairseq import, so the metric is usable from evaluation scripts and tests.

Conventions (what the speech-image papers report, see Table 2 of the paper):

* Images are de-duplicated: ``image_emb`` holds each image once and ``image_ids`` maps every
  utterance to its image; an image usually has several spoken captions (5 in Flickr8k and
  SpokenCOCO).
* Speech -> image: one query per utterance; a hit at K when its paired image is among the top K
  images.
* Image -> speech: one query per image; a hit at K when ANY of its captions is among the top K
  utterances.
* Mean = average of the two directions. Recalls are percentages (x100).
* Ties never flatter the model (see :func:`retrieval_recall` for the exact rank definitions).

The score matrix is never materialised or sorted: it is computed once, in blocks of utterances,
and ranks are obtained by counting.
"""

from typing import Dict, Iterable, Sequence, Tuple

import torch

__all__ = [
    "retrieval_recall",
    "chance_recall",
    "format_recall_table",
    "format_recall_rows",
]

# Float counts are exact below 2**24; beyond that we count in int64 (slower, never hit in practice).
_MAX_EXACT_FLOAT_COUNT = 2**24


def check_ks(ks: Iterable[int]) -> Tuple[int, ...]:
    try:
        ks = tuple(ks)
    except TypeError:
        raise TypeError(f"ks must be a sequence of positive ints, got {ks!r}") from None
    if not ks:
        raise ValueError("ks must not be empty")
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every K in ks must be a positive int, got {k!r}")
        if k not in out:
            out.append(k)
    return tuple(out)


def _check_inputs(speech_emb, image_emb, image_ids, chunk_size):
    for name, emb in (("speech_emb", speech_emb), ("image_emb", image_emb)):
        if not isinstance(emb, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(emb).__name__}")
        if emb.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(emb.shape)}")
        if not emb.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {emb.dtype}")
        if emb.shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(emb.shape)})")
        # One cheap reduction first; the elementwise check only runs when the sum is not finite.
        if not bool(torch.isfinite(emb.sum())) and not bool(torch.isfinite(emb).all()):
            raise ValueError(f"{name} contains NaN or inf")
    if speech_emb.shape[1] != image_emb.shape[1]:
        raise ValueError(
            "speech_emb and image_emb must have the same embedding dim, got "
            f"{tuple(speech_emb.shape)} and {tuple(image_emb.shape)}"
        )
    if speech_emb.dtype != image_emb.dtype:
        raise TypeError(f"speech_emb and image_emb must share a dtype, got {speech_emb.dtype} and {image_emb.dtype}")
    if speech_emb.device != image_emb.device:
        raise ValueError(
            f"speech_emb and image_emb must be on one device, got {speech_emb.device} and {image_emb.device}"
        )
    if not isinstance(image_ids, torch.Tensor):
        raise TypeError(f"image_ids must be a torch.Tensor, got {type(image_ids).__name__}")
    if image_ids.dim() != 1 or image_ids.shape[0] != speech_emb.shape[0]:
        raise ValueError(
            f"image_ids must have shape ({speech_emb.shape[0]},) (one per utterance), got {tuple(image_ids.shape)}"
        )
    if image_ids.is_floating_point() or image_ids.is_complex() or image_ids.dtype == torch.bool:
        raise TypeError(f"image_ids must be an integer tensor, got {image_ids.dtype}")
    num_images = image_emb.shape[0]
    lo, hi = int(image_ids.min()), int(image_ids.max())
    if lo < 0 or hi >= num_images:
        raise ValueError(f"image_ids must index image_emb rows in [0, {num_images}), got values in [{lo}, {hi}]")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


@torch.no_grad()
def retrieval_recall(
    speech_emb: torch.Tensor,
    image_emb: torch.Tensor,
    image_ids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
) -> Dict[str, float]:
    """Speech<->image retrieval recall at K, tie-pessimistic, in bounded memory.

    Args:
        speech_emb: (Ns, D) utterance embeddings, L2-normalised (similarity is the dot product;
            the function does not normalise).
        image_emb: (Ni, D) embeddings of the de-duplicated images, same dtype and device.
        image_ids: (Ns,) integer; ``image_ids[u]`` is the row of ``image_emb`` paired with
            utterance ``u``. The captions of image ``j`` are the utterances with ``image_ids == j``.
        ks: the K values (positive ints; duplicates are dropped).
        chunk_size: utterances per block of the score matrix; peak extra memory is about
            ``2 * Ni * chunk_size`` scores.

    Rank definitions (0-based; a hit at K when rank < K). With ``s[u, j] = speech_emb[u] .
    image_emb[j]``:

    * Speech -> image, query utterance ``u`` with target ``t = s[u, image_ids[u]]``:
      ``rank = #{j : s[u, j] > t} + #{j != image_ids[u] : s[u, j] == t}``.
      Every image tied with the paired one is ranked above it. Images without any caption are
      still candidates here.
    * Image -> speech, query image ``j`` with captions ``C_j`` (utterances paired with ``j``):
      the best caption counts, ``m = max_{u in C_j} s[u, j]``, and its competitors are the
      utterances NOT in ``C_j``: ``rank = #{u not in C_j : s[u, j] >= m}``. Other captions of
      the same image never push it down (they are right answers too), while every non-caption
      tied with the best caption is ranked above it. This equals "any caption in the top K"
      under tie-breaking that always favours the wrong answers.
    * Images with no caption are excluded from image -> speech (no right answer exists), so
      that direction averages over ``num_i2s_queries`` images.

    Implementation: the (Ni, chunk) block of scores is computed once per block of utterances.
    Speech -> image ranks are counts over the block's columns (exact: the target is read from
    the same block). Image -> speech needs the best caption score ``m``, known only after all
    blocks, so each image keeps the ``max(ks)`` highest non-caption scores seen so far (captions
    are masked to -inf in the block); at the end ``min(rank, max(ks)) = #{kept >= m}``, which
    decides every hit at K <= max(ks) exactly.

    Returns:
        dict with, for each K in ``ks``: ``s2i_r{K}``, ``i2s_r{K}``, ``mean_r{K}`` (percentages,
        float), ``s2i_hits_r{K}``, ``i2s_hits_r{K}`` (int counts); and ``num_s2i_queries`` (Ns),
        ``num_i2s_queries`` (images with >= 1 caption), ``num_images`` (Ni),
        ``num_images_without_caption``.
    """
    ks = check_ks(ks)
    _check_inputs(speech_emb, image_emb, image_ids, chunk_size)

    device = speech_emb.device
    dtype = speech_emb.dtype
    num_speech, num_images = speech_emb.shape[0], image_emb.shape[0]
    image_ids = image_ids.to(device=device, dtype=torch.long)
    max_k = max(ks)
    neg_inf = float("-inf")

    s2i_rank = torch.empty(num_speech, dtype=torch.long, device=device)
    best_caption = torch.full((num_images,), neg_inf, dtype=dtype, device=device)
    # Highest non-caption scores per image so far; -inf padding never reaches a finite best caption.
    top_noncaption = torch.full((num_images, max_k), neg_inf, dtype=dtype, device=device)
    # Counting through a float 0/1 buffer sums far faster than a bool tensor on CPU.
    count_in_float = num_images < _MAX_EXACT_FLOAT_COUNT
    block = min(chunk_size, num_speech)
    below_buf = torch.empty((num_images, block), dtype=torch.float32, device=device) if count_in_float else None
    columns_all = torch.arange(block, device=device)

    for start in range(0, num_speech, chunk_size):
        stop = min(start + chunk_size, num_speech)
        width = stop - start
        ids = image_ids[start:stop]
        columns = columns_all[:width]
        # (Ni, width): images as rows so that the per-image top-k runs along contiguous memory.
        scores = image_emb @ speech_emb[start:stop].T
        target = scores[ids, columns]

        # Speech -> image. Rank = (Ni - 1) - #{strictly below}: the target itself is never below,
        # every tie counts as above, and a NaN score (never below anything) counts as above too.
        if count_in_float:
            below = torch.lt(scores, target.unsqueeze(0), out=below_buf[:, :width])
            num_below = below.sum(dim=0).to(torch.long)
        else:
            num_below = torch.lt(scores, target.unsqueeze(0)).sum(dim=0)
        s2i_rank[start:stop] = (num_images - 1) - num_below

        # Image -> speech.
        best_caption.scatter_reduce_(0, ids, target, reduce="amax", include_self=True)
        scores[ids, columns] = neg_inf
        k = min(max_k, width)
        block_top = scores.topk(k, dim=1, sorted=False).values
        top_noncaption = torch.cat([top_noncaption, block_top], dim=1).topk(max_k, dim=1, sorted=False).values
        del scores, target

    # min(rank, max_k): kept values not strictly below the best caption (ties and NaN count above).
    i2s_rank = (~torch.lt(top_noncaption, best_caption.unsqueeze(1))).sum(dim=1)
    captions_per_image = torch.bincount(image_ids, minlength=num_images)
    has_caption = captions_per_image > 0
    num_i2s = int(has_caption.sum())

    results: Dict[str, float] = {}
    for k in ks:
        s2i_hits = int((s2i_rank < k).sum())
        i2s_hits = int(((i2s_rank < k) & has_caption).sum())
        s2i = 100.0 * s2i_hits / num_speech
        i2s = 100.0 * i2s_hits / num_i2s
        results[f"s2i_r{k}"] = s2i
        results[f"i2s_r{k}"] = i2s
        results[f"mean_r{k}"] = (s2i + i2s) / 2.0
        results[f"s2i_hits_r{k}"] = s2i_hits
        results[f"i2s_hits_r{k}"] = i2s_hits
    results["num_s2i_queries"] = num_speech
    results["num_i2s_queries"] = num_i2s
    results["num_images"] = num_images
    results["num_images_without_caption"] = num_images - num_i2s
    return results


def chance_recall(num_images: int, captions_per_image: int, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Expected R@K (percent) of a model that ranks candidates in uniformly random order.

    Assumes ``num_images`` images with exactly ``captions_per_image`` captions each, so
    ``Ns = num_images * captions_per_image`` utterances, and no ties.

    * Speech -> image: the paired image is one of ``Ni`` candidates: ``min(K, Ni) / Ni``.
    * Image -> speech: ``c`` captions among ``Ns`` utterances; a miss means the top K are all
      drawn from the ``Ns - c`` non-captions: ``1 - prod_{i<K} (Ns - c - i) / (Ns - i)``
      (a hypergeometric tail; 1 once ``K > Ns - c``).
    * Mean: the average of the two.

    Returns the same ``s2i_r{K}``, ``i2s_r{K}``, ``mean_r{K}`` keys as :func:`retrieval_recall`,
    so :func:`format_recall_table` can print a "chance" row.
    """
    ks = check_ks(ks)
    for name, value in (("num_images", num_images), ("captions_per_image", captions_per_image)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    num_speech = num_images * captions_per_image
    results: Dict[str, float] = {}
    for k in ks:
        s2i = min(k, num_images) / num_images
        all_miss = 1.0
        for i in range(k):
            if num_speech - captions_per_image - i <= 0:
                all_miss = 0.0
                break
            all_miss *= (num_speech - captions_per_image - i) / (num_speech - i)
        i2s = 1.0 - all_miss
        results[f"s2i_r{k}"] = 100.0 * s2i
        results[f"i2s_r{k}"] = 100.0 * i2s
        results[f"mean_r{k}"] = 100.0 * (s2i + i2s) / 2.0
    return results


_DIRECTIONS = (("s2i", "Speech→Image"), ("i2s", "Image→Speech"), ("mean", "Mean"))


def format_recall_rows(rows: Sequence[Tuple[str, Dict[str, float]]], ks: Sequence[int] = (1, 5, 10)) -> str:
    """Table 2 layout for several rows: one ``(label, results)`` pair per row, one decimal.

    ``results`` is a dict from :func:`retrieval_recall` or :func:`chance_recall`.
    """
    ks = check_ks(ks)
    label_width = max([len("Model")] + [len(label) for label, _ in rows])
    cell = 6
    group_width = cell * len(ks)
    sep = " | "
    header1 = (" " * label_width + sep + sep.join(f"{name:^{group_width}}" for _, name in _DIRECTIONS)).rstrip()
    header2 = (
        f"{'Model':<{label_width}}"
        + sep
        + sep.join("".join(f"{'R@' + str(k):>{cell}}" for k in ks) for _ in _DIRECTIONS)
    )
    lines = [header1, header2, "-" * len(header2)]
    for label, results in rows:
        groups = []
        for prefix, _ in _DIRECTIONS:
            cells = []
            for k in ks:
                key = f"{prefix}_r{k}"
                if key not in results:
                    raise KeyError(f"row {label!r} has no {key!r}; available: {sorted(results)}")
                cells.append(f"{float(results[key]):>{cell}.1f}")
            groups.append("".join(cells))
        lines.append(f"{label:<{label_width}}" + sep + sep.join(groups))
    return "\n".join(lines)


def format_recall_table(results: Dict[str, float], title: str, ks: Sequence[int] = (1, 5, 10)) -> str:
    """One-row Table 2 layout (Speech→Image | Image→Speech | Mean, R@1 R@5 R@10), ``title`` as
    the row label; see :func:`format_recall_rows` for several rows under one header."""
    return format_recall_rows([(title, results)], ks=ks)
