"""Scoring a trained cmd_speech_image checkpoint on a minimal-pairs set: does the model see the
one attribute in which an image differs from what the caption says?

    from cmd_demo.minimal_pairs_scoring import score_minimal_pairs, format_table
    record = score_minimal_pairs("checkpoint_best.pt", "work/minimal_pairs")
    print(format_table(record))

The set (:mod:`cmd_demo.minimal_pairs`) holds groups: a base image with spoken
captions, and variants that each differ from the base in exactly one described attribute
(colour, shape, count, size or position of one object group, or the background). Every spoken
caption of a base is embedded (S_cls), every image (I_cls), with the project's inference code
(:class:`cmd_plugin.inference.SpeechImageEncoder`), and scored by cosine similarity:

* per attribute, **pairwise accuracy**: over every (caption, variant of that attribute) pair, how
  often the base image scores higher than the variant for the base's caption (chance 50 %);
* **R@1 in the group**: how often the base image scores higher than all of its variants
  (chance 1 / (1 + variants), 1/7 = 14.3 % with six);
* the **mean** of the per-attribute accuracies (each attribute weighs the same).

Tie rule: a variant whose similarity equals the base's counts against the model (not a win, not
half a win), as the project's recall ties do; ties are counted in the record.

A coarse-to-fine checkpoint (one with a matching head) is scored twice: by the cosine, and by the
re-ranking score ``SIM + w * SIC`` of :mod:`cmd_plugin.retrieval.rerank` on every (caption, image of
its group) pair, SIM the matching head's logit (averaged over the caption's windows, as the search
service does) and w from the score kind (the checkpoint's ``task.valid_rerank_score`` unless
another is asked for). The same figures for that score are the record's ``"reranked"`` block.

Its CLI is ``examples/score_minimal_pairs.py``.
"""

import json
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import open_clip
import torch

from cmd_demo.minimal_pairs import PAIRS_FILE
from cmd_plugin.files import atomic_write_json
from cmd_plugin.inference import SpeechImageEncoder, load_image
from cmd_plugin.loading import why_no_matching_head
from cmd_plugin.retrieval.rerank import RERANK_SCORES, sic_weight
from cmd_plugin.search.service import configured_rerank_score, embed_images_with_tokens, window_match_logits

RECORD_FORMAT = "cmd_plugin.minimal_pairs_score.v1"
TIE_RULE = (
    "A variant whose similarity equals the base image's counts as a loss (neither a win nor half "
    "a win); in a group, the base is at R@1 only if it scores strictly above every variant."
)


class MinimalPairsError(ValueError):
    """A minimal-pairs set or option that cannot be scored; the message names the file and key."""


# ---------------------------------------------------------------- the set


def load_pairs(pairs_dir: str) -> Dict:
    """Read and check ``pairs_dir``/minimal_pairs.json; returns {"path", "meta", "groups"} where each
    group has "base", "wavs" and "base_image" (absolute paths) and "variants" [{"stem", "image",
    "attribute", ...}]. Every file it names must exist. Errors name the file and the key."""
    pairs_dir = os.path.abspath(pairs_dir)
    if not os.path.isdir(pairs_dir):
        raise MinimalPairsError(
            f"{pairs_dir}: minimal-pairs set not found (make one with examples/generate_minimal_pairs.py)"
        )
    path = os.path.join(pairs_dir, PAIRS_FILE)
    if not os.path.isfile(path):
        raise MinimalPairsError(
            f"{path}: not found; {pairs_dir} is not a minimal-pairs set "
            "(examples/generate_minimal_pairs.py writes this file)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise MinimalPairsError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MinimalPairsError(f"{path}: cannot read it ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("groups"), list) or not meta["groups"]:
        raise MinimalPairsError(f"{path}: expected a JSON object with a non-empty 'groups' list")
    wav_dir = os.path.join(pairs_dir, "flickr_audio", "wavs")
    image_dir = os.path.join(pairs_dir, "Flicker8k_Dataset")
    groups = []
    for i, group in enumerate(meta["groups"]):
        where = f"{path}: groups[{i}]"
        try:
            base, wavs, variants = group["base"], group["wavs"], group["variants"]
            variants = [{**v, "stem": str(v["stem"]), "attribute": str(v["attribute"])} for v in variants]
        except (KeyError, TypeError) as e:
            raise MinimalPairsError(
                f"{where}: expected 'base', 'wavs' and 'variants' (each with 'stem' and "
                f"'attribute'); missing or malformed {e}"
            ) from None
        if not isinstance(wavs, list) or not wavs or not variants:
            raise MinimalPairsError(f"{where}: a group needs at least one wav and one variant")
        files = [os.path.join(wav_dir, w) for w in wavs] + [os.path.join(image_dir, f"{base}.jpg")]
        files += [os.path.join(image_dir, f"{v['stem']}.jpg") for v in variants]
        for f in files:
            if not os.path.isfile(f):
                raise MinimalPairsError(f"{f}: not found (named by {where}, base {base})")
        for v in variants:
            v["image"] = os.path.join(image_dir, f"{v['stem']}.jpg")
        groups.append({"base": base, "wavs": files[: len(wavs)], "base_image": files[len(wavs)], "variants": variants})
    return {"path": path, "meta": meta, "groups": groups}


