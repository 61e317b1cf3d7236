#!/usr/bin/env python3
"""Generate a small spoken-scene corpus in the Flickr 8k Audio Caption Corpus layout.

Rendered scenes of 1-3 object groups, each with several spoken captions (espeak-ng voices, sox
to 16 kHz mono PCM_16), laid out exactly like the real corpus so that
``examples/prepare_flickr8k.py`` reads it unchanged; ``cmd_demo/scene_corpus.py`` says what is
drawn and written. Everything is a function of ``--seed`` and the size options, and the corpus
appears at ``--out-dir`` only when complete.

Usage::

    python examples/generate_scene_corpus.py --out-dir data/scenes --seed 1
    python examples/generate_scene_corpus.py --out-dir /tmp/tiny --num-train-images 6 \\
        --num-valid-images 2 --num-test-images 2 --overwrite

Needs ``espeak-ng`` and ``sox`` on PATH (Debian/Ubuntu: ``apt-get install -y espeak-ng sox``)
and Pillow.
"""

import argparse
import sys

from cmd_demo.scene_corpus import ESPEAK_RATES, ToolMissingError, format_summary, generate_corpus


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Generate a seeded spoken-scene corpus in the Flickr 8k Audio Caption Corpus layout."
    )
    p.add_argument("--out-dir", required=True, help="corpus root to create (holds flickr_audio/, ...)")
    p.add_argument("--seed", type=int, default=1, help="seed for every random choice")
    p.add_argument("--num-train-images", type=int, default=400)
    p.add_argument("--num-valid-images", type=int, default=50, help="written to Flickr_8k.devImages.txt")
    p.add_argument("--num-test-images", type=int, default=100)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--image-size", type=int, default=224, help="side of the square jpgs, in pixels")
    p.add_argument(
        "--num-speakers",
        type=int,
        default=40,
        help="size of the pool of espeak-ng voice/variant/rate/pitch combinations",
    )
    p.add_argument(
        "--speech-rates",
        type=int,
        nargs="+",
        default=None,
        metavar="WPM",
        help=f"espeak-ng speaking rates (words per minute) the speakers are drawn from "
        f"(default: {' '.join(map(str, ESPEAK_RATES))})",
    )
    p.add_argument("--num-workers", type=int, default=0, help="parallel jobs (0: one per CPU, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out-dir")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = generate_corpus(
            args.out_dir,
            seed=args.seed,
            num_train=args.num_train_images,
            num_valid=args.num_valid_images,
            num_test=args.num_test_images,
            captions_per_image=args.captions_per_image,
            image_size=args.image_size,
            num_speakers=args.num_speakers,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            speech_rates=args.speech_rates,
        )
    except (ToolMissingError, FileExistsError, ValueError) as e:
        print(f"generate_scene_corpus: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
