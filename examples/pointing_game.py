#!/usr/bin/env python3
"""The pointing game: does a checkpoint's explanation map point at the object group a spoken caption
names? (``cmd_demo/pointing_game.py`` says how the set is drawn and scored.)

    # a set of fresh scenes, one spoken caption per object group, voices the corpus never uses
    python examples/pointing_game.py make --out-dir work/pointing_game --exclude-scenes work/corpus/scene_corpus.json
    # every map the checkpoint gives (coarse-to-fine: its matching head's Grad-CAM too)
    python examples/pointing_game.py score --checkpoint work/checkpoints_cmd/checkpoint_best.pt \\
        --set work/pointing_game --output-json work/checkpoints_cmd/pointing_game.json
    # ... and, as a reference, the checkpoint's frozen CLIP alone pointing with its written captions
    python examples/pointing_game.py score --checkpoint CK --set work/pointing_game --written-captions
"""

import argparse
import os
import sys

try:
    import cmd_demo  # noqa: F401
except ImportError:  # run as a script from anywhere: the repository root holds cmd_demo/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmd_demo.pointing_game import (  # noqa: E402
    PointingGameError,
    format_scores,
    make_pointing_game,
    score_pointing_game,
    write_score,
    written_caption_pointing,
)
from cmd_demo.scene_corpus import ToolMissingError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write a pointing-game set")
    make.add_argument("--out-dir", required=True)
    make.add_argument(
        "--exclude-scenes",
        action="append",
        default=[],
        metavar="JSON",
        help="a corpus's scene_corpus.json: none of its scenes, and none of its speakers' voices where others "
        "remain (repeatable; required unless --no-exclude)",
    )
    make.add_argument("--no-exclude", action="store_true", help="make a set without --exclude-scenes")
    make.add_argument("--seed", type=int, default=1, help="the set's seed (stream 'pointing-game/<seed>')")
    make.add_argument("--num-scenes", type=int, default=60, help="scenes (two or three groups, a caption each)")
    make.add_argument("--num-speakers", type=int, default=8)
    make.add_argument("--num-workers", type=int, default=0, help="parallel jobs (0: one per CPU, at most 8)")
    make.add_argument("--overwrite", action="store_true")
    score = sub.add_parser("score", help="score a checkpoint's maps on a set")
    score.add_argument("--checkpoint", required=True)
    score.add_argument("--set", required=True, help="directory written by 'make'")
    score.add_argument("--output-json", default=None, help="the record (written atomically)")
    score.add_argument("--device", default="cpu")
    score.add_argument(
        "--written-captions",
        action="store_true",
        help="also point with the checkpoint's frozen CLIP alone: its text tower on the written captions "
        "against its image tower's patch tokens (a reference for what the tower's patches localise)",
    )
    args = p.parse_args(argv)
    if args.command == "make" and not args.exclude_scenes and not args.no_exclude:
        p.error("give the training corpus's scene_corpus.json with --exclude-scenes (or --no-exclude)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    prog = os.path.basename(sys.argv[0] or "pointing_game.py")
    try:
        if args.command == "make":
            record = make_pointing_game(
                args.out_dir,
                args.exclude_scenes,
                seed=args.seed,
                num_scenes=args.num_scenes,
                num_speakers=args.num_speakers,
                num_workers=args.num_workers,
                overwrite=args.overwrite,
            )
            print(
                f"Wrote {record['out_dir']} in {record['seconds']} s: {len(record['scenes'])} scenes, "
                f"{len(record['trials'])} spoken captions each naming one group, {len(record['speakers'])} speakers "
                f"({record['speakers_with_unseen_voice']} with a voice the excluded corpora do not use)"
            )
            return 0
        from cmd_plugin.inference import SpeechImageEncoder
        from cmd_plugin.progress import CountProgress

        encoder = SpeechImageEncoder.from_checkpoint(
            args.checkpoint, device=args.device, keep_matching=True, keep_fusion=True
        )
        progress = CountProgress("pointing game", 1, "captions")

        def report(done, total):
            progress.total = total
            progress.update(done)

        record = score_pointing_game(encoder, args.set, progress=report)
        if args.written_captions:
            record["written_captions"] = written_caption_pointing(encoder, args.set)
        if args.output_json:
            write_score(record, args.output_json)
        print(format_scores(record))
        return 0
    except (PointingGameError, ToolMissingError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