# ---------------------------------------------------------------- the arithmetic


def score_groups(groups: Sequence[Dict], attributes: Optional[Sequence[str]] = None) -> Dict:
    """Pure scoring. ``groups``: [{"attributes": [attribute of each variant], "similarities":
    (captions, 1 + variants) array, column 0 the base image}].

    Returns {"attributes": {a: {"accuracy" %, "wins", "ties", "pairs"}}, "mean_accuracy" % (mean
    over attributes with pairs), "all_pairs_accuracy" % (over every pair), "group_r1" %,
    "group_r1_chance" %, "counts"}. ``attributes`` fixes the order (default: first seen)."""
    order: List[str] = list(attributes or [])
    stats: Dict[str, Dict[str, int]] = {}
    r1_hits = 0
    chance = 0.0
    utterances = 0
    for i, group in enumerate(groups):
        sims = np.asarray(group["similarities"], dtype=np.float64)
        attrs = list(group["attributes"])
        if sims.ndim != 2 or sims.shape[0] < 1 or sims.shape[1] != 1 + len(attrs) or not attrs:
            raise MinimalPairsError(
                f"group {i}: similarities of shape {sims.shape} do not match "
                f"1 base + {len(attrs)} variants (need at least one caption and one variant)"
            )
        if not np.isfinite(sims).all():
            raise MinimalPairsError(f"group {i}: similarities contain NaN or inf")
        base, variants = sims[:, :1], sims[:, 1:]
        wins = base > variants  # (captions, variants)
        ties = base == variants
        for j, attribute in enumerate(attrs):
            if attribute not in order:
                order.append(attribute)
            s = stats.setdefault(attribute, {"wins": 0, "ties": 0, "pairs": 0})
            s["wins"] += int(wins[:, j].sum())
            s["ties"] += int(ties[:, j].sum())
            s["pairs"] += sims.shape[0]
        r1_hits += int(wins.all(axis=1).sum())
        chance += sims.shape[0] / sims.shape[1]
        utterances += sims.shape[0]
    if not utterances:
        raise MinimalPairsError("no groups to score")
    per = {}
    for attribute in order:
        s = stats.get(attribute, {"wins": 0, "ties": 0, "pairs": 0})
        per[attribute] = {"accuracy": 100.0 * s["wins"] / s["pairs"] if s["pairs"] else None, **s}
    scored = [v["accuracy"] for v in per.values() if v["accuracy"] is not None]
    total_pairs = sum(v["pairs"] for v in per.values())
    return {
        "attributes": per,
        "mean_accuracy": float(np.mean(scored)),
        "all_pairs_accuracy": 100.0 * sum(v["wins"] for v in per.values()) / total_pairs,
        "group_r1": 100.0 * r1_hits / utterances,
        "group_r1_chance": 100.0 * chance / utterances,
        "pairwise_chance": 50.0,
        "counts": {
            "groups": len(groups),
            "utterances": utterances,
            "pairs": total_pairs,
            "variants": sum(len(g["attributes"]) for g in groups),
        },
    }


