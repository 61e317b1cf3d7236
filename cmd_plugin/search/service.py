"""Answering search queries with a loaded checkpoint and read-only indexes.

    service = SearchService(encoder, image_index=load_index("photos.pt"), audio_index=load_index("clips.pt"))
    found = service.search_images("query.wav", top_k=10, rerank_k=32)   # speech -> images
    found = service.search_clips("beach.jpg", top_k=10)                   # image -> spoken clips
    found.hits[0].path, found.hits[0].score, found.timings["embed"]

Both directions rank by the SIC cosine similarity of the joint-space embeddings; with
``rerank_k = K > 0`` (a coarse-to-fine checkpoint loaded with its matching head:
``SpeechImageEncoder.from_checkpoint(..., keep_matching=True)``) the SIC top K are
re-scored by the matching head (``rerank_score`` "sim": its match logit, ALBEF; "sim+sic": logit
+ cosine, BLIP; "sim+sic_logit": logit + cosine / τ) and put first in that order, the rest following in SIC order, as
:mod:`cmd_plugin.retrieval.rerank` does for whole splits. Re-scoring needs what the indexes do not keep:
the K images' patch tokens (the images are read and encoded again) or the K clips' speech
sequences (the clips are read and encoded again). A clip longer than the model's limit is scored
by the mean of its windows' scores.

Every answer carries the time of each step (seconds): ``decode`` (reading and resampling the
query), ``embed``, ``search``, ``rerank`` and ``total``.

Thread safety: the service only reads (indexes, the approximate index deserialised once, the
model in eval mode under ``torch.inference_mode``), so concurrent calls from several threads
answer independently (the HuBERT upstream keeps per-call state per thread). Nothing is written.
"""

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..inference import IDENTITY_WORDS, InferenceError, check_audible, load_image
from ..loading import why_no_matching_head
from ..modules.multimodal import image_tokens, match_score
from ..retrieval.rerank import DEFAULT_RERANK_SCORE, RERANK_SCORES, sic_weight
from .index import SearchIndex, SearchIndexError, check_identity, import_faiss, load_approximate, search

logger = logging.getLogger(__name__)

DEFAULT_RERANK_K = 32  # a choice, when the checkpoint's config has no task.valid_rerank_k > 0


@dataclass
class Hit:
    """One result: ``score`` orders the list (the re-ranking score when ``reranked``, else the cosine)."""

    rank: int
    score: float
    cosine: float
    path: str
    absolute_path: str
    match: Optional[float] = None  # the matching head's score (re-ranked hits)
    reranked: bool = False
    note: str = ""

    def as_dict(self) -> Dict[str, Any]:
        return {
            "rank": self.rank,
            "score": round(self.score, 6),
            "cosine": round(self.cosine, 6),
            "match": None if self.match is None else round(self.match, 6),
            "reranked": self.reranked,
            "path": self.path,
            "absolute_path": self.absolute_path,
            **({"note": self.note} if self.note else {}),
        }


@dataclass
class Answer:
    """The ranked hits of one query, how they were found, and the time of each step."""

    hits: List[Hit]
    method: str
    timings: Dict[str, float]
    rerank: Optional[Dict[str, Any]] = None  # {"k", "score", "scored"} when re-ranked
    query_wave: Optional[torch.Tensor] = None  # (T,) what the model heard (speech queries)
    extra: Dict[str, Any] = field(default_factory=dict)


def rerank_order(
    cosines: Sequence[float], match: Sequence[Optional[float]], k: int, score: str, logit_scale: float = 1.0
) -> List[Tuple[int, float]]:
    """Positions of the candidates (SIC order) after re-ranking the first ``k`` -> [(position,
    score)]: the re-scored ones by decreasing score (ties keep SIC order), then those that could not
    be re-scored (``match`` None) and the candidates past K, in SIC order with their cosine."""
    weight = sic_weight(score, logit_scale)  # refuses an unknown score
    k = min(k, len(cosines))
    scored = [(i, match[i] + weight * cosines[i]) for i in range(k) if match[i] is not None]
    scored.sort(key=lambda item: -item[1])  # stable: ties keep SIC order
    rest = [(i, cosines[i]) for i in range(k) if match[i] is None] + [(i, cosines[i]) for i in range(k, len(cosines))]
    return scored + rest


