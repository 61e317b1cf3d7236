"""Whole-split speech<->image retrieval scoring of a trained ``cmd_speech_image`` checkpoint.

The logic behind ``examples/eval_recall.py``, reusable from Python:

    model, task = load_cmd_checkpoint(ckpt, data="manifests/flickr8k")   # cmd_plugin.loading
    emb = encode_split(model, task, "test", batch_size=32, device="cuda")
    results = score_embeddings(emb)                    # retrieval_recall figures (x100)
    save_embeddings(emb, "test_emb.pt"); emb = load_embeddings("test_emb.pt")

Every utterance is encoded once (S_cls) in length-ordered batches, every DISTINCT image once
(I_cls). Scoring is :func:`cmd_plugin.retrieval.recall.retrieval_recall`, which is tie-pessimistic: an item
whose score ties the correct one's is ranked above it. Re-ranking (:func:`rerank_split`) needs the
checkpoint loaded with ``keep_matching=True``.
"""

import copy
import datetime
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..files import atomic_write, atomic_write_json
from ..inference import ImageBatches
from ..loading import autocast, resolve_device, why_no_matching_head
from ..modules.multimodal import image_tokens
from .recall import chance_recall, retrieval_recall
from .rerank import RERANK_SCORES, SequencePairScorer, rerank, reranked_recall, sic_weight, sim_split_auc, top1_changes

logger = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = "cmd_plugin.eval_embeddings.v1"
RECALL_KS = (1, 5, 10)

TIE_RULE = (
    "Ties never flatter the model: a candidate whose similarity equals that of the correct item "
    "is ranked above it (speech->image: any image tied with the paired one; image->speech: any "
    "non-caption utterance tied with the image's best-scoring caption)."
)


class EvaluationError(ValueError):
    """An option, split or embeddings file that cannot be scored; the message says why."""


# ---------------------------------------------------------------- encoding


@dataclass
class SplitEmbeddings:
    """Embeddings of one split: ``speech`` (N, E) and ``images`` (U, E) unit-norm float32,
    ``image_ids`` (N,) int64 rows of ``images``; paths relative to the manifest roots."""

    speech: torch.Tensor
    images: torch.Tensor
    image_ids: torch.Tensor
    utterance_paths: List[str]
    image_paths: List[str]
    meta: Dict[str, Any] = field(default_factory=dict)
    # with keep_sequences (re-ranking): per utterance the speech layer's output (1+T'_u, D) fp16,
    # and (U, 1+N, E) fp16 image tokens (pooled + patches)
    speech_sequences: Optional[List[torch.Tensor]] = None
    image_tokens: Optional[torch.Tensor] = None


def _no_pixels(relative_paths):
    return {}


