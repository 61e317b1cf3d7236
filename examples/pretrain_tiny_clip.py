#!/usr/bin/env python
"""Pre-train a tiny open_clip model on the written captions of a manifest split (CPU demo).

The CMD recipe freezes a CLIP that was pre-trained on image-text pairs; a random tiny CLIP carries
little more than a scene's background colour. This gives the tiny one the same kind of start,
with open_clip's own model, tokenizer and loss, on the (image, caption) pairs of --split (the
``.img`` and ``.wrd`` files written by prepare_flickr8k.py / prepare_spokencoco.py). Only that
split is seen; --valid-split is scored (written caption -> image recall) but never trained on.

    python examples/pretrain_tiny_clip.py --data manifests --clip-dir encoders/tiny_clip \\
        --out-weights encoders/tiny_clip/pretrained.bin

--clip-dir is what make_tiny_encoders.py wrote (<model name>.json + open_clip_pytorch_model.bin).
"""

import argparse
import json
import logging
import os
import sys

from cmd_demo.clip_pretraining import NEGATIVE_MODES, ClipPretrainingConfig, pretrain_clip
from cmd_plugin.data.manifest import ManifestError, read_manifest
from cmd_plugin.files import atomic_write_json
from cmd_plugin.models.clip_upstream import register_model_config


def main(argv=None):
    defaults = ClipPretrainingConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="manifest directory (with <split>.img and <split>.wrd)")
    parser.add_argument("--split", default="train", help="split to pre-train on")
    parser.add_argument("--valid-split", default="valid", help="split to score on ('' for none)")
    parser.add_argument("--clip-dir", required=True, help="directory holding <model name>.json and the initial weights")
    parser.add_argument(
        "--init-weights", default="", help="initial weights (default: CLIP_DIR/open_clip_pytorch_model.bin)"
    )
    parser.add_argument("--out-weights", required=True, help="where to write the pre-trained state dict")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="distinct images per batch")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate")
    parser.add_argument(
        "--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warm-up, then cosine decay"
    )
    parser.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay (matrices only)"
    )
    parser.add_argument(
        "--eval-interval", type=int, default=defaults.eval_interval, help="log (and score) every N steps"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="initialisation-independent batch/caption seed")
    parser.add_argument(
        "--negatives",
        choices=NEGATIVE_MODES,
        default=defaults.negatives,
        help="hard negatives, each a training scene with one described attribute changed (needs "
        "--scenes): 'captions' adds its caption as an extra negative text (NegCLIP); 'images' "
        "also renders the changed scene and trains on it as a pair of its own; 'none' "
        f"(default: {defaults.negatives})",
    )
    parser.add_argument(
        "--negatives-per-image",
        type=int,
        default=defaults.negatives_per_image,
        help="--negatives images: changed scenes rendered per training image before training",
    )
    parser.add_argument(
        "--negative-attributes",
        default=defaults.negative_attributes,
        metavar="A,B",
        help="comma-separated attributes the negatives change (colour, shape, count, size, position, "
        "background; default: all six)",
    )
    parser.add_argument(
        "--scenes",
        default="",
        help="the training corpus's scene_corpus.json (generate_scene_corpus.py writes it): what each "
        "training image shows, for the hard negatives",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=0,
        help="the image tower's input side in pixels (default: CLIP_DIR's config); another size "
        "writes a config of its own beside --out-weights (see clip_model_config= in the output)",
    )
    parser.add_argument("--patch-size", type=int, default=0, help="the image tower's patch side (default: CLIP_DIR's)")
    parser.add_argument(
        "--score-pairs",
        default="",
        metavar="DIR",
        help="after training, score this minimal-pairs set (generate_minimal_pairs.py) with the CLIP "
        "alone: its written captions against the base and variant images, per attribute",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    configs = (
        sorted(f for f in os.listdir(args.clip_dir) if f.endswith(".json")) if os.path.isdir(args.clip_dir) else []
    )
    if len(configs) != 1:
        parser.error(f"--clip-dir {args.clip_dir}: expected exactly one <model name>.json, found {configs or 'none'}")
    config_path = os.path.join(args.clip_dir, configs[0])
    model_name = os.path.splitext(configs[0])[0]
    init_weights = args.init_weights or os.path.join(args.clip_dir, "open_clip_pytorch_model.bin")
    if not os.path.isfile(init_weights):
        parser.error(f"initial weights not found: {init_weights}")
    register_model_config(config_path)
    partial_init = False
    if args.image_size or args.patch_size:
        with open(config_path) as f:
            model_config = json.load(f)
        vision = model_config["vision_cfg"]
        size, patch = args.image_size or vision["image_size"], args.patch_size or vision["patch_size"]
        if size % patch:
            parser.error(f"--image-size {size} is not a multiple of --patch-size {patch}")
        if (size, patch) != (vision["image_size"], vision["patch_size"]):
            vision.update(image_size=size, patch_size=patch)
            model_name = f"{model_name}-{size}px-p{patch}"
            config_path = os.path.join(os.path.dirname(os.path.abspath(args.out_weights)), model_name + ".json")
            atomic_write_json(config_path, model_config, indent=2)
            register_model_config(config_path)
            partial_init = True

    cfg = ClipPretrainingConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        seed=args.seed,
        eval_interval=args.eval_interval,
        negatives=args.negatives,
        negatives_per_image=args.negatives_per_image,
        negative_attributes=args.negative_attributes,
    )
    if args.negatives != "none" and not args.scenes:
        parser.error(f"--negatives {args.negatives} needs --scenes CORPUS/scene_corpus.json")
    timings = {}
    try:
        train = read_manifest(args.data, args.split)
        valid = read_manifest(args.data, args.valid_split) if args.valid_split else None
        result = pretrain_clip(
            model_name,
            init_weights,
            args.out_weights,
            train,
            os.path.join(args.data, args.split),
            cfg,
            valid=valid,
            valid_where=os.path.join(args.data, args.valid_split),
            scenes_json=args.scenes or None,
            timings=timings,
            partial_init=partial_init,
        )
        pairs = None
        if args.score_pairs:
            from cmd_demo.tower_scoring import format_attributes, score_clip_written_captions

            pairs = score_clip_written_captions(model_name, args.out_weights, args.score_pairs)
    except (ManifestError, ValueError) as e:
        print(f"pretrain_tiny_clip: error: {e}", file=sys.stderr)
        return 2
    print(f"clip_model_name={model_name}")
    print(f"clip_model_config={config_path}")
    print(f"clip_pretrained={os.path.abspath(args.out_weights)}")
    if result:
        print(
            "held-out text->image recall: " + json.dumps({k: round(v, 1) for k, v in result.items() if "hits" not in k})
        )
    print("pre-training seconds: " + json.dumps(timings))
    if pairs is not None:
        print(
            f"written-caption minimal pairs ({args.score_pairs}, seed {pairs['pairs_seed']}): "
            + format_attributes(pairs)
        )
        accuracy = {a: v["accuracy"] for a, v in pairs["attributes"].items()}
        print(
            "minimal pairs record: "
            + json.dumps({"attributes": accuracy, "mean": pairs["mean_accuracy"], "group_r1": pairs["group_r1"]})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
