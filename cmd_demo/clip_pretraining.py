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
"""

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from cmd_plugin.data.manifest import ManifestError, SpeechImageManifest
from cmd_plugin.files import atomic_write
from cmd_plugin.quiet import building_open_clip
from cmd_plugin.retrieval.recall import retrieval_recall

logger = logging.getLogger(__name__)


@dataclass
class ClipPretrainingConfig:
    steps: int = 500
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    eval_interval: int = 100


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
    text_emb = torch.cat([
        torch.nn.functional.normalize(model.encode_text(tokenizer(texts[i : i + 512])), dim=-1)
        for i in range(0, len(texts), 512)
    ])
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
) -> Dict[str, float]:
    """Pre-train open_clip ``model_name`` (already registered) from ``init_weights`` on the
    (image, caption) pairs of ``train``; write the state dict to ``out_weights`` atomically.

    Returns the last validation recall (text->image ``s2i_r*``, image->text ``i2s_r*``) when
    ``valid`` is given, else an empty dict.
    """
    import open_clip
    from open_clip.loss import ClipLoss

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    with building_open_clip(random_weights_wanted=not init_weights):  # no init_weights: a random start
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=init_weights or None)
        tokenizer = open_clip.get_tokenizer(model_name)

    train_caps = captions_by_image(train, train_where)
    train_images = list(train_caps)
    pixels = _load_images(train, train_images, preprocess)
    if valid is not None:
        valid_caps = captions_by_image(valid, valid_where)
        valid_pixels = _load_images(valid, list(valid_caps), preprocess)
    logger.info("image-text pre-training of %s on %d images, %d captions", model_name, len(train_images),
                sum(len(c) for c in train_caps.values()))

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
    for step, batch in enumerate(distinct_image_batches(len(train_images), cfg.batch_size, cfg.steps, rng)):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        texts = [train_caps[train_images[i]][rng.integers(len(train_caps[train_images[i]]))] for i in batch]
        image_features, text_features, logit_scale = model(pixels[torch.as_tensor(batch)], tokenizer(texts))
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, max_logit_scale)
        last = step + 1 == cfg.steps
        if last or (cfg.eval_interval > 0 and (step + 1) % cfg.eval_interval == 0):
            message = f"step {step + 1}/{cfg.steps} loss {loss.item():.3f} ({time.time() - start:.0f}s)"
            if valid is not None:
                result = text_to_image_recall(model, tokenizer, valid_pixels, list(valid_caps.values()))
                message += " | held-out text->image R@1/5/10 {:.1f}/{:.1f}/{:.1f}".format(
                    result["s2i_r1"], result["s2i_r5"], result["s2i_r10"])
            logger.info(message)

    os.makedirs(os.path.dirname(os.path.abspath(out_weights)), exist_ok=True)
    state = model.state_dict()
    atomic_write(out_weights, lambda tmp: torch.save(state, tmp))
    return result
