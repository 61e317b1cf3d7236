"""Contrastive image-text pre-training of a (tiny) open_clip model on a manifest's written captions.

The CMD recipe starts from a CLIP that was pre-trained on image-text pairs, and keeps it frozen.
A randomly initialised tiny CLIP is no stand-in for that: its pooled embedding keeps the
background colour of a generated scene and little else, so no speech model can retrieve by the
objects. This module gives the tiny CLIP what the real one has, the same way the real one got it:
open_clip's own model, tokenizer and ``ClipLoss`` on (image, written caption) pairs, here the
``.wrd`` and ``.img`` files of a training manifest. Only the split it is given is seen.

Every batch holds distinct images (one caption drawn for each), so CLIP's one-positive loss has no
false negatives. Images are decoded once and kept in memory: this is meant for corpora of a few
thousand images (the CPU demo), not for real pre-training.

Hard negatives (``negatives``; the generated corpus only, whose ``scene_corpus.json`` says what each
training image shows): a training scene with one described attribute changed
(:mod:`cmd_demo.negative_captions`, NegCLIP's recipe).

- ``"captions"``: each image of the batch also gets the caption of its changed scene as an extra
  negative text. Image -> text: softmax over the batch's captions and the negatives; text -> image
  as in CLIP (NegCLIP's loss; with no negatives it is exactly open_clip's ``ClipLoss``).
- ``"images"``: each image of the batch also brings a changed scene, rendered like the corpus's
  images, paired with its caption: open_clip's ``ClipLoss`` on the 2B pairs, so a caption must pick
  its scene over the one-attribute-away scene (text -> image, what the minimal pairs test) and an
  image its caption over the changed one. ``negatives_per_image`` changed scenes per training image
  are rendered once, before training; each step draws one of them.
"""

import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from cmd_plugin.data.manifest import ManifestError, SpeechImageManifest
from cmd_plugin.files import atomic_write
from cmd_plugin.progress import CountProgress
from cmd_plugin.quiet import building_open_clip
from cmd_plugin.retrieval.recall import retrieval_recall

logger = logging.getLogger(__name__)


@dataclass
class ClipPretrainingConfig:
    # defaults: the demo's tower, chosen on a tuning minimal-pairs set and the valid split (docs/image_tower.md)
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    eval_interval: int = 100
    # hard negatives: "none", "captions" (extra negative texts) or "images" (rendered changed scenes
    # with their captions); both need the corpus's scene_corpus.json
    negatives: str = "images"
    negatives_per_image: int = 4  # "images": changed scenes rendered per training image
    negative_attributes: str = ""  # comma-separated attributes the negatives change ("": all six)


NEGATIVE_MODES = ("none", "captions", "images")


