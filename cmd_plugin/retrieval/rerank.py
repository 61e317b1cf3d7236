"""Coarse-to-fine retrieval at test time: SIC top-K, re-scored by the SIM head.

For every speech query the K images with the highest SIC similarity, and for every image query
the K utterances with the highest SIC similarity, are re-scored by a pairwise scoring callable
(the multimodal encoder + matching head) and re-ordered by

    score = SIM(u, j) + w * SIC(u, j),  SIM the match logit, SIC the cosine similarity, with
    w = 0   "sim"            (ALBEF: the match logit alone),
    w = 1   "sim+sic"        (BLIP: match logit + cosine), or
    w = 1/τ "sim+sic_logit"  (match logit + SIC logit cos/τ with the model's temperature: both
                              scores on the log-odds scale their losses trained them on; a choice)

Candidates outside the top K stay below every re-ranked one, so R@k is defined for k <= K (in each
direction on its own; any k where K lists every candidate).
Pure torch, no fairseq. :func:`reranked_recall` turns the result into the same dict as
:func:`cmd_plugin.retrieval.recall.retrieval_recall`, with the same tie conventions (ties never flatter
the model; image -> speech counts a hit when any caption is among the top k).
"""

from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch

from ..modules.multimodal import match_score
from ..objectives.c2f.losses import ranking_pairs
from .recall import check_ks

__all__ = [
    "RERANK_SCORES",
    "DEFAULT_RERANK_SCORE",
    "sic_weight",
    "RerankResult",
    "SequencePairScorer",
    "sic_topk",
    "rerank",
    "reranked_recall",
    "top1_changes",
    "sim_split_auc",
]

# (speech_index (P,), image_index (P,)) int64 on the CPU -> (P,) scores
PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

RERANK_SCORES = ("sim", "sim+sic", "sim+sic_logit")
DEFAULT_RERANK_SCORE = "sim+sic_logit"  # chosen on the demo's valid split (docs/c2f.md); the task's default


def sic_weight(score: str, logit_scale: float = 1.0) -> float:
    """w of ``score = SIM + w * SIC cosine`` for a re-ranking score kind (module docstring);
    ``logit_scale`` = 1/τ of the model (``model.logit_scale.exp()``), used by "sim+sic_logit"."""
    if score not in RERANK_SCORES:
        raise ValueError(f"re-ranking score must be one of {RERANK_SCORES}, got {score!r}")
    return {"sim": 0.0, "sim+sic": 1.0, "sim+sic_logit": float(logit_scale)}[score]


