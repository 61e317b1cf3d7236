"""A CLIP checkpoint alone on a minimal-pairs set: its text tower on the bases' WRITTEN captions
against its image tower on the base and variant images (no speech model, no plugin checkpoint).

The same figures as ``examples/score_minimal_pairs.py --written-captions`` (which needs a trained
plugin checkpoint to find the CLIP): :func:`cmd_demo.minimal_pairs_scoring.score_groups` on the
cosine similarities, the images through the model's own open_clip eval transform, as the plugin's
``SpeechImageEncoder.embed_images`` reads them. Used to choose the tiny CLIP's pre-training
(``examples/pretrain_tiny_clip.py --score-pairs``).
"""

from typing import Dict

import torch

from cmd_demo.minimal_pairs_scoring import load_pairs, score_groups
from cmd_plugin.quiet import building_open_clip


@torch.no_grad()
def score_clip_written_captions(
    model_name: str, weights: str, pairs_dir: str, model=None, preprocess=None, tokenizer=None
) -> Dict:
    """Score the set ``pairs_dir`` with open_clip model ``model_name`` (already registered) loaded
    from ``weights``, or with a loaded ``model``/``preprocess``/``tokenizer``. Returns
    :func:`score_groups`' record plus "pairs_dir" and "pairs_seed"."""
    import open_clip
    from PIL import Image

    pairs = load_pairs(pairs_dir)  # checks the set (files, keys) before the model is loaded
    if model is None:
        with building_open_clip(random_weights_wanted=False):
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights)
        tokenizer = open_clip.get_tokenizer(model_name)
    was_training = model.training
    model.eval()
    scored = []
    for group, meta in zip(pairs["groups"], pairs["meta"]["groups"]):
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(list(meta["captions"]))), dim=-1)
        pixels = []
        for path in [group["base_image"]] + [v["image"] for v in group["variants"]]:
            with Image.open(path) as img:
                pixels.append(preprocess(img.convert("RGB")))
        images = torch.nn.functional.normalize(model.encode_image(torch.stack(pixels)), dim=-1)
        scored.append(
            {
                "attributes": [v["attribute"] for v in group["variants"]],
                "similarities": (text @ images.T).to(torch.float64).numpy(),
            }
        )
    model.train(was_training)
    record = score_groups(scored, attributes=pairs["meta"].get("attributes"))
    record.update(pairs_dir=pairs_dir, pairs_seed=pairs["meta"].get("seed"))
    return record


def format_attributes(record: Dict) -> str:
    """One line: each attribute's accuracy, the mean over attributes and the group R@1."""
    per = ", ".join(f"{a} {v['accuracy']:.1f}" for a, v in record["attributes"].items() if v["accuracy"] is not None)
    return f"{per}; mean {record['mean_accuracy']:.1f} (chance 50); group R@1 {record['group_r1']:.1f}"
