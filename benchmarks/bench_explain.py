#!/usr/bin/env python
"""What explaining a search costs, against what a re-ranked query costs (issue #33's target: the app's
explanation adds at most the time of one re-ranked query).

For each spoken query: one search re-ranked with the matching head (``search_images(rerank_k=K)``,
decoding and embedding included), then :meth:`SearchService.explain_hits` on the top 3 images (what the
app's checkbox adds). Prints the median of each over the queries, and their ratio.

    python benchmarks/bench_explain.py --checkpoint WORK/checkpoints_c2f/checkpoint_best.pt \\
        --index WORK/search/test_images_index.pt WORK/corpus/flickr_audio/wavs/*_0.wav
"""

import argparse
import statistics
import sys
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a coarse-to-fine checkpoint (a matching head)")
    p.add_argument("--index", required=True, help="an image index made with this checkpoint's image tower")
    p.add_argument("queries", nargs="+", help="spoken queries (wav)")
    p.add_argument("--rerank-k", type=int, default=32)
    p.add_argument("--explain", type=int, default=3, help="results explained per query (the app's)")
    p.add_argument("--max-queries", type=int, default=20)
    args = p.parse_args(argv)

    from cmd_plugin.inference import SpeechImageEncoder
    from cmd_plugin.search.index import load_index
    from cmd_plugin.search.service import SearchService

    encoder = SpeechImageEncoder.from_checkpoint(args.checkpoint, keep_matching=True)
    if not encoder.has_matching_head:
        sys.exit(f"{args.checkpoint}: no matching head; give a coarse-to-fine checkpoint")
    service = SearchService(encoder, image_index=load_index(args.index))
    queries = args.queries[: args.max_queries]
    service.search_images(queries[0], top_k=10, rerank_k=args.rerank_k)  # warm-up
    reranked, explained, kinds = [], [], set()
    for path in queries:
        started = time.perf_counter()
        answer = service.search_images(path, top_k=10, rerank_k=args.rerank_k)
        reranked.append(time.perf_counter() - started)
        service.explain_hits(answer, args.explain)
        explained.append(answer.timings["explain"])
        kinds |= {e.kind for e in answer.extra["explanations"].values()}
    r, e = statistics.median(reranked), statistics.median(explained)
    print(
        f"{len(queries)} queries, {len(service.image_index)} images, torch threads {torch.get_num_threads()}: "
        f"re-ranked query (top {args.rerank_k}, decoding and embedding included) median {1000 * r:.1f} ms; "
        f"explaining its top {args.explain} ({', '.join(sorted(kinds))}) median {1000 * e:.1f} ms"
    )
    print(f"explanation / re-ranked query = {e / r:.2f}x   (target <= 1x)")


if __name__ == "__main__":
    main()