# ---------------------------------------------------------------- with a model


def reranked_groups(groups: Sequence[Dict], weight: float) -> List[Dict]:
    """Pure arithmetic of the re-ranking score: ``groups`` as :func:`score_groups` takes them (cosine
    ``similarities``) plus ``match``, the matching head's logits of the same (caption, image) pairs
    -> the same groups with ``similarities`` = match + ``weight`` * cosine (float64), ``match`` kept."""
    out = []
    for i, group in enumerate(groups):
        cosine = np.asarray(group["similarities"], dtype=np.float64)
        match = np.asarray(group["match"], dtype=np.float64)
        if match.shape != cosine.shape:
            raise MinimalPairsError(f"group {i}: match logits of shape {match.shape}, cosines of {cosine.shape}")
        out.append({**group, "match": match, "similarities": match + weight * cosine})
    return out


def _rerank_choice(rerank: Optional[bool], rerank_score: Optional[str]) -> Optional[bool]:
    """Checks the re-ranking options before anything loads; returns ``rerank`` with an explicit score
    counting as asking for re-ranking."""
    if rerank_score is not None:
        if rerank is False:
            raise MinimalPairsError(f"a re-ranking score ({rerank_score!r}) was given with re-ranking turned off")
        if rerank_score not in RERANK_SCORES:
            raise MinimalPairsError(f"re-ranking score must be one of {RERANK_SCORES}, got {rerank_score!r}")
        return True
    return rerank


