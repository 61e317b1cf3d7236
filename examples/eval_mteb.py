#!/usr/bin/env python
"""Score a trained cmd_speech_image checkpoint with MTEB: a manifest split offline, or tasks of mteb's registry.

    # offline: a manifest split as two local tasks (speech -> image, image -> speech), our R@K beside mteb's
    python examples/eval_mteb.py --checkpoint ckpt/checkpoint_best.pt --data manifests/flickr8k --split test

    # mteb's registry (the task's data is downloaded from the Hugging Face hub on first use)
    python examples/eval_mteb.py --checkpoint ckpt/checkpoint_best.pt \\
        --tasks SpokenCOCOA2IRetrieval SpokenCOCOI2ARetrieval

Prints, per task, mteb's nDCG@10 (the main score), recall@1/5/10, hit rate@1/5/10 and MRR@10 (x100).
With --data it also prints our R@1/5/10 (cmd_plugin.retrieval.recall, as examples/eval_recall.py) computed on
the very embeddings mteb scored. Speech -> image: one relevant image per query, so mteb's recall,
its hit rate and our R@K mean the same thing. Image -> speech: mteb's recall@K is the share of the
image's captions found in the top K; its hit rate@K and our R@K count a hit when ANY caption is
there (docs/mteb.md). Ties: ours ranks a tied wrong answer above the right one, mteb (pytrec_eval)
breaks ties by document id.
"""

import argparse
import logging
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run from any directory without installing the package
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from cmd_plugin.data.manifest import read_manifest  # noqa: E402
from cmd_plugin.files import atomic_write_json  # noqa: E402
from cmd_plugin.loading import add_loading_options, upstream_paths  # noqa: E402

logger = logging.getLogger("eval_mteb")

