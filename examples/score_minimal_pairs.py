#!/usr/bin/env python
"""Score a trained cmd_speech_image checkpoint on a minimal-pairs set: does the model see the
one attribute in which an image differs from what the caption says?

    python examples/score_minimal_pairs.py --checkpoint checkpoints/checkpoint_best.pt \\
        --pairs-dir work/minimal_pairs [--output-json minimal_pairs_score.json]

Per attribute, how often the base image scores above its one-attribute variant for the base's
spoken captions (chance 50 %), their mean, and the base's R@1 in its group; ties count against
the model. The set is ``examples/generate_minimal_pairs.py``'s; ``cmd_demo/minimal_pairs_scoring.py``
says how it is scored (and scores it from Python).
"""

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=TIE_RULE)
    parser.add_argument("--checkpoint", required=True, help="trained cmd_speech_image checkpoint")
    parser.add_argument("--pairs-dir", required=True, help="a set written by examples/generate_minimal_pairs.py")
    parser.add_argument("--output-json", help="write the record here (atomically)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--fp16", action="store_true", help="encode under float16 autocast (CUDA only)")
    parser.add_argument("--batch-size", type=int, default=8, help="utterances per batch (default: 8)")
    parser.add_argument("--hubert-path", help="new location of the HuBERT checkpoint named by the checkpoint")
    parser.add_argument("--image-pretrained", help="new location of the image encoder weights")
    parser.add_argument("--image-model-config", help="new location of the open_clip model JSON")
    parser.add_argument("--written-captions", action="store_true",
                        help="also score the bases' written captions with the checkpoint's frozen CLIP alone "
                             "(its text tower): the image encoder's own ceiling, printed beside")
    return parser


def main(argv=None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        stream=sys.stderr)  # as eval_recall.py: before fairseq's imports configure it
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        encoder = None
        if args.written_captions:
            from cmd_plugin.inference import SpeechImageEncoder

            load_pairs(args.pairs_dir)  # a broken set is named before the model loads
            encoder = SpeechImageEncoder.from_checkpoint(
                args.checkpoint, device=args.device, fp16=args.fp16, hubert_path=args.hubert_path,
                image_pretrained=args.image_pretrained, image_model_config=args.image_model_config)
        record = score_minimal_pairs(
            args.checkpoint, args.pairs_dir, device=args.device, fp16=args.fp16, batch_size=args.batch_size,
            encoder=encoder, hubert_path=args.hubert_path, image_pretrained=args.image_pretrained,
            image_model_config=args.image_model_config)
        if encoder is not None:
            record["written_captions"] = written_caption_reference(encoder, args.pairs_dir)
    except (FileNotFoundError, ValueError) as err:  # MinimalPairsError, EvaluationError, InferenceError
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(format_table(record))
    if args.output_json:
        write_record(record, args.output_json)
        print(f"record written to {os.path.abspath(args.output_json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