@torch.no_grad()
def encode_split(
    model,
    task,
    split: str,
    batch_size: int = 32,
    device: str = "cpu",
    fp16: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    keep_sequences: bool = False,
) -> SplitEmbeddings:
    """Encode every utterance of ``split`` once (S_cls) and every distinct image once (I_cls).

    Utterances go in batches of ``batch_size`` sorted by length (little padding), through the
    split's :class:`SpeechImageDataset` collater; embeddings are returned in dataset order.
    Every utterance is scored: the task's training size limits are not applied.
    ``keep_sequences`` (re-ranking) also keeps, in fp16 on the CPU, every utterance's speech
    layer output (N x (1+T') x D x 2 bytes: ~2.6 GB for Flickr8k's 5,000 test captions at
    HuBERT-Large width) and every image's tokens (pooled + patches).
    """
    dev = resolve_device(device, fp16)
    model = model.eval().to(dev)
    task.load_dataset(split, size_limits=False)
    dataset = task.dataset(split)
    manifest = dataset.manifest
    if len(dataset) != len(manifest):
        raise EvaluationError(f"{split}: {len(manifest) - len(dataset)} utterances of the manifest were not loaded")

    # speech: the dataset's collater, without reading pixels per batch (images are encoded apart)
    audio = _shallow_copy_with(dataset, images=_no_pixels)
    order = np.argsort(-np.asarray(dataset.sizes), kind="stable")
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    loader = torch.utils.data.DataLoader(
        audio, batch_sampler=batches, collate_fn=audio.collater, num_workers=num_workers
    )
    speech = torch.empty(len(dataset), 0)
    sequences: List[Optional[torch.Tensor]] = [None] * len(dataset)
    for batch in tqdm(loader, desc=f"{split}: speech", unit="batch", disable=not progress):
        net_input = batch["net_input"]
        with autocast(dev, fp16):
            out = model.encode_speech_sequence(net_input["source"].to(dev), net_input["padding_mask"].to(dev))
        emb = out["speech"].float().cpu()
        if keep_sequences:
            seq, mask = out["speech_seq"], out["speech_mask"]
            for row, item in enumerate(batch["id"].tolist()):
                n = seq.size(1) if mask is None else int((~mask[row]).sum())
                sequences[item] = seq[row, :n].detach().half().cpu()
        if speech.size(1) == 0:
            speech = torch.zeros(len(dataset), emb.size(1))
        speech[batch["id"]] = emb

    image_paths = list(dataset.image_paths)
    images_loader = torch.utils.data.DataLoader(
        ImageBatches(image_paths, batch_size, dataset.images),
        batch_size=None,
        num_workers=num_workers,
    )
    image_chunks, token_chunks = [], []
    for read in tqdm(images_loader, desc=f"{split}: images", unit="batch", disable=not progress):
        if "images" in read:
            with autocast(dev, fp16):
                image_cls, patches = model.encode_image(read["images"].to(dev))
        else:  # cached outputs of the same (checked) frozen encoder
            image_cls = torch.nn.functional.normalize(read["image_cls"].float(), dim=-1)
            patches = read["image_patches"]
        image_chunks.append(image_cls.float().cpu())
        if keep_sequences:  # the tokens the multimodal encoder saw in training (criterion: image_tokens)
            token_chunks.append(image_tokens(image_cls.float(), patches.float()).half().cpu())
    images = torch.cat(image_chunks)

    return SplitEmbeddings(
        speech=speech,
        images=images,
        image_ids=torch.as_tensor(dataset.image_ids, dtype=torch.long),
        utterance_paths=[manifest.audio_paths[int(r)] for r in dataset.kept],
        image_paths=image_paths,
        speech_sequences=sequences if keep_sequences else None,
        image_tokens=torch.cat(token_chunks) if keep_sequences else None,
        meta={
            "split": split,
            "data": os.path.abspath(task.cfg.data),
            "audio_root": manifest.audio_root,
            "image_root": manifest.image_root,
            "num_utterances_in_manifest": len(manifest),
        },
    )


def _shallow_copy_with(obj, **attrs):
    clone = copy.copy(obj)
    for key, value in attrs.items():
        setattr(clone, key, value)
    return clone


# ---------------------------------------------------------------- scoring


def score_embeddings(emb: SplitEmbeddings, ks: Sequence[int] = RECALL_KS, chunk_size: int = 4096) -> Dict[str, Any]:
    """``retrieval_recall`` on the split's embeddings (figures x100, hits, counts)."""
    return retrieval_recall(emb.speech.float(), emb.images.float(), emb.image_ids, ks=ks, chunk_size=chunk_size)


def chance_for(results: Dict[str, Any], ks: Sequence[int] = RECALL_KS):
    """Chance row for the scored split -> (recall dict, captions per image it assumes).

    :func:`chance_recall` assumes every image has the same number of captions; an irregular
    split uses the rounded mean over images with captions."""
    captions = max(1, round(results["num_s2i_queries"] / max(1, results["num_i2s_queries"])))
    return chance_recall(results["num_images"], captions, ks=ks), captions


def check_rerank_model(model, checkpoint: str) -> None:
    """Refuse a model without the coarse-to-fine matching head, with what to do instead."""
    why = why_no_matching_head(model, checkpoint)
    if why:
        raise EvaluationError(f"{why}; drop --rerank-k to score it with SIC alone")