KS = (1, 5, 10)
COLUMNS = (
    [("ndcg_at_10", "nDCG@10")]
    + [(f"recall_at_{k}", f"R@{k}") for k in KS]
    + [(f"hit_rate_at_{k}", f"Hit@{k}") for k in KS]
    + [("mrr_at_10", "MRR@10")]
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="trained cmd_speech_image checkpoint")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", help="manifest directory ({split}.tsv, {split}.img): scored offline as local tasks")
    where.add_argument(
        "--tasks",
        nargs="+",
        metavar="NAME",
        help="tasks of mteb's registry, e.g. SpokenCOCOA2IRetrieval SpeechCocoI2ARetrieval",
    )
    parser.add_argument("--split", default="test", help="manifest split for --data (default: test)")
    add_loading_options(parser)  # --hubert-path, --image-pretrained, --image-model-config, --device, --fp16
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="utterances / images per forward pass, and per mteb DataLoader batch (default: 32)",
    )
    parser.add_argument(
        "--sort-window",
        type=int,
        default=4096,
        help="utterances read before they are sorted by length into batches; at least the split's "
        "size gives exactly eval_recall.py's batches (default: 4096)",
    )
    parser.add_argument(
        "--cache-dir",
        default="",
        help="mteb result cache directory: a rerun with the same model revision and task returns "
        "the cached scores (default: no cache, always evaluate)",
    )
    parser.add_argument("--output-json", help="write every score, the model's metadata and timings here (atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def task_scores(model_result):
    """{task name: {hf_subset: scores}} of the first evaluated split of each task."""
    scores = {}
    for task_result in model_result.task_results:
        split, rows = next(iter(task_result.scores.items()))
        scores[task_result.task_name] = {row["hf_subset"]: dict(row, split=split) for row in rows}
    return scores


def format_mteb_table(scores) -> str:
    header = f"{'mteb task':<44}" + "".join(f"{label:>9}" for _, label in COLUMNS)
    lines = [header]
    for name, subsets in scores.items():
        for subset, row in subsets.items():
            label = name if subset == "default" else f"{name} [{subset}]"
            lines.append(
                f"{label:<44}" + "".join(f"{100 * row[key]:>9.2f}" if key in row else f"{'-':>9}" for key, _ in COLUMNS)
            )
    return "\n".join(lines)


def recorded_embeddings(model, task_name: str, modality: str):
    """(ids, (n, E) embeddings) that ``model`` produced for ``task_name``'s ``modality``, chunks joined."""
    chunks = model.recorded.get((task_name, modality), [])
    ids = [i for chunk_ids, _ in chunks for i in chunk_ids]
    return ids, (torch.cat([emb for _, emb in chunks]) if chunks else torch.empty(0))


def our_recall(model, a2i_task_name: str, data: str, split: str):
    """cmd_plugin.retrieval.recall's R@K on the embeddings the model gave mteb for the speech -> image task."""
    from cmd_plugin.retrieval.recall import retrieval_recall  # scoring as examples/eval_recall.py

    manifest = read_manifest(data, split)
    utterance_ids, speech = recorded_embeddings(model, a2i_task_name, "audio")
    image_ids, images = recorded_embeddings(model, a2i_task_name, "image")
    row_of_image = {image: row for row, image in enumerate(image_ids)}
    image_of_utterance = dict(zip(manifest.audio_paths, manifest.image_paths))
    pairs = torch.tensor([row_of_image[image_of_utterance[u]] for u in utterance_ids])
    return retrieval_recall(speech, images, pairs, ks=KS)


def format_side_by_side(scores, ours, a2i: str, i2a: str) -> str:
    """Our R@K against mteb's figures that mean the same (and mteb's recall for image -> speech)."""
    s2i, i2s = scores[a2i]["default"], scores[i2a]["default"]
    lines = [f"{'(x100)':<44}" + "".join(f"{'R@' + str(k):>9}" for k in KS)]
    rows = [
        ("speech->image  ours (eval_recall's R@K)", [ours[f"s2i_r{k}"] for k in KS]),
        ("speech->image  mteb recall", [100 * s2i[f"recall_at_{k}"] for k in KS]),
        ("image->speech  ours (any caption in top K)", [ours[f"i2s_r{k}"] for k in KS]),
        ("image->speech  mteb hit rate (same def.)", [100 * i2s[f"hit_rate_at_{k}"] for k in KS]),
        ("image->speech  mteb recall (share found)", [100 * i2s[f"recall_at_{k}"] for k in KS]),
    ]
    lines += [f"{label:<44}" + "".join(f"{v:>9.2f}" for v in values) for label, values in rows]
    return "\n".join(lines)


def load_tasks(args):
    import mteb

    from cmd_plugin.retrieval.mteb_model import manifest_tasks

    if args.data:
        return manifest_tasks(args.data, args.split)
    known = {task.metadata.name for task in mteb.get_tasks()}
    unknown = [name for name in args.tasks if name not in known]
    if unknown:
        raise ValueError(
            f"--tasks: {', '.join(unknown)} not in mteb {mteb.__version__}'s registry "
            "(e.g. SpokenCOCOA2IRetrieval, SpokenCOCOI2ARetrieval, SpeechCocoA2IRetrieval, SpeechCocoI2ARetrieval)"
        )
    return list(mteb.get_tasks(tasks=args.tasks))


def run(args) -> dict:
    import mteb
    from mteb.cache import ResultCache

    from cmd_plugin.retrieval.mteb_model import CmdSpeechImageMteb

    if args.batch_size < 1 or args.sort_window < 1:
        raise ValueError("--batch-size and --sort-window must be positive")
    tasks = load_tasks(args)  # before the slow model load: a wrong --data or task name fails first
    start = time.perf_counter()
    model = CmdSpeechImageMteb.from_checkpoint(
        args.checkpoint,
        device=args.device,
        fp16=args.fp16,
        batch_size=args.batch_size,
        sort_window=args.sort_window,
        record=bool(args.data),
        **upstream_paths(args),
    )
    load_seconds = time.perf_counter() - start
    meta = model.mteb_model_meta
    logger.info(f"model {meta.name} revision {meta.revision}: {meta.embed_dim}-d, {meta.n_parameters:,} parameters")
    start = time.perf_counter()
    result = mteb.evaluate(
        model,
        tasks,
        cache=ResultCache(args.cache_dir) if args.cache_dir else None,
        show_progress_bar=not args.no_progress,
        encode_kwargs={"batch_size": args.batch_size},
    )
    evaluate_seconds = time.perf_counter() - start
    scores = task_scores(result)
    print(f"model {meta.name} (revision {meta.revision}), mteb {mteb.__version__}")
    print(format_mteb_table(scores))
    record = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "model_name": meta.name,
        "revision": meta.revision,
        "embed_dim": meta.embed_dim,
        "mteb_version": mteb.__version__,
        "scores": scores,
        "timing": {"load_seconds": load_seconds, "evaluate_seconds": evaluate_seconds},
    }
    if args.data:
        a2i, i2a = (task.metadata.name for task in tasks)
        ours = our_recall(model, a2i, args.data, args.split)
        print(
            f"\n{args.split} of {os.path.abspath(args.data)}: {ours['num_s2i_queries']} utterances, "
            f"{ours['num_images']} images"
        )
        print(format_side_by_side(scores, ours, a2i, i2a))
        record.update(data=os.path.abspath(args.data), split=args.split, ours=ours)
    print(f"time: loading {load_seconds:.1f} s, mteb evaluation {evaluate_seconds:.1f} s")
    if args.output_json:
        atomic_write_json(args.output_json, record)
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
    except ImportError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except (FileNotFoundError, ValueError) as err:  # MtebModelError, ManifestError, CheckpointError: bad input
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
