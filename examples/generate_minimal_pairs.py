#!/usr/bin/env python3
"""Write a minimal-pairs test set for the spoken-scene corpus, in the Flickr 8k layout.

Base scenes with spoken captions, each with one image variant per described attribute (colour,
shape, count, size or position of one object group, or the background) that differs from it in
that attribute only; no scene repeats one of ``--exclude-scenes`` and the voices are the set's
own. ``cmd_demo/minimal_pairs.py`` says how it is drawn and what is written;
``examples/score_minimal_pairs.py`` scores a checkpoint on it.

Usage::

    python examples/generate_minimal_pairs.py --out-dir work/minimal_pairs \\
        --exclude-scenes work/corpus/scene_corpus.json
"""

import argparse
import sys

from cmd_demo.minimal_pairs import ATTRIBUTES, PairsError, format_summary, generate_minimal_pairs
from cmd_demo.scene_corpus import ToolMissingError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Write a minimal-pairs test set (base scenes with spoken captions, one-attribute "
        "variants) in the Flickr 8k layout; score it with examples/score_minimal_pairs.py."
    )
    p.add_argument("--out-dir", required=True, help="set root to create (holds flickr_audio/, minimal_pairs.json)")
    p.add_argument(
        "--exclude-scenes",
        action="append",
        default=[],
        metavar="JSON",
        help="a corpus's scene_corpus.json (the training corpus): none of its scenes, in any "
        "split, is a base or variant, and its speakers (flickr_audio/wav2spk.txt beside it) "
        "are avoided; repeatable",
    )
    p.add_argument(
        "--no-exclude",
        action="store_true",
        help="make a set without --exclude-scenes (then it may contain training scenes)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="the set's seed (its stream is seeded with 'minimal-pairs/<seed>', never a corpus's)",
    )
    p.add_argument("--num-bases", type=int, default=40, help="base scenes, each with one variant per attribute")
    p.add_argument("--captions-per-base", type=int, default=3, help="spoken captions of each base")
    p.add_argument(
        "--attributes",
        nargs="+",
        choices=ATTRIBUTES,
        default=list(ATTRIBUTES),
        help="the attributes that get a variant",
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="side of the jpgs (default: the excluded corpus's, else 224)"
    )
    p.add_argument(
        "--speech-rates",
        type=int,
        nargs="+",
        default=None,
        metavar="WPM",
        help="espeak-ng rates the speakers are drawn from (default: the excluded corpus's)",
    )
    p.add_argument("--num-speakers", type=int, default=8, help="speakers of the set (its own voices)")
    p.add_argument("--num-workers", type=int, default=0, help="parallel jobs (0: one per CPU, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out-dir")
    args = p.parse_args(argv)
    if not args.exclude_scenes and not args.no_exclude:
        p.error("give the training corpus's scene_corpus.json with --exclude-scenes (or --no-exclude to go without)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        record = generate_minimal_pairs(
            args.out_dir,
            exclude_scenes=args.exclude_scenes,
            seed=args.seed,
            num_bases=args.num_bases,
            captions_per_base=args.captions_per_base,
            image_size=args.image_size,
            speech_rates=args.speech_rates,
            num_speakers=args.num_speakers,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            attributes=args.attributes,
        )
    except (ToolMissingError, FileExistsError, PairsError) as e:
        print(f"generate_minimal_pairs: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