@torch.no_grad()
def rerank_split(
    model,
    emb: SplitEmbeddings,
    k: int,
    score: str = "sim",
    device: str = "cpu",
    pair_batch: int = 256,
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int = 4096,
) -> Dict[str, Any]:
    """Re-rank each query's SIC top-K with the matching head, both directions
    (:func:`cmd_plugin.retrieval.rerank.rerank`): ``score`` "sim" ranks by the match logit alone (ALBEF),
    "sim+sic" by match logit + SIC cosine (BLIP), "sim+sic_logit" by match logit + cosine / τ.
    Needs ``encode_split(..., keep_sequences=True)``.
    Returns :func:`cmd_plugin.retrieval.rerank.reranked_recall`'s dict plus ``num_pairs`` (distinct pairs
    scored), ``top1_changes`` (:func:`cmd_plugin.retrieval.rerank.top1_changes`) and ``seconds`` (wall
    time of the re-ranking)."""
    if score not in RERANK_SCORES:
        raise EvaluationError(f"--rerank-score must be one of {RERANK_SCORES}, got {score!r}")
    if emb.speech_sequences is None or emb.image_tokens is None:
        raise EvaluationError(
            "re-ranking needs the speech sequences and image tokens (encode_split keep_sequences=True)"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < max(ks):
        raise EvaluationError(f"--rerank-k must be an integer >= {max(ks)} (the largest reported R@k), got {k!r}")
    dev = torch.device(device)
    model = model.eval().to(dev)
    start = time.perf_counter()
    scorer = SequencePairScorer(model, emb.speech_sequences, emb.image_tokens, device=dev)
    result = rerank(
        emb.speech.float(),
        emb.images.float(),
        scorer,
        k,
        sic_weight=sic_weight(score, float(model.logit_scale.detach().exp())),
        pair_batch=pair_batch,
        chunk_size=chunk_size,
    )
    recall = reranked_recall(result, emb.image_ids, ks=ks)
    recall["top1_changes"] = top1_changes(result, emb.image_ids)
    recall["seconds"] = time.perf_counter() - start
    recall["num_pairs"] = result.num_pairs
    recall["score"] = score
    return recall


def sim_auc_split(
    model, emb: SplitEmbeddings, device: str = "cpu", seed: int = 0, pair_batch: int = 256
) -> Dict[str, float]:
    """The matching head's AUC on a whole split (:func:`cmd_plugin.retrieval.rerank.sim_split_auc`):
    positives against each utterance's hardest SIC negative and against a random other image.
    Needs ``encode_split(..., keep_sequences=True)``."""
    if emb.speech_sequences is None or emb.image_tokens is None:
        raise EvaluationError("SIM AUC needs the speech sequences and image tokens (encode_split keep_sequences=True)")
    dev = torch.device(device)
    scorer = SequencePairScorer(model.eval().to(dev), emb.speech_sequences, emb.image_tokens, device=dev)
    return sim_split_auc(
        emb.speech, emb.images, emb.image_ids, scorer, torch.Generator().manual_seed(seed), pair_batch=pair_batch
    )


# ---------------------------------------------------------------- files


def save_embeddings(emb: SplitEmbeddings, path: str) -> None:
    """Write ``emb`` to ``path`` (torch.save of plain tensors, lists and strings) atomically."""
    payload = {
        "format": EMBEDDINGS_FORMAT,
        "speech": emb.speech.contiguous(),
        "images": emb.images.contiguous(),
        "image_ids": emb.image_ids.contiguous(),
        "utterance_paths": list(emb.utterance_paths),
        "image_paths": list(emb.image_paths),
        "meta": dict(emb.meta),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_embeddings(path: str) -> SplitEmbeddings:
    """Read a file written by :func:`save_embeddings` (weights-only unpickling), checking shapes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embeddings file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EvaluationError(f"{path}: not an embeddings file ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != EMBEDDINGS_FORMAT:
        raise EvaluationError(f"{path}: not an embeddings file written by --save-embeddings")
    emb = SplitEmbeddings(
        speech=payload["speech"],
        images=payload["images"],
        image_ids=payload["image_ids"],
        utterance_paths=payload["utterance_paths"],
        image_paths=payload["image_paths"],
        meta=payload["meta"],
    )
    n, u = emb.speech.shape[0], emb.images.shape[0]
    if emb.image_ids.shape != (n,) or len(emb.utterance_paths) != n or len(emb.image_paths) != u:
        raise EvaluationError(
            f"{path}: inconsistent embeddings (speech {tuple(emb.speech.shape)}, images "
            f"{tuple(emb.images.shape)}, image_ids {tuple(emb.image_ids.shape)}, "
            f"{len(emb.utterance_paths)} utterance paths, {len(emb.image_paths)} image paths)"
        )
    return emb


def results_record(
    results: Dict[str, Any], chance: Dict[str, float], captions_per_image: int, emb: SplitEmbeddings, **context
) -> Dict[str, Any]:
    """The JSON record: every figure, the counts, where they come from and when."""
    record = {
        "recall": {k: float(v) for k, v in results.items() if "_r" in k and "hits" not in k},
        "hits": {k: int(v) for k, v in results.items() if "hits" in k},
        "chance": {k: float(v) for k, v in chance.items()},
        "chance_captions_per_image": captions_per_image,
        "counts": {
            "num_utterances": int(results["num_s2i_queries"]),
            "num_images": int(results["num_images"]),
            "num_images_with_caption": int(results["num_i2s_queries"]),
            "num_images_without_caption": int(results["num_images_without_caption"]),
            "num_utterances_in_manifest": emb.meta.get("num_utterances_in_manifest"),
            "embed_dim": int(emb.speech.shape[1]),
        },
        "ks": list(RECALL_KS),
        "tie_rule": TIE_RULE,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    record.update(context)
    return record


def write_json(record: Dict[str, Any], path: str) -> None:
    atomic_write_json(path, record, indent=2, ensure_ascii=False)