def load_training_scenes(manifest: SpeechImageManifest, images: List[str], scenes_json: str):
    """The scene of each of ``images`` (manifest-relative image paths; stem = file name without
    extension) from a corpus's scene_corpus.json, the keys of ALL its scenes (any split: a negative
    never equals a corpus image), and the corpus's image size. Errors name the file and the stem."""
    import json

    from cmd_demo.negative_captions import scene_from_record

    try:
        with open(scenes_json, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ManifestError(
            f"{scenes_json}: cannot read the corpus's scene record ({e}); hard negatives need "
            "the scene_corpus.json that generate_scene_corpus.py writes"
        ) from None
    records = meta.get("scenes") if isinstance(meta, dict) else None
    if not isinstance(records, dict) or not records:
        raise ManifestError(f"{scenes_json}: expected a 'scenes' mapping (stem -> scene)")
    scenes = []
    for relative in images:
        stem = os.path.splitext(os.path.basename(relative))[0]
        if stem not in records:
            raise ManifestError(
                f"{scenes_json}: no scene for {stem!r} (image {relative} of the manifest); "
                "is it the corpus the manifest was prepared from?"
            )
        scenes.append(scene_from_record(records[stem], f"{scenes_json}: scenes[{stem!r}]"))
    keys = {scene_from_record(r, f"{scenes_json}: scenes[{k!r}]").key() for k, r in records.items()}
    return scenes, keys, int(meta.get("image_size") or 224)


def render_like_corpus(scene, image_size: int, preprocess: Callable) -> torch.Tensor:
    """A scene rendered as the corpus renders its images (``image_size`` px, JPEG quality 92), then
    the model's preprocessing: a negative image is made like a real one."""
    import io

    from PIL import Image

    from cmd_demo.scene_corpus import render_scene

    buffer = io.BytesIO()
    render_scene(scene, image_size).save(buffer, format="JPEG", quality=92)
    buffer.seek(0)
    with Image.open(buffer) as img:
        return preprocess(img.convert("RGB"))


def negclip_loss(image_features, text_features, negative_text_features, logit_scale):
    """NegCLIP's loss: image -> text over the batch's texts and the extra negative texts, text ->
    image over the batch's images (features L2-normalised, as open_clip's model returns them)."""
    import torch.nn.functional as F

    labels = torch.arange(image_features.shape[0], device=image_features.device)
    texts = torch.cat([text_features, negative_text_features])
    logits_per_image = logit_scale * image_features @ texts.T
    logits_per_text = logit_scale * text_features @ image_features.T
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def captions_by_image(manifest: SpeechImageManifest, where: str) -> Dict[str, List[str]]:
    """image path (relative) -> its distinct written captions, in manifest order."""
    if manifest.texts is None:
        raise ManifestError(f"{where}: no .wrd file; image-text pre-training needs the written captions")
    captions: Dict[str, List[str]] = {}
    for lineno, (image, text) in enumerate(zip(manifest.image_paths, manifest.texts), start=1):
        if not text.strip():
            raise ManifestError(f"{where}.wrd:{lineno}: empty caption (expected the written caption of {image})")
        texts = captions.setdefault(image, [])
        if text not in texts:
            texts.append(text)
    return captions


def distinct_image_batches(num_images: int, batch_size: int, steps: int, rng: np.random.Generator):
    """Yield ``steps`` index arrays of ``min(batch_size, num_images)`` distinct images each.

    Images are visited in reshuffled passes, so every image is seen equally often.
    """
    if num_images < 2:
        raise ValueError(f"contrastive pre-training needs at least 2 images, got {num_images}")
    size = min(batch_size, num_images)
    order = rng.permutation(num_images)
    pos = 0
    for _ in range(steps):
        if pos + size > num_images:
            order = rng.permutation(num_images)
            pos = 0
        yield order[pos : pos + size]
        pos += size


def _lr_at(step: int, cfg: ClipPretrainingConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _load_images(manifest: SpeechImageManifest, images: List[str], preprocess: Callable) -> torch.Tensor:
    from PIL import Image

    tensors = []
    for relative in images:
        path = manifest.image_path(relative)
        try:
            with Image.open(path) as img:
                tensors.append(preprocess(img.convert("RGB")))
        except OSError as e:
            raise ManifestError(f"{path}: cannot read image ({e})") from e
    return torch.stack(tensors)


@torch.no_grad()
def text_to_image_recall(model, tokenizer, images: torch.Tensor, captions: List[List[str]], ks=(1, 5, 10)):
    """R@K of written captions retrieving their image (and back), with cmd_plugin's recall."""
    was_training = model.training
    model.eval()
    image_emb = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    texts = [t for caps in captions for t in caps]
    owners = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    text_emb = torch.cat(
        [
            torch.nn.functional.normalize(model.encode_text(tokenizer(texts[i : i + 512])), dim=-1)
            for i in range(0, len(texts), 512)
        ]
    )
    model.train(was_training)
    return retrieval_recall(text_emb, image_emb, owners, ks=ks)


def pretrain_clip(
    model_name: str,
    init_weights: str,
    out_weights: str,
    train: SpeechImageManifest,
    train_where: str,
    cfg: ClipPretrainingConfig,
    valid: Optional[SpeechImageManifest] = None,
    valid_where: str = "",
    scenes_json: Optional[str] = None,
    timings: Optional[Dict[str, float]] = None,
    partial_init: bool = False,
) -> Dict[str, float]:
    """Pre-train open_clip ``model_name`` (already registered) from ``init_weights`` on the
    (image, caption) pairs of ``train``; write the state dict to ``out_weights`` atomically.

    Returns the last validation recall (text->image ``s2i_r*``, image->text ``i2s_r*``) when
    ``valid`` is given, else an empty dict; ``timings``, if given, gets ``train_seconds`` (the
    optimisation steps, with their scoring) and ``negatives_seconds`` (making the hard negatives);
    ``partial_init``: ``model_name`` has other image/patch sizes than ``init_weights`` was made for,
    which initialises the tensors whose shapes match. ``cfg.negatives`` other than "none" needs
    ``scenes_json``, the training corpus's scene_corpus.json.
    """
    if cfg.negatives not in NEGATIVE_MODES:
        raise ValueError(f"negatives={cfg.negatives!r}: expected one of {', '.join(NEGATIVE_MODES)}")
    if cfg.negatives != "none" and not scenes_json:
        raise ValueError(f"negatives={cfg.negatives!r} needs the corpus's scene_corpus.json (scenes_json)")
    if cfg.negatives == "images" and cfg.negatives_per_image < 1:
        raise ValueError(f"negatives_per_image must be at least 1, got {cfg.negatives_per_image}")
    import open_clip
    from open_clip.loss import ClipLoss

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if init_weights and partial_init:
        # another image/patch size than init_weights was made for: every tensor of the same shape
        # (the text tower, the transformer blocks) starts from it, the others (patch embedding,
        # position embedding) from open_clip's random initialisation
        with building_open_clip(random_weights_wanted=True):
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
        own = model.state_dict()
        init = torch.load(init_weights, map_location="cpu")
        kept = {k: v for k, v in init.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(kept, strict=False)
        logger.info(
            "started from %s except %s (other shapes: random)",
            init_weights,
            ", ".join(sorted(set(own) - set(kept))) or "nothing",
        )
    else:
        with building_open_clip(random_weights_wanted=not init_weights):  # no init_weights: a random start
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=init_weights or None)
    tokenizer = open_clip.get_tokenizer(model_name)

    train_caps = captions_by_image(train, train_where)
    train_images = list(train_caps)
    pixels = _load_images(train, train_images, preprocess)
    if valid is not None:
        valid_caps = captions_by_image(valid, valid_where)
        valid_pixels = _load_images(valid, list(valid_caps), preprocess)
    logger.info(
        "image-text pre-training of %s on %d images, %d captions",
        model_name,
        len(train_images),
        sum(len(c) for c in train_caps.values()),
    )
    negatives_start = time.time()
    neg_rng = random.Random(f"negatives/{cfg.seed}")
    if cfg.negatives != "none":
        from cmd_demo.minimal_pairs import ATTRIBUTES
        from cmd_demo.negative_captions import make_negatives

        scenes, corpus_keys, render_size = load_training_scenes(train, train_images, scenes_json)
        changeable = [a.strip() for a in cfg.negative_attributes.split(",") if a.strip()] or list(ATTRIBUTES)
    if cfg.negatives == "images":
        # negative_pixels[i, k]: the k-th changed scene of training image i, rendered; negative_texts[i][k] its caption
        pool = [
            make_negatives(scene, neg_rng, cfg.negatives_per_image, changeable, avoid=corpus_keys) for scene in scenes
        ]
        negative_texts = [[caption for _, _, caption in negs] for negs in pool]
        negative_pixels = torch.stack(
            [torch.stack([render_like_corpus(s, render_size, preprocess) for s, _, _ in negs]) for negs in pool]
        )
        logger.info(
            "rendered %d hard-negative scenes (%.0fs)",
            negative_pixels.shape[0] * negative_pixels.shape[1],
            time.time() - negatives_start,
        )
    negatives_seconds = time.time() - negatives_start

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    loss_fn = ClipLoss()
    max_logit_scale = math.log(100.0)
    model.train()
    result: Dict[str, float] = {}
    start = time.time()
    progress = CountProgress("CLIP pre-training", cfg.steps, "steps", log=logger.info)
    for step, batch in enumerate(distinct_image_batches(len(train_images), cfg.batch_size, cfg.steps, rng)):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        texts = [train_caps[train_images[i]][rng.integers(len(train_caps[train_images[i]]))] for i in batch]
        images = pixels[torch.as_tensor(batch)]
        if cfg.negatives == "images":
            picks = [int(neg_rng.randrange(cfg.negatives_per_image)) for _ in batch]
            images = torch.cat([images, negative_pixels[torch.as_tensor(batch), torch.as_tensor(picks)]])
            texts = texts + [negative_texts[i][k] for i, k in zip(batch, picks)]
        elif cfg.negatives == "captions":
            texts = texts + [make_negatives(scenes[i], neg_rng, 1, changeable, avoid=corpus_keys)[0][2] for i in batch]
        image_features, text_features, logit_scale = model(images, tokenizer(texts))
        if cfg.negatives == "captions":
            n = len(batch)
            loss = negclip_loss(image_features, text_features[:n], text_features[n:], logit_scale)
        else:
            loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, max_logit_scale)
        progress.update(step + 1)
        last = step + 1 == cfg.steps
        if last or (cfg.eval_interval > 0 and (step + 1) % cfg.eval_interval == 0):
            message = f"step {step + 1}/{cfg.steps} loss {loss.item():.3f} ({time.time() - start:.0f}s)"
            if valid is not None:
                result = text_to_image_recall(model, tokenizer, valid_pixels, list(valid_caps.values()))
                message += " | held-out text->image R@1/5/10 {:.1f}/{:.1f}/{:.1f}".format(
                    result["s2i_r1"], result["s2i_r5"], result["s2i_r10"]
                )
            logger.info(message)
    train_seconds = time.time() - start

    os.makedirs(os.path.dirname(os.path.abspath(out_weights)), exist_ok=True)
    state = model.state_dict()
    atomic_write(out_weights, lambda tmp: torch.save(state, tmp))
    if timings is not None:
        timings.update(train_seconds=round(train_seconds, 1), negatives_seconds=round(negatives_seconds, 1))
    return result
