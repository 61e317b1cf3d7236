#!/usr/bin/env python
"""The built-in default, end to end, offline on the CPU: tiny encoders -> generated spoken-scene
corpus (Flickr 8k layout) -> prepare_flickr8k.py -> a speech upstream made with fairseq's own HuBERT
recipe on the training split (train_hubert_upstream.py: MFCC k-means, pre-training, CTC fine-tuning)
-> tiny CLIP image-text pre-training on the training split's written captions -> fairseq-hydra-train
with the upstream frozen, as in the paper -> eval_recall.py -> the minimal-pairs test -> search.

Each stage runs the same command a user runs on real data; stages whose output already exists
are skipped, so a second run only retrains (or pass --fresh). ``--ablation`` also trains with
alpha = 0 on the same corpus and prints both rows next to chance.
"""

import argparse

from cmd_demo.demo import add_corpus_arguments, run_demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(parser)
    parser.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="fairseq training seed (default: --seed); another value retrains on the same corpus",
    )
    parser.add_argument("--ablation", action="store_true", help="also train alpha = 0 (no CMD) and print both rows")
    args = parser.parse_args(argv)
    run_demo(args)


if __name__ == "__main__":
    main()
