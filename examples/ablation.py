#!/usr/bin/env python
"""Ablation harness on the demo's generated corpus: rows (method variants) x training seeds.

    python examples/ablation.py --seeds 1 2 3                        # the default rows
    python examples/ablation.py --rows sic cmd-cosine cmd-cosine-a0.5 --seeds 1 2 3

Reuses the demo's stages and work dir (tiny encoders, corpus, manifests, pre-trained tiny CLIP;
``examples/demo.py`` options apply). Each run trains the tiny config, keeps the checkpoint with the
best valid mean R@1 (``checkpoint_best.pt``), and scores it on valid and test with eval_recall.py.
A run whose records exist is reused, so an interrupted sweep resumes where it stopped. Prints one
table of mean ± sd over seeds (test R@1/5/10 both directions and mean, plus the selection metric
valid mean R@1), writes every figure to ``ablation.json`` and plots test mean R@1 against α
(the paper's Figure 2) to ``ablation.png``.

Rows: ``sic`` (α = 0: contrastive only) and ``cmd-VARIANT[-aALPHA]`` with VARIANT one of the
fusion encoder's ``model.fusion_attention`` choices and ALPHA = criterion.cmd_weight (default 1);
``cmd-qkv`` (the config's fusion, α = 1) is the SIC + CMD system.

Coarse-to-fine rows (the second paper; config group ``cmd_plugin/config/method/``): ``c2f`` (method=c2f)
and ``c2f-cmd`` (method=c2f_cmd); ``c2f[-cmd]-rerankK[-simsic|-simsiclogit]`` re-scores the checkpoint of the
``c2f[-cmd]`` run of the same seed (trained if missing, never retrained) with eval_recall.py
``--rerank-k K`` (score: the match logit; with ``-simsic`` match logit + SIC cosine; with
``-simsiclogit`` match logit + SIC logit, cosine / τ).

    python examples/ablation.py --rows sic cmd-qkv c2f c2f-cmd c2f-rerank10 c2f-rerank50 --seeds 1 2 3 --name ablation_c2f
"""

import argparse

from cmd_demo.ablation import DEFAULT_ROWS, print_plan, run_ablation
from cmd_demo.demo import add_corpus_arguments


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(parser)
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help=f"rows to run (default: {DEFAULT_ROWS})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="training seeds (common.seed)")
    parser.add_argument("--out-dir", default=None, help="runs, JSON and plot (default: WORK_DIR/ablation)")
    parser.add_argument(
        "--name",
        default="ablation",
        help="file name stem of the table's record: OUT_DIR/NAME_u<max_update>.json and .png "
        "(several tables can share the runs of one out dir)",
    )
    parser.add_argument(
        "--no-minimal-pairs",
        dest="minimal_pairs",
        action="store_false",
        help="skip scoring each run's checkpoint on the minimal-pairs set (about 10 s a run)",
    )
    parser.add_argument(
        "--compare",
        nargs="*",
        default=[],
        metavar="ROW:BASE",
        help="paired differences to report besides each row against sic, e.g. cmd-qkv:cmd-uniform",
    )
    parser.add_argument(
        "--primary",
        nargs="*",
        default=[],
        metavar="ROW:BASE",
        help="declared (primary) comparisons, each tested on test mean R@1 and on the minimal-pairs mean "
        "(paired t over seeds) with Holm's correction across all of them; declare them before running "
        "(docs/results.md, 'The fine-grained comparison')",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train and score nothing: the table of the runs that have finished (a sweep in progress)",
    )
    parser.add_argument(
        "--plan-from",
        nargs="*",
        default=[],
        metavar="RECORD",
        help="plan, do not run: print the paired seeds the --primary comparisons need for --plan-power, "
        "at the spread of these recorded sweeps (OUT_DIR/NAME_u<updates>.json)",
    )
    parser.add_argument("--plan-delta-r1", type=float, default=2.3, help="planned effect on test mean R@1 (points)")
    parser.add_argument(
        "--plan-delta-mp", type=float, default=2.0, help="planned effect on the minimal-pairs mean (points)"
    )
    parser.add_argument("--plan-power", type=float, default=0.8, help="planned power of each declared test")
    args = parser.parse_args(argv)
    if args.plan_from:
        print_plan(args)
        return
    run_ablation(args, argv)


if __name__ == "__main__":
    main()
