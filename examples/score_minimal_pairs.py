#!/usr/bin/env python
"""Score a trained cmd_speech_image checkpoint on a minimal-pairs set: does the model see the
one attribute in which an image differs from what the caption says?

    python examples/score_minimal_pairs.py --checkpoint checkpoints/checkpoint_best.pt \\
        --pairs-dir work/minimal_pairs [--output-json minimal_pairs_score.json]

Per attribute, how often the base image scores above its one-attribute variant for the base's
spoken captions (chance 50 %), their mean, and the base's R@1 in its group; ties count against
the model. A coarse-to-fine checkpoint (one with a matching head) is also scored by its re-ranking
score within each group, printed beside (--rerank-score, --no-rerank).
The set is ``examples/generate_minimal_pairs.py``'s; ``cmd_demo/minimal_pairs_scoring.py``
says how it is scored (and scores it from Python).
"""

import argparse
import logging
import os
import sys

from cmd_demo.minimal_pairs_scoring import (
    TIE_RULE,
    format_table,
    load_pairs,
    score_minimal_pairs,
    write_record,
    written_caption_reference,
)
from cmd_plugin.inference import SpeechImageEncoder
from cmd_plugin.loading import add_loading_options, upstream_paths
from cmd_plugin.retrieval.rerank import RERANK_SCORES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=TIE_RULE)
    parser.add_argument("--checkpoint", required=True, help="trained cmd_speech_image checkpoint")
    parser.add_argument("--pairs-dir", required=True, help="a set written by examples/generate_minimal_pairs.py")
    parser.add_argument("--output-json", help="write the record here (atomically)")
    add_loading_options(parser)  # --hubert-path, --image-pretrained, --image-model-config, --device, --fp16
    parser.add_argument("--batch-size", type=int, default=8, help="utterances per batch (default: 8)")
    rerank = parser.add_mutually_exclusive_group()
    rerank.add_argument(
        "--rerank-score",
        choices=RERANK_SCORES,
        help="a coarse-to-fine checkpoint is also scored by this re-ranking score on every (caption, image "
        "of its group) pair: sim = the matching head's logit, sim+sic = logit + cosine, sim+sic_logit = logit "
        "+ cosine / temperature (default: the score the checkpoint was tuned with, its task.valid_rerank_score); "
        "an error for a checkpoint without a matching head",
    )
    rerank.add_argument(
        "--no-rerank",
        action="store_true",
        help="score by the cosine alone, even a checkpoint with a matching head (loaded without it)",
    )
    parser.add_argument(
        "--written-captions",
        action="store_true",
        help="also score the bases' written captions with the checkpoint's frozen CLIP alone "
        "(its text tower): the image encoder's own ceiling, printed beside",
    )
    return parser


def main(argv=None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", stream=sys.stderr
    )  # as eval_recall.py: before fairseq's imports configure it
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        encoder = None
        if args.written_captions:
            load_pairs(args.pairs_dir)  # a broken set is named before the model loads
            encoder = SpeechImageEncoder.from_checkpoint(
                args.checkpoint,
                device=args.device,
                fp16=args.fp16,
                keep_matching=not args.no_rerank,
                **upstream_paths(args),
            )
        record = score_minimal_pairs(
            args.checkpoint,
            args.pairs_dir,
            device=args.device,
            fp16=args.fp16,
            batch_size=args.batch_size,
            encoder=encoder,
            rerank=False if args.no_rerank else None,
            rerank_score=args.rerank_score,
            **upstream_paths(args),
        )
        if encoder is not None:
            record["written_captions"] = written_caption_reference(encoder, args.pairs_dir)
    except (FileNotFoundError, ValueError) as err:  # MinimalPairsError, CheckpointError, InferenceError
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(format_table(record))
    if args.output_json:
        write_record(record, args.output_json)
        print(f"record written to {os.path.abspath(args.output_json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