def score_minimal_pairs(
    checkpoint: Optional[str],
    pairs_dir: str,
    device: str = "cpu",
    fp16: bool = False,
    batch_size: int = 8,
    encoder=None,
    hubert_path: Optional[str] = None,
    image_pretrained: Optional[str] = None,
    image_model_config: Optional[str] = None,
    rerank: Optional[bool] = None,
    rerank_score: Optional[str] = None,
    match_batch: int = 64,
) -> Dict:
    """Embed the set's captions and images with ``checkpoint`` (or a loaded ``encoder``, a
    :class:`cmd_plugin.inference.SpeechImageEncoder`) and score it; returns the record
    (:func:`score_groups`' figures plus provenance and timing). The set is checked before the
    model is loaded.

    Re-ranking (the record's ``"reranked"``, None without it): ``rerank`` None scores by the
    re-ranking score too when the model has a matching head (a checkpoint is then loaded with it;
    a given ``encoder`` must have been loaded with ``keep_matching=True``), True insists on it (an
    error without a head), False leaves it out. ``rerank_score`` (one of ``RERANK_SCORES``; default:
    the checkpoint's ``task.valid_rerank_score``) implies ``rerank``. ``match_batch``: pairs per pass
    of the matching head."""
    if batch_size < 1:
        raise MinimalPairsError(f"batch size must be positive, got {batch_size}")
    rerank = _rerank_choice(rerank, rerank_score)
    start = time.perf_counter()
    pairs = load_pairs(pairs_dir)
    if encoder is None:
        if not checkpoint:
            raise MinimalPairsError("give a checkpoint (or a loaded encoder)")
        encoder = SpeechImageEncoder.from_checkpoint(
            checkpoint,
            device=device,
            fp16=fp16,
            hubert_path=hubert_path,
            image_pretrained=image_pretrained,
            image_model_config=image_model_config,
            keep_matching=rerank is not False,
        )
    if rerank and not encoder.has_matching_head:
        why = why_no_matching_head(encoder.model, encoder.checkpoint)
        raise MinimalPairsError(f"{why}; score by the cosine alone (without --rerank-score, or with --no-rerank)")
    rerank = encoder.has_matching_head if rerank is None else rerank
    loaded = time.perf_counter()
    groups = pairs["groups"]
    wavs = [w for g in groups for w in g["wavs"]]
    images = [p for g in groups for p in [g["base_image"]] + [v["image"] for v in g["variants"]]]
    if rerank:  # the same embeddings, with what the matching head reads
        waves = [encoder.load_audio(w) for w in wavs]
        speech, windows = encoder.embed_waveforms(waves, wavs, batch_size=batch_size, return_sequences=True)
        pictures, tokens = _images_with_tokens(encoder, images, max(batch_size, 32))
    else:
        speech = encoder.embed_audio(wavs, batch_size=batch_size)
        pictures = encoder.embed_images(images, batch_size=max(batch_size, 32))
    embedded = time.perf_counter()

    scored, w, m = [], 0, 0
    for g in groups:
        n_wav, n_img = len(g["wavs"]), 1 + len(g["variants"])
        sims = (speech[w : w + n_wav] @ pictures[m : m + n_img].T).to(torch.float64).numpy()
        scored.append({"base": g["base"], "attributes": [v["attribute"] for v in g["variants"]], "similarities": sims})
        if rerank:
            match = window_match_logits(encoder, windows[w : w + n_wav], tokens[m : m + n_img], match_batch)
            scored[-1]["match"] = match.to(torch.float64).numpy()
        w, m = w + n_wav, m + n_img
    matched = time.perf_counter()
    meta = pairs["meta"]
    record = {
        "format": RECORD_FORMAT,
        "checkpoint": os.path.abspath(encoder.checkpoint) if encoder.checkpoint else None,
        "pairs_dir": os.path.dirname(pairs["path"]),
        "pairs_seed": meta.get("seed"),
        "excluded": [e.get("path") for e in meta.get("excluded", []) if isinstance(e, dict)],
        **score_groups(scored, attributes=meta.get("attributes")),
        "tie_rule": TIE_RULE,
        # cosine similarities of each base caption (rows) with the base image and each variant
        "groups": [
            {
                "base": g["base"],
                "variants": [v["stem"] for v in g["variants"]],
                "attributes": s["attributes"],
                "similarities": s["similarities"].round(6).tolist(),
            }
            for g, s in zip(groups, scored)
        ],
        "reranked": _reranked_block(encoder, scored, rerank_score, meta.get("attributes")) if rerank else None,
        "device": str(encoder.device),
        "seconds": {
            "load": round(loaded - start, 3),
            "embed": round(embedded - loaded, 3),
            **({"match": round(matched - embedded, 3)} if rerank else {}),
            "total": round(time.perf_counter() - start, 3),
        },
    }
    return record


def _images_with_tokens(encoder, paths: Sequence[str], batch_size: int):
    """Image files -> ((M, E) unit-norm I_cls, (M, 1+N, E) image tokens on the CPU)."""
    embeddings, tokens = [], []
    for start in range(0, len(paths), batch_size):
        pixels = torch.stack([load_image(p, encoder.transform) for p in paths[start : start + batch_size]])
        emb, tok = embed_images_with_tokens(encoder, pixels)
        embeddings.append(emb)
        tokens.append(tok.cpu())
    return torch.cat(embeddings), torch.cat(tokens)


def _reranked_block(encoder, scored: Sequence[Dict], rerank_score: Optional[str], attributes) -> Dict:
    configured = configured_rerank_score(encoder.task.cfg)
    kind = rerank_score or configured
    logit_scale = float(encoder.model.logit_scale.detach().exp())
    weight = sic_weight(kind, logit_scale)
    groups = reranked_groups(scored, weight)
    return {
        "score": kind,
        "checkpoint_score": configured,  # the checkpoint's task.valid_rerank_score (what it was tuned with)
        "sic_weight": weight,
        "logit_scale": logit_scale,
        **score_groups(groups, attributes=attributes),
        # per group, each caption's (rows) match logit and re-ranking score with the base and each variant
        "groups": [
            {
                "base": g.get("base"),
                "match": g["match"].round(6).tolist(),
                "similarities": g["similarities"].round(6).tolist(),
            }
            for g in groups
        ],
    }


