#!/usr/bin/env python
"""Score a trained cmd_speech_image checkpoint on a manifest split: speech<->image R@1/5/10.

    python examples/eval_recall.py --checkpoint checkpoints/checkpoint_best.pt \\
        --data manifests/flickr8k --split test --device cuda --output-json test_recall.json

Every utterance is encoded once (S_cls; the fusion encoder is not used) in length-ordered
batches and every distinct image once (I_cls). Speech->image: a hit at K when the paired image
is in the top K images; image->speech: a hit when ANY of the image's captions is in the top K
utterances; Mean is the average of the two; figures are x100 with one decimal, printed in the
column layout of the paper's Table 2 with a chance row.

Tie rule: an item whose similarity ties the correct one's counts as ranked ABOVE it (ties never
flatter the model).

Zero-shot scoring is just another --data: a model trained on one corpus scores another's
manifest. --hubert-path / --image-pretrained / --image-model-config re-point the frozen
upstreams' files when they moved since training. --save-embeddings keeps the embeddings;
--from-embeddings scores such a file without loading any model.

Coarse-to-fine checkpoints (method=c2f / c2f_cmd) can also be re-ranked: --rerank-k K re-scores each
query's SIC top-K with the matching head in both directions (--rerank-score sim: the match logit
alone, as ALBEF; sim+sic: match logit + SIC cosine, as BLIP; sim+sic_logit: match logit + SIC logit,
cosine / τ; it also prints how many first answers re-ranking fixed and broke) and prints the SIC row, the re-ranked
row and the time each took:

    python examples/eval_recall.py --checkpoint ckpt/checkpoint_best.pt --data manifests/flickr8k \
        --split test --rerank-k 128 --rerank-score sim
"""

import argparse
import logging
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run from any directory without installing the package
    sys.path.insert(0, REPO_ROOT)

from cmd_plugin.data.manifest import check_split  # noqa: E402
from cmd_plugin.loading import (  # noqa: E402
    UPSTREAM_FILE_FIELDS,
    add_loading_options,
    load_cmd_checkpoint,
    resolve_device,
    upstream_paths,
)
from cmd_plugin.retrieval.evaluate import (  # noqa: E402
    RECALL_KS,
    RERANK_SCORES,
    TIE_RULE,
    EvaluationError,
    chance_for,
    check_rerank_model,
    encode_split,
    load_embeddings,
    rerank_split,
    results_record,
    save_embeddings,
    score_embeddings,
    sim_auc_split,
    write_json,
)
from cmd_plugin.retrieval.recall import format_recall_rows  # noqa: E402
from cmd_plugin.retrieval.rerank import DEFAULT_RERANK_SCORE  # noqa: E402