def configured_rerank_score(task_cfg) -> str:
    """The re-ranking score a checkpoint was tuned with (its ``task.valid_rerank_score``), or
    :data:`DEFAULT_RERANK_SCORE` when it names none or an unknown one."""
    score = str(getattr(task_cfg, "valid_rerank_score", None) or DEFAULT_RERANK_SCORE)
    return score if score in RERANK_SCORES else DEFAULT_RERANK_SCORE


def embed_images_with_tokens(encoder, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Q, 3, H, W) preprocessed images -> ((Q, E) unit-norm I_cls on the CPU, as
    ``encoder.embed_pixels``, and (Q, 1+N, E) image tokens on the model's device, the matching
    head's input), from one pass of the image tower."""
    with torch.inference_mode():
        with encoder.autocast():
            cls, patches = encoder.model.encode_image(pixels.to(encoder.device))
        emb = torch.nn.functional.normalize(cls.float(), dim=-1).cpu()
        return emb, image_tokens(cls.float(), patches.float())


@torch.no_grad()
def match_pair_logits(
    encoder, sequences: Sequence[torch.Tensor], tokens: torch.Tensor, token_rows=None, batch_size: int = 64
) -> torch.Tensor:
    """(P,) match logits on the CPU of P (speech sequence (1+T', D), image tokens) pairs, ``batch_size``
    pairs at a time (sequences padded, with a mask): pair p's image tokens are ``tokens[p]`` or, with
    ``token_rows`` (P,), ``tokens[token_rows[p]]`` (gathered one batch at a time)."""
    model = encoder.model
    head = next(model.multimodal.parameters())
    out = []
    for start in range(0, len(sequences), batch_size):
        seqs = sequences[start : start + batch_size]
        longest = max(s.size(0) for s in seqs)
        batch = torch.zeros(len(seqs), longest, seqs[0].size(1), dtype=head.dtype, device=head.device)
        mask = torch.ones(len(seqs), longest, dtype=torch.bool, device=head.device)
        for p, s in enumerate(seqs):
            batch[p, : s.size(0)] = s.to(head.device, head.dtype)
            mask[p, : s.size(0)] = False
        part = slice(start, start + batch_size)
        rows = tokens[part] if token_rows is None else tokens[token_rows[part]]
        with encoder.autocast():
            logits = model.match_logits(batch, mask, rows.to(head.device))
        out.append(match_score(logits, "logit").float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def window_match_logits(
    encoder, windows: Sequence[Sequence[torch.Tensor]], tokens: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """(Q, M) matching-head scores of Q spoken queries against M images on the CPU: query q's score
    for image m is the mean of the match logits of q's windows (``embed_waveforms(...,
    return_sequences=True)``: one sequence per window) with image m's tokens (``tokens`` (M, 1+N, E))."""
    num = tokens.size(0)
    counts = torch.tensor([len(w) for w in windows], dtype=torch.float32)
    if (counts == 0).any():
        raise ValueError("every spoken query needs at least one window's sequence")
    pairs = [(q, w, m) for q, query in enumerate(windows) for w in range(len(query)) for m in range(num)]
    scores = match_pair_logits(
        encoder,
        [windows[q][w] for q, w, _ in pairs],
        tokens,
        token_rows=torch.tensor([m for _, _, m in pairs], dtype=torch.long),
        batch_size=batch_size,
    )
    where = torch.tensor([q * num + m for q, _, m in pairs], dtype=torch.long)
    sums = torch.zeros(len(windows) * num).index_add_(0, where, scores)
    return sums.view(len(windows), num) / counts[:, None]


class SearchService:
    """A loaded :class:`~cmd_plugin.inference.SpeechImageEncoder` and up to two indexes:
    ``image_index`` (speech -> images) and ``audio_index`` of spoken clips (image -> speech).
    Each index is checked against the model (image / speech identity) here, once."""

    def __init__(
        self,
        encoder,
        image_index: Optional[SearchIndex] = None,
        audio_index: Optional[SearchIndex] = None,
        max_query_seconds: Optional[float] = None,
        match_batch: int = 64,
        exact: Optional[bool] = None,
        nprobe: Optional[int] = None,
    ):
        if image_index is None and audio_index is None:
            raise SearchIndexError("give an index of images, of spoken clips, or both")
        for index, modality in ((image_index, "image"), (audio_index, "audio")):
            if index is not None and index.modality != modality:
                raise SearchIndexError(
                    f"{index.source}: an index of {index.what}, expected one of "
                    f"{'images' if modality == 'image' else 'spoken clips'}"
                )
            if index is not None and len(index) == 0:
                raise SearchIndexError(f"{index.source}: the index holds no {index.what}")
        self.encoder = encoder
        self.image_index, self.audio_index = image_index, audio_index
        if image_index is not None:
            check_identity(image_index, encoder.identity, IDENTITY_WORDS)
        if audio_index is not None:
            check_identity(audio_index, encoder.speech_identity, IDENTITY_WORDS)
        self._ann = {}
        for index in (image_index, audio_index):
            if index is not None and index.approximate is not None:
                try:
                    import_faiss()
                    self._ann[index.modality] = load_approximate(index.approximate)
                except SearchIndexError:
                    pass  # search() says it fell back to exact search
        self.max_query_seconds = max_query_seconds
        self.exact, self.nprobe = exact, nprobe  # as search(): None = the approximate index when there is one
        self.match_batch = match_batch
        cfg = encoder.task.cfg
        self.default_rerank_k = int(getattr(cfg, "valid_rerank_k", 0) or 0) or DEFAULT_RERANK_K
        self.default_rerank_score = configured_rerank_score(cfg)

    @property
    def has_matching_head(self) -> bool:
        return self.encoder.has_matching_head

    def check_rerank(self, rerank_k: int, rerank_score: Optional[str]) -> str:
        """Validate the re-ranking options; returns the score kind to use."""
        score = rerank_score or self.default_rerank_score
        if isinstance(rerank_k, bool) or not isinstance(rerank_k, int) or rerank_k < 0:
            raise SearchIndexError(f"re-ranking K must be a whole number >= 0 (0 = off), got {rerank_k!r}")
        if rerank_k and not self.has_matching_head:
            why = why_no_matching_head(self.encoder.model, self.encoder.checkpoint)
            raise SearchIndexError(f"{why}; search without re-ranking")
        if score not in RERANK_SCORES:
            raise SearchIndexError(f"re-ranking score must be one of {RERANK_SCORES}, got {score!r}")
        return score

    # ---------------------------------------------------------------- speech -> images

    def read_query_audio(self, audio, name: Optional[str] = None) -> torch.Tensor:
        """A path or (samples, rate) -> (T,) 16 kHz mono, refused when silent, shorter than the
        model's minimum or longer than ``max_query_seconds``."""
        enc = self.encoder
        if isinstance(audio, (str, os.PathLike)):
            name = name or os.fspath(audio)
            wave = enc.load_audio(os.fspath(audio))
        else:
            wave = enc.load_audio(audio, name=name or "audio")
            name = name or "audio"
        seconds = wave.numel() / enc.sample_rate
        if self.max_query_seconds is not None and seconds > self.max_query_seconds:
            raise InferenceError(
                f"{name}: {seconds:.1f} s of audio, longer than this server's limit of "
                f"{self.max_query_seconds:g} s per query (--max-query-seconds)"
            )
        if wave.numel() < enc.min_samples:
            enc.windows(wave, name)  # raises: shorter than the model's minimum
        check_audible(wave, name)
        return wave

    def search_images(
        self, audio, top_k: int = 10, rerank_k: int = 0, rerank_score: Optional[str] = None, name: Optional[str] = None
    ) -> Answer:
        """Images of the image index for one spoken query (a path or (samples, rate))."""
        if self.image_index is None:
            raise SearchIndexError("no index of images was given: speech -> image search is off")
        self.check_rerank(rerank_k, rerank_score)
        started = time.perf_counter()
        wave = self.read_query_audio(audio, name)
        decoded = time.perf_counter()
        label = name or (os.fspath(audio) if isinstance(audio, (str, os.PathLike)) else "audio")
        with torch.inference_mode():
            emb, sequences = self.encoder.embed_waveforms([wave], [label], return_sequences=True)
        embedded = time.perf_counter()
        answer = self.rank_images(emb, sequences, top_k, rerank_k, rerank_score)[0]
        answer.timings.update(decode=decoded - started, embed=embedded - decoded, total=time.perf_counter() - started)
        answer.query_wave = wave
        return answer

    def explain_hits(self, answer: Answer, k: int, wave: Optional[torch.Tensor] = None) -> Answer:
        """Why each of the top ``k`` images of a spoken query (``wave``, default ``answer.query_wave``):
        its first map (:meth:`SpeechImageEncoder.explain`: the value-path cosine, which pointed best;
        the matching head's Grad-CAM or the plain patch cosine for towers without a value path) in ``answer.extra["explanations"]`` {rank:
        Explanation}; an image or clip that cannot be explained gets its reason in
        ``answer.extra["explain_errors"]``. Adds ``answer.timings["explain"]``."""
        wave = answer.query_wave if wave is None else wave
        if wave is None:
            raise SearchIndexError("explaining results needs the spoken query's waveform")
        started = time.perf_counter()
        explanations, errors = {}, {}
        hits = answer.hits[: max(0, int(k))]
        if hits:
            maps = self.encoder.explain_images(
                (wave.numpy(), self.encoder.sample_rate),
                [h.absolute_path for h in hits],
                keep_errors=True,
                first_only=True,
            )
            for hit, found in zip(hits, maps):
                if isinstance(found, InferenceError):
                    errors[hit.rank] = str(found)
                else:
                    explanations[hit.rank] = found[0]
        answer.extra["explanations"], answer.extra["explain_errors"] = explanations, errors
        answer.timings["explain"] = time.perf_counter() - started
        return answer

    def rank_images(
        self, queries: torch.Tensor, sequences, top_k: int = 10, rerank_k: int = 0, rerank_score: Optional[str] = None
    ) -> List[Answer]:
        """Answers for Q embedded spoken queries (Q, E) (one search over the index for all), each
        re-ranked with its windows' sequences (``embed_waveforms(..., return_sequences=True)``)."""
        score = self.check_rerank(rerank_k, rerank_score)
        with torch.inference_mode():
            answers = self._ranked(self.image_index, queries, top_k, rerank_k)
            for answer, windows in zip(answers, sequences):
                if rerank_k:
                    started = time.perf_counter()
                    self._rerank(answer, rerank_k, score, lambda rows: self._image_match(windows, rows))
                    answer.timings["rerank"] = time.perf_counter() - started
        return answers

    def image_tokens_of(self, paths: Sequence[str]):
        """Image files -> ((M, 1+N, E) tokens of those that could be read, positions read, failures)."""
        pixels, read, failed = [], [], []
        for i, path in enumerate(paths):
            try:
                pixels.append(load_image(path, self.encoder.transform))
                read.append(i)
            except InferenceError as err:
                failed.append((i, str(err)))
        if not pixels:
            return None, read, failed
        return embed_images_with_tokens(self.encoder, torch.stack(pixels))[1], read, failed

    def _image_match(self, windows: List[torch.Tensor], rows: Sequence[int]) -> List[Optional[float]]:
        """Matching-head scores of one query (its windows' sequences) against index rows; None for
        an image that cannot be read any more."""
        index = self.image_index
        tokens, read, _ = self.image_tokens_of([index.absolute_path(r) for r in rows])
        out: List[Optional[float]] = [None] * len(rows)
        if tokens is None:
            return out
        scores = window_match_logits(self.encoder, [windows], tokens, batch_size=self.match_batch)[0]
        for t, position in enumerate(read):
            out[position] = float(scores[t])
        return out

    # ---------------------------------------------------------------- image -> speech

    def search_clips(
        self, image, top_k: int = 10, rerank_k: int = 0, rerank_score: Optional[str] = None, name: Optional[str] = None
    ) -> Answer:
        """Spoken clips of the audio index for one image query (a path or a PIL image)."""
        if self.audio_index is None:
            raise SearchIndexError(
                "no index of spoken clips was given: image -> speech search is off "
                "(build one with examples/search.py index-audio)"
            )
        self.check_rerank(rerank_k, rerank_score)
        started = time.perf_counter()
        pixels = load_image(image, self.encoder.transform, name=name)
        decoded = time.perf_counter()
        emb, tokens = self.embed_image_queries(pixels[None])
        embedded = time.perf_counter()
        answer = self.rank_clips(emb, tokens, top_k, rerank_k, rerank_score)[0]
        answer.timings.update(decode=decoded - started, embed=embedded - decoded, total=time.perf_counter() - started)
        return answer

    def embed_image_queries(self, pixels: torch.Tensor):
        """(Q, 3, H, W) preprocessed query images -> ((Q, E) unit-norm I_cls on the CPU, (Q, 1+N, E) tokens)."""
        return embed_images_with_tokens(self.encoder, pixels)

    def rank_clips(
        self,
        queries: torch.Tensor,
        tokens: torch.Tensor,
        top_k: int = 10,
        rerank_k: int = 0,
        rerank_score: Optional[str] = None,
    ) -> List[Answer]:
        """Answers for Q embedded image queries (Q, E), re-ranked with their tokens (Q, 1+N, E)."""
        score = self.check_rerank(rerank_k, rerank_score)
        with torch.inference_mode():
            answers = self._ranked(self.audio_index, queries, top_k, rerank_k)
            for q, answer in enumerate(answers):
                if rerank_k:
                    started = time.perf_counter()
                    self._rerank(answer, rerank_k, score, lambda rows: self._clip_match(tokens[q], rows))
                    answer.timings["rerank"] = time.perf_counter() - started
        return answers

    def _clip_match(self, tokens: torch.Tensor, rows: Sequence[int]) -> List[Optional[float]]:
        """Matching-head scores of one image (tokens (1+N, E)) against clips of the audio index;
        None for a clip that cannot be read any more."""
        index, enc = self.audio_index, self.encoder
        waves, names, read = [], [], []
        for position, row in enumerate(rows):
            path = index.absolute_path(row)
            try:
                waves.append(enc.load_audio(path))
                names.append(path)
                read.append(position)
            except InferenceError as err:
                logger.warning(f"not re-ranked: {err}")
        out: List[Optional[float]] = [None] * len(rows)
        if not waves:
            return out
        _, sequences = enc.embed_waveforms(waves, names, return_sequences=True)
        scores = window_match_logits(enc, sequences, tokens[None], batch_size=self.match_batch)[:, 0]
        for c, position in enumerate(read):
            out[position] = float(scores[c])
        return out

    # ---------------------------------------------------------------- shared

    def _ranked(self, index: SearchIndex, queries: torch.Tensor, top_k: int, rerank_k: int) -> List[Answer]:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise SearchIndexError(f"the number of results must be a whole number >= 1, got {top_k!r}")
        found = search(
            index,
            queries,
            k=max(top_k, rerank_k),
            exact=self.exact,
            nprobe=self.nprobe,
            ann=self._ann.get(index.modality),
        )
        answers = []
        for rows, cosines in zip(found.rows, found.scores):
            hits = [
                Hit(rank=i + 1, score=s, cosine=s, path=index.paths[r], absolute_path=index.absolute_path(r))
                for i, (r, s) in enumerate(zip(rows, cosines))
            ]
            answer = Answer(
                hits=hits[:top_k],
                method=found.method,
                timings={"search": found.seconds / len(found.rows), "rerank": 0.0},
            )
            answer.extra.update(rows=rows, all_hits=hits, top_k=top_k, num_rows=len(index))
            answers.append(answer)
        return answers

    def _rerank(self, answer: Answer, k: int, score: str, match_of) -> None:
        hits, rows = answer.extra["all_hits"], answer.extra["rows"]
        k = min(k, len(hits))
        match = list(match_of(rows[:k])) + [None] * (len(hits) - k)
        order = rerank_order(
            [h.cosine for h in hits], match, k, score, logit_scale=float(self.encoder.model.logit_scale.detach().exp())
        )
        reranked = []
        for rank, (position, value) in enumerate(order, start=1):
            h = hits[position]
            scored = match[position] is not None
            note = "" if scored or position >= k else "cannot be read any more: not re-ranked"
            reranked.append(
                Hit(
                    rank=rank,
                    score=value,
                    cosine=h.cosine,
                    path=h.path,
                    absolute_path=h.absolute_path,
                    match=match[position],
                    reranked=scored,
                    note=note,
                )
            )
        answer.hits = reranked[: answer.extra["top_k"]]
        answer.rerank = {"k": k, "score": score, "scored": sum(m is not None for m in match)}