def written_caption_reference(encoder, pairs_dir: str) -> Dict:
    """The same set scored with the checkpoint's frozen CLIP alone: its text tower on the bases'
    WRITTEN captions against its image tower. What the image encoder can tell apart is a ceiling
    for the speech side, which is trained against that frozen image embedding."""
    cfg = encoder.model.cfg  # a custom model's config was registered when the encoder's image tower was built
    clip = open_clip.create_model(cfg.image_model, pretrained=cfg.image_pretrained or None).eval()
    tokenizer = open_clip.get_tokenizer(cfg.image_model)
    pairs = load_pairs(pairs_dir)
    meta_groups = pairs["meta"]["groups"]
    scored = []
    with torch.inference_mode():
        for g, m in zip(pairs["groups"], meta_groups):
            text = torch.nn.functional.normalize(clip.encode_text(tokenizer(list(m["captions"]))), dim=-1)
            images = encoder.embed_images([g["base_image"]] + [v["image"] for v in g["variants"]])
            scored.append(
                {
                    "attributes": [v["attribute"] for v in g["variants"]],
                    "similarities": (text @ images.T.to(text.dtype)).to(torch.float64).numpy(),
                }
            )
    record = score_groups(scored, attributes=pairs["meta"].get("attributes"))
    # cosine similarities of each written base caption (rows) with the base image and each variant
    record["groups"] = [
        {"base": g["base"], "similarities": sc["similarities"].round(6).tolist()}
        for g, sc in zip(pairs["groups"], scored)
    ]
    return record


def format_table(record: Dict) -> str:
    """The per-attribute table, the mean and the in-group R@1, each next to chance; the re-ranked
    figures (a coarse-to-fine checkpoint) in a column beside the cosine's."""
    c = record["counts"]
    ref = record.get("written_captions")
    rr = record.get("reranked")
    per_group = c["variants"] / c["groups"]
    lines = [
        f"Minimal pairs: {c['groups']} scenes x {per_group:g} variants, {c['utterances']} spoken captions "
        f"(right image above the one-attribute variant; chance {record['pairwise_chance']:.0f} %)",
        f"  {'attribute':<12}{'pairs':>7}{'accuracy':>11}"
        + (f"{'re-ranked':>11}" if rr else "")
        + (f"{'written captions, CLIP alone':>31}" if ref else ""),
    ]
    for attribute, s in record["attributes"].items():
        acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.1f} %"
        ties = [f"{s['ties']} ties"] if s["ties"] else []
        extra = ""
        if rr:
            r = rr["attributes"].get(attribute, {})
            a = r.get("accuracy")
            extra += f"{'-' if a is None else f'{a:.1f} %':>11}"
            ties += [f"{r['ties']} re-ranked ties"] if r.get("ties") else []
        if ref:
            r = ref["attributes"].get(attribute, {}).get("accuracy")
            extra += f"{'-' if r is None else f'{r:.1f} %':>31}"
        ties = f"  ({', '.join(ties)})" if ties else ""
        lines.append(f"  {attribute:<12}{s['pairs']:>7}{acc:>11}{extra}{ties}")
    lines.append(
        f"  {'mean':<12}{c['pairs']:>7}{record['mean_accuracy']:>9.1f} %"
        + (f"{rr['mean_accuracy']:>9.1f} %" if rr else "")
        + (f"{ref['mean_accuracy']:>29.1f} %" if ref else "")
    )
    lines.append(
        f"  R@1 of the right image in its group (1 + {per_group:g} images): {record['group_r1']:.1f} % "
        f"(chance {record['group_r1_chance']:.1f} %)" + (f", re-ranked {rr['group_r1']:.1f} %" if rr else "")
    )
    if rr:
        source = "the checkpoint's" if rr["score"] == rr["checkpoint_score"] else "asked for"
        lines.append(
            f"  accuracy: by the cosine; re-ranked: by the matching head's score {rr['score']} "
            f"(match logit + {rr['sic_weight']:.4g} x cosine, {source}) within each group"
        )
    return "\n".join(lines)


def write_record(record: Dict, path: str) -> None:
    atomic_write_json(path, record, indent=2)