@dataclass
class RerankResult:
    """Re-ranked candidate lists of both directions.

    s2i_index (Ns, Ks) image rows of each utterance's SIC top-Ks (Ks = min(K, Ni)), in SIC order;
    s2i_scores (Ns, Ks) their re-ranking scores (float32);
    i2s_index (Ni, Kt) utterance rows of each image's SIC top-Kt (Kt = min(K, Ns));
    i2s_scores (Ni, Kt) their re-ranking scores;
    num_pairs: distinct (utterance, image) pairs scored (both directions share pairs).
    """

    s2i_index: torch.Tensor
    s2i_scores: torch.Tensor
    i2s_index: torch.Tensor
    i2s_scores: torch.Tensor
    num_pairs: int

    @property
    def k(self) -> int:
        return min(self.s2i_index.size(1), self.i2s_index.size(1))

    def dense(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Full score matrices: s2i (Ns, Ni) and i2s (Ni, Ns), -inf outside each query's top K
        (ALBEF's score matrices, which fill them with -100)."""
        ns, ni = self.s2i_index.size(0), self.i2s_index.size(0)
        s2i = torch.full((ns, ni), float("-inf"))
        s2i.scatter_(1, self.s2i_index, self.s2i_scores)
        i2s = torch.full((ni, ns), float("-inf"))
        i2s.scatter_(1, self.i2s_index, self.i2s_scores)
        return s2i, i2s


@torch.no_grad()
def _topk_rows(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    values, indices = [], []
    for start in range(0, queries.size(0), chunk_size):
        scores = queries[start : start + chunk_size] @ keys.T
        v, i = scores.topk(k, dim=1)
        values.append(v)
        indices.append(i)
    return torch.cat(values).float().cpu(), torch.cat(indices).cpu()


@torch.no_grad()
def sic_topk(speech_emb: torch.Tensor, image_emb: torch.Tensor, k: int, chunk_size: int = 4096):
    """SIC candidates of both directions (similarity = dot product of the unit-norm embeddings).

    Returns (s2i_sims (Ns, Ks), s2i_index (Ns, Ks), i2s_sims (Ni, Kt), i2s_index (Ni, Kt)), on the
    CPU, each row sorted by decreasing similarity; Ks = min(k, Ni), Kt = min(k, Ns).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"re-ranking K must be a positive int, got {k!r}")
    for name, emb in (("speech_emb", speech_emb), ("image_emb", image_emb)):
        if emb.dim() != 2 or emb.size(0) == 0:
            raise ValueError(f"{name} must be a non-empty (N, D) tensor, got {tuple(emb.shape)}")
    if speech_emb.size(1) != image_emb.size(1):
        raise ValueError(
            f"speech_emb and image_emb differ in dim: {tuple(speech_emb.shape)} vs {tuple(image_emb.shape)}"
        )
    s2i = _topk_rows(speech_emb, image_emb, min(k, image_emb.size(0)), chunk_size)
    i2s = _topk_rows(image_emb, speech_emb, min(k, speech_emb.size(0)), chunk_size)
    return s2i + i2s


@torch.no_grad()
def rerank(
    speech_emb: torch.Tensor,
    image_emb: torch.Tensor,
    pair_score: PairScorer,
    k: int,
    sic_weight: float = 0.0,
    pair_batch: int = 256,
    chunk_size: int = 4096,
) -> RerankResult:
    """Re-score each query's SIC top-K with ``pair_score``, in both directions.

    Args:
        speech_emb: (Ns, D) unit-norm utterance embeddings (SIC space).
        image_emb: (Ni, D) unit-norm embeddings of the de-duplicated images.
        pair_score: callable ``(speech_index (P,), image_index (P,)) -> (P,)`` scores, e.g. the
            match logit of the multimodal encoder on utterance ``speech_index[p]`` and image
            ``image_index[p]``. Called with P <= ``pair_batch`` pairs at a time, sorted by
            utterance then image (so the caller can reuse an utterance's sequence); each
            distinct pair is scored once even when both directions rank it.
        k: candidates per query (clipped to the number of candidates).
        sic_weight: w of score = SIM + w * SIC cosine (:func:`sic_weight`; 0 = SIM alone, ALBEF).
        pair_batch: pairs per call of ``pair_score``.
    Returns:
        :class:`RerankResult`.
    """
    if isinstance(pair_batch, bool) or not isinstance(pair_batch, int) or pair_batch < 1:
        raise ValueError(f"pair_batch must be a positive int, got {pair_batch!r}")
    s2i_sims, s2i_index, i2s_sims, i2s_index = sic_topk(speech_emb, image_emb, k, chunk_size)
    num_speech, num_images = speech_emb.size(0), image_emb.size(0)

    # distinct (utterance, image) pairs of both directions, keyed u * Ni + j (sorted by u, then j)
    s2i_keys = torch.arange(num_speech)[:, None] * num_images + s2i_index
    i2s_keys = i2s_index * num_images + torch.arange(num_images)[:, None]
    keys, inverse = torch.unique(torch.cat([s2i_keys.reshape(-1), i2s_keys.reshape(-1)]), return_inverse=True)
    scores = torch.empty(keys.numel(), dtype=torch.float32)
    for start in range(0, keys.numel(), pair_batch):
        part = keys[start : start + pair_batch]
        out = pair_score(part // num_images, part % num_images)
        out = torch.as_tensor(out).detach().float().cpu().reshape(-1)
        if out.numel() != part.numel():
            raise ValueError(f"pair_score returned {out.numel()} scores for {part.numel()} pairs")
        scores[start : start + part.numel()] = out
    split = s2i_keys.numel()
    s2i_scores = scores[inverse[:split]].view_as(s2i_index)
    i2s_scores = scores[inverse[split:]].view_as(i2s_index)
    if sic_weight:
        s2i_scores = s2i_scores + sic_weight * s2i_sims
        i2s_scores = i2s_scores + sic_weight * i2s_sims
    return RerankResult(s2i_index, s2i_scores, i2s_index, i2s_scores, int(keys.numel()))


def reranked_recall(result: RerankResult, image_ids: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """R@k of re-ranked lists, for k <= K in each direction (any k where K lists every candidate), in
    :func:`cmd_plugin.retrieval.recall.retrieval_recall`'s
    format and rank definitions restricted to the K candidates (a right answer outside them is
    a miss at every k <= K):

    * speech -> image, utterance u, paired image t: a miss when t is not among the candidates,
      else ``rank = #{candidates scored > s_t} + #{other candidates scored == s_t}``.
    * image -> speech, image j: ``m`` = best score of j's captions among its candidates (a miss
      when none is there); ``rank = #{non-caption candidates scored >= m}``. Images without
      captions are left out.

    Args:
        result: from :func:`rerank`.
        image_ids: (Ns,) image row of every utterance.
    """
    ks = check_ks(ks)
    num_speech, num_images = result.s2i_index.size(0), result.i2s_index.size(0)
    # each direction on its own: R@k is defined for k <= its K, or any k when its K lists every candidate
    for direction, listed, candidates in (
        ("speech -> image", result.s2i_index.size(1), num_images),
        ("image -> speech", result.i2s_index.size(1), num_speech),
    ):
        if max(ks) > listed and listed < candidates:
            raise ValueError(
                f"re-ranked {direction} recall is defined for k <= K = {listed} (of {candidates} "
                f"candidates), got ks {list(ks)}: raise --rerank-k"
            )
    miss = num_images + num_speech  # a right answer outside the K candidates: a miss at every k
    image_ids = image_ids.detach().cpu().long()
    if image_ids.shape != (num_speech,):
        raise ValueError(f"image_ids must have shape ({num_speech},), got {tuple(image_ids.shape)}")

    # speech -> image
    is_target = result.s2i_index == image_ids[:, None]  # (Ns, Ks), at most one True per row
    found = is_target.any(dim=1)
    target = torch.where(is_target, result.s2i_scores, torch.zeros_like(result.s2i_scores)).sum(dim=1)
    below = (result.s2i_scores < target[:, None]).sum(dim=1)
    s2i_rank = torch.where(found, (result.s2i_scores.size(1) - 1) - below, torch.full_like(below, miss))

    # image -> speech
    is_caption = image_ids[result.i2s_index] == torch.arange(num_images)[:, None]  # (Ni, Kt)
    has_caption_listed = is_caption.any(dim=1)
    best = torch.where(is_caption, result.i2s_scores, torch.full_like(result.i2s_scores, float("-inf"))).amax(dim=1)
    above = (~is_caption & ~(result.i2s_scores < best[:, None])).sum(dim=1)
    i2s_rank = torch.where(has_caption_listed, above, torch.full_like(above, miss))
    has_caption = torch.bincount(image_ids, minlength=num_images) > 0
    num_i2s = int(has_caption.sum())

    out: Dict[str, float] = {}
    for k in ks:
        s2i_hits = int((s2i_rank < k).sum())
        i2s_hits = int(((i2s_rank < k) & has_caption).sum())
        s2i = 100.0 * s2i_hits / num_speech
        i2s = 100.0 * i2s_hits / num_i2s
        out[f"s2i_r{k}"], out[f"i2s_r{k}"], out[f"mean_r{k}"] = s2i, i2s, (s2i + i2s) / 2.0
        out[f"s2i_hits_r{k}"], out[f"i2s_hits_r{k}"] = s2i_hits, i2s_hits
    out["num_s2i_queries"] = num_speech
    out["num_i2s_queries"] = num_i2s
    out["num_images"] = num_images
    out["num_images_without_caption"] = num_images - num_i2s
    out["rerank_k"] = result.k
    return out


def top1_changes(result: RerankResult, image_ids: torch.Tensor) -> Dict[str, int]:
    """What re-ranking did to each query's first answer, per direction: ``fixed`` (SIC's first
    candidate wrong, the re-ranked first right), ``broken`` (the reverse), ``kept_right`` and
    ``kept_wrong``. "First" is the first column of the SIC candidate list and the candidate with the
    highest re-ranking score (the first such column on a tie); right = the utterance's image, or one
    of the image's captions."""
    image_ids = image_ids.detach().cpu().long()
    right = {
        "s2i": (result.s2i_index == image_ids[:, None], result.s2i_scores),
        "i2s": (image_ids[result.i2s_index] == torch.arange(result.i2s_index.size(0))[:, None], result.i2s_scores),
    }
    out = {}
    for direction, (is_right, scores) in right.items():
        sic_first = is_right[:, 0]
        reranked_first = is_right.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
        out[f"{direction}_fixed"] = int((~sic_first & reranked_first).sum())
        out[f"{direction}_broken"] = int((sic_first & ~reranked_first).sum())
        out[f"{direction}_kept_right"] = int((sic_first & reranked_first).sum())
        out[f"{direction}_kept_wrong"] = int((~sic_first & ~reranked_first).sum())
    return out


@torch.no_grad()
def sim_split_auc(
    speech_emb: torch.Tensor,
    image_emb: torch.Tensor,
    image_ids: torch.Tensor,
    pair_score: PairScorer,
    generator: torch.Generator,
    pair_batch: int = 256,
) -> Dict[str, float]:
    """How well the matching head tells each utterance's image from other images, over a whole split:
    the AUC of the scores of the N positive pairs against N hard negatives (each utterance's most
    SIC-similar other image) and against N random negatives (a uniformly drawn other image).

    speech_emb (N, D), image_emb (I, D) unit norm; image_ids (N,) image row of each utterance; I >= 2.
    Returns {"auc_hard", "auc_random", "pairs": N, "sic_auc_hard", "sic_auc_random"}: the last two
    rank the same pairs by the SIC cosine (what re-ranking by the head alone replaces)."""
    num, num_images = speech_emb.size(0), image_emb.size(0)
    if num_images < 2:
        raise ValueError("SIM AUC needs at least two images (a negative for every utterance)")
    image_ids = image_ids.long().cpu()
    rows = torch.arange(num)
    sims = (speech_emb.float() @ image_emb.float().t()).cpu()
    positive_sims = sims[rows, image_ids].clone()
    sims[rows, image_ids] = float("-inf")
    hard = sims.argmax(dim=1)
    offset = torch.randint(1, num_images, (num,), generator=generator)
    random = (image_ids + offset) % num_images  # uniform over the other images
    speech_index = torch.cat([rows, rows, rows])
    image_index = torch.cat([image_ids, hard, random])
    scores = torch.cat(
        [
            torch.as_tensor(pair_score(speech_index[i : i + pair_batch], image_index[i : i + pair_batch]))
            .float()
            .cpu()
            .reshape(-1)
            for i in range(0, speech_index.numel(), pair_batch)
        ]
    )
    pos, neg_hard, neg_random = scores[:num], scores[num : 2 * num], scores[2 * num :]
    out = {"pairs": num}
    for name, negatives in (("auc_hard", neg_hard), ("auc_random", neg_random)):
        above, compared = ranking_pairs(pos, negatives)
        out[name] = above / compared
    for name, negatives in (("sic_auc_hard", sims[rows, hard]), ("sic_auc_random", sims[rows, random])):
        above, compared = ranking_pairs(positive_sims, negatives)
        out[name] = above / compared
    return out


class SequencePairScorer:
    """The matching head as :func:`rerank`'s pair scorer: the match logit of
    utterance ``u`` and image ``j`` from kept speech sequences and image tokens.

    Args:
        model: a ``cmd_speech_image`` model with a matching head (put in eval mode here).
        sequences: per utterance its speech layer output (1+T'_u, D), unpadded (fp16 is fine).
        tokens: (U, 1+N, E) image tokens (:func:`cmd_plugin.modules.multimodal.image_tokens`).
        device: where the head runs (default: the model's).
    """

    def __init__(self, model, sequences, tokens, device=None, score_kind: str = "logit"):
        if getattr(model, "multimodal", None) is None:
            raise ValueError("re-ranking needs a model with a matching head (model.multimodal_layers > 0)")
        self.model = model
        self.sequences = sequences
        self.tokens = tokens
        self.device = device or next(model.multimodal.parameters()).device
        self.dtype = next(model.multimodal.parameters()).dtype
        self.score = lambda logits: match_score(logits, score_kind)
        self.num_pairs = 0

    @torch.no_grad()
    def __call__(self, speech_index: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        seqs = [self.sequences[int(u)] for u in speech_index]
        longest = max(s.size(0) for s in seqs)
        dim = seqs[0].size(1)
        batch = torch.zeros(len(seqs), longest, dim, dtype=self.dtype, device=self.device)
        mask = torch.ones(len(seqs), longest, dtype=torch.bool, device=self.device)
        for p, s in enumerate(seqs):
            batch[p, : s.size(0)] = s.to(self.device, self.dtype)
            mask[p, : s.size(0)] = False
        tokens = self.tokens[image_index.cpu()].to(self.device, self.dtype)
        logits = self.model.match_logits(batch, mask, tokens)
        self.model.train(was_training)
        self.num_pairs += len(seqs)
        return self.score(logits).float().cpu()