logger = logging.getLogger("eval_recall")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=TIE_RULE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", help="trained cmd_speech_image checkpoint (fairseq trainer format)")
    parser.add_argument(
        "--data",
        help="manifest directory to score ({split}.tsv, {split}.img); may be "
        "another corpus than the training one (zero-shot)",
    )
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    add_loading_options(parser)  # --hubert-path, --image-pretrained, --image-model-config, --device, --fp16
    parser.add_argument(
        "--image-feature-cache",
        default="",
        help="directory from examples/cache_image_features.py holding the scored images "
        "(checked against the checkpoint's image encoder); default: encode pixels",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="utterances / images per batch (default: 32)")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=4096,
        help="utterances per block of the score matrix (bounds memory; default: 4096)",
    )
    parser.add_argument("--output-json", help="write every figure, counts and provenance here (atomically)")
    parser.add_argument("--save-embeddings", help="write speech/image embeddings, image ids and paths here")
    parser.add_argument("--from-embeddings", help="score a --save-embeddings file; loads no model")
    parser.add_argument(
        "--rerank-k",
        type=int,
        default=0,
        help="coarse-to-fine checkpoints: re-score each query's SIC top-K with the matching head, "
        f"both directions (K >= {max(RECALL_KS)}; ALBEF uses 128 on Flickr, 256 on COCO); "
        "0 = SIC only (default)",
    )
    parser.add_argument(
        "--rerank-score",
        choices=RERANK_SCORES,
        default=None,
        help="re-ranking score: sim+sic = match logit + SIC cosine (BLIP), sim = match logit alone "
        "(ALBEF) (default: the checkpoint's task.valid_rerank_score)",
    )
    parser.add_argument(
        "--rerank-pair-batch",
        type=int,
        default=256,
        help="(utterance, image) pairs per matching-head call (default: 256)",
    )
    parser.add_argument("--label", help="row label of the table (default: the checkpoint's file name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def sim_auc_on(model, task, data, split, emb, args):
    """The matching head's AUC on the valid split (re-encoded unless it is the scored one), or None
    when the manifest directory has no valid split."""
    auc_split = "valid"
    if auc_split != split:
        try:
            check_split(data, auc_split)
        except (FileNotFoundError, ValueError):
            return None
        emb = encode_split(
            model,
            task,
            auc_split,
            batch_size=args.batch_size,
            device=args.device,
            fp16=args.fp16,
            num_workers=args.num_workers,
            progress=not args.no_progress,
            keep_sequences=True,
        )
    return {"split": auc_split, **sim_auc_split(model, emb, device=args.device, pair_batch=args.rerank_pair_batch)}


def run(args) -> dict:
    if args.batch_size < 1 or args.chunk_size < 1 or args.rerank_pair_batch < 1:
        raise EvaluationError("--batch-size, --chunk-size and --rerank-pair-batch must be positive")
    if args.rerank_k and args.rerank_k < max(RECALL_KS):
        raise EvaluationError(f"--rerank-k must be >= {max(RECALL_KS)} (the largest reported R@k), got {args.rerank_k}")
    if args.rerank_k and args.from_embeddings:
        raise EvaluationError(
            "--rerank-k needs the model (speech sequences and matching head): give --checkpoint, not --from-embeddings"
        )
    timing = {}
    model = None
    if args.from_embeddings:
        emb = load_embeddings(args.from_embeddings)
        checkpoint = emb.meta.get("checkpoint")
        data, split = emb.meta.get("data"), emb.meta.get("split")
    else:
        if not args.checkpoint or not args.data:
            raise EvaluationError("--checkpoint and --data are required (unless --from-embeddings)")
        resolve_device(args.device, args.fp16)  # fail before the (slow) model load
        checkpoint, data, split = os.path.abspath(args.checkpoint), os.path.abspath(args.data), args.split
        check_split(data, split)  # likewise: a wrong --split or --data, naming the splits there
        model, task = load_cmd_checkpoint(
            checkpoint,
            data=data,
            **upstream_paths(args),
            image_feature_cache=args.image_feature_cache,
            keep_matching=bool(args.rerank_k),
        )
        if args.rerank_k:
            check_rerank_model(model, checkpoint)
            if args.rerank_score is None:  # the score the checkpoint's run validated with
                args.rerank_score = str(getattr(task.cfg, "valid_rerank_score", None) or DEFAULT_RERANK_SCORE)
        start = time.perf_counter()
        emb = encode_split(
            model,
            task,
            split,
            batch_size=args.batch_size,
            device=args.device,
            fp16=args.fp16,
            num_workers=args.num_workers,
            progress=not args.no_progress,
            keep_sequences=bool(args.rerank_k),
        )
        timing["encode_seconds"] = time.perf_counter() - start
        emb.meta["checkpoint"] = checkpoint
        emb.meta["upstreams"] = {k: getattr(model.cfg, k, None) for k in ("image_model",) + UPSTREAM_FILE_FIELDS}
        if args.save_embeddings:
            save_embeddings(emb, args.save_embeddings)
            logger.info(f"embeddings written to {args.save_embeddings}")

    start = time.perf_counter()
    results = score_embeddings(emb, ks=RECALL_KS, chunk_size=args.chunk_size)
    timing["sic_score_seconds"] = time.perf_counter() - start
    chance, captions = chance_for(results)
    label = args.label or (os.path.basename(checkpoint) if checkpoint else "model")
    rows = [(label if not args.rerank_k else f"{label} SIC", results)]
    reranked = auc = None
    if args.rerank_k:
        reranked = rerank_split(
            model,
            emb,
            args.rerank_k,
            score=args.rerank_score,
            device=args.device,
            pair_batch=args.rerank_pair_batch,
            ks=RECALL_KS,
            chunk_size=args.chunk_size,
        )
        rows.append((f"{label} re-ranked K={args.rerank_k} ({args.rerank_score})", reranked))
        auc = sim_auc_on(model, task, data, split, emb, args)
    print(f"{split} of {data}: {results['num_s2i_queries']} utterances, {results['num_images']} images")
    print(format_recall_rows(rows + [(f"chance ({captions} captions/image)", chance)], ks=RECALL_KS))
    queries = results["num_s2i_queries"] + results["num_i2s_queries"]
    if "encode_seconds" in timing:
        print(
            f"time: SIC {timing['encode_seconds'] + timing['sic_score_seconds']:.2f} s (encoding "
            f"{timing['encode_seconds']:.2f} s, scoring {timing['sic_score_seconds']:.3f} s)",
            end="",
        )
    else:
        print(f"time: SIC scoring {timing['sic_score_seconds']:.3f} s", end="")
    if reranked is not None:
        print(
            f"; re-ranking {reranked['seconds']:.2f} s more ({reranked['num_pairs']} pairs, "
            f"{1000 * reranked['seconds'] / queries:.1f} ms per query)"
        )
        ch = reranked["top1_changes"]
        print(
            f"first answer after re-ranking: speech->image {ch['s2i_fixed']} fixed, {ch['s2i_broken']} broken; "
            f"image->speech {ch['i2s_fixed']} fixed, {ch['i2s_broken']} broken (right before and after: "
            f"{ch['s2i_kept_right']} / {ch['i2s_kept_right']})"
        )
        if auc is not None:  # what the matching head can tell apart, on the split that selects the score
            print(
                f"matching head on the {auc['split']} split ({auc['pairs']} utterances): AUC of the positive "
                f"pair against the hardest SIC negative {auc['auc_hard']:.3f}, against a random image "
                f"{auc['auc_random']:.3f}; SIC cosine on the same pairs {auc['sic_auc_hard']:.3f} / "
                f"{auc['sic_auc_random']:.3f} (0.5 = chance)"
            )
        else:
            print("matching head AUC: no valid split next to the scored one")
    else:
        print()
    record = results_record(
        results,
        chance,
        captions,
        emb,
        checkpoint=checkpoint,
        data=data,
        split=split,
        upstreams=emb.meta.get("upstreams"),
        from_embeddings=os.path.abspath(args.from_embeddings) if args.from_embeddings else None,
        device=None if args.from_embeddings else args.device,
        fp16=None if args.from_embeddings else bool(args.fp16),
        timing=timing,
    )
    if reranked is not None:
        record["rerank"] = {
            "k": args.rerank_k,
            "effective_k": int(reranked["rerank_k"]),
            "score": args.rerank_score,
            "num_pairs": int(reranked["num_pairs"]),
            "seconds": float(reranked["seconds"]),
            "recall": {k: float(v) for k, v in reranked.items() if "_r" in k and "hits" not in k and k != "rerank_k"},
            "hits": {k: int(v) for k, v in reranked.items() if "hits" in k},
            "top1_changes": reranked["top1_changes"],
            "sim_auc": auc,
        }
    if args.output_json:
        write_json(record, args.output_json)
        logger.info(f"results written to {args.output_json}")
    return record


def main(argv=None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", stream=sys.stderr
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as err:  # EvaluationError, CheckpointError, ManifestError: bad input
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
