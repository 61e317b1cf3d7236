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
from cmd_plugin.inference import SpeechImageEncoder

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
) -> Dict:
    """Embed the set's captions and images with ``checkpoint`` (or a loaded ``encoder``, a
    :class:`cmd_plugin.inference.SpeechImageEncoder`) and score it; returns the record
    (:func:`score_groups`' figures plus provenance and timing). The set is checked before the
    model is loaded."""
    if batch_size < 1:
        raise MinimalPairsError(f"batch size must be positive, got {batch_size}")
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
        )
    loaded = time.perf_counter()
    groups = pairs["groups"]
    wavs = [w for g in groups for w in g["wavs"]]
    images = [p for g in groups for p in [g["base_image"]] + [v["image"] for v in g["variants"]]]
    speech = encoder.embed_audio(wavs, batch_size=batch_size)
    pictures = encoder.embed_images(images, batch_size=max(batch_size, 32))
    embedded = time.perf_counter()

    scored, w, m = [], 0, 0
    for g in groups:
        n_wav, n_img = len(g["wavs"]), 1 + len(g["variants"])
        sims = (speech[w : w + n_wav] @ pictures[m : m + n_img].T).to(torch.float64).numpy()
        scored.append({"attributes": [v["attribute"] for v in g["variants"]], "similarities": sims})
        w, m = w + n_wav, m + n_img
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
        "device": str(encoder.device),
        "seconds": {
            "load": round(loaded - start, 3),
            "embed": round(embedded - loaded, 3),
            "total": round(time.perf_counter() - start, 3),
        },
    }
    return record


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
    """The per-attribute table, the mean and the in-group R@1, each next to chance."""
    c = record["counts"]
    ref = record.get("written_captions")
    per_group = c["variants"] / c["groups"]
    lines = [
        f"Minimal pairs: {c['groups']} scenes x {per_group:g} variants, {c['utterances']} spoken captions "
        f"(right image above the one-attribute variant; chance {record['pairwise_chance']:.0f} %)",
        f"  {'attribute':<12}{'pairs':>7}{'accuracy':>11}" + (f"{'written captions, CLIP alone':>31}" if ref else ""),
    ]
    for attribute, s in record["attributes"].items():
        acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.1f} %"
        ties = f"  ({s['ties']} ties)" if s["ties"] else ""
        extra = ""
        if ref:
            r = ref["attributes"].get(attribute, {}).get("accuracy")
            extra = f"{'-' if r is None else f'{r:.1f} %':>31}"
        lines.append(f"  {attribute:<12}{s['pairs']:>7}{acc:>11}{extra}{ties}")
    lines.append(
        f"  {'mean':<12}{c['pairs']:>7}{record['mean_accuracy']:>9.1f} %"
        + (f"{ref['mean_accuracy']:>29.1f} %" if ref else "")
    )
    lines.append(
        f"  R@1 of the right image in its group (1 + {per_group:g} images): {record['group_r1']:.1f} % "
        f"(chance {record['group_r1_chance']:.1f} %)"
    )
    return "\n".join(lines)


def write_record(record: Dict, path: str) -> None:
    atomic_write_json(path, record, indent=2)
