"""Benchmark: blocked R@K scoring vs its matmul floor and vs a naive full-argsort evaluation.

Problem size is the SpokenCOCO Karpathy test split: 25,000 utterances x 5,000 images, dim 768,
5 captions per image; embeddings are seeded random unit vectors (fp32, CPU).

Every variant runs in its own fresh subprocess, so peak RSS (ru_maxrss) belongs to that
variant alone:
  matmul  one (25000 x 768) @ (768 x 5000) fp32 matmul: the floor any exact evaluation pays
  blocked the same products in ours' blocks of utterances, nothing else (no 500 MB output)
  ours    cmd_plugin.retrieval.recall.retrieval_recall
  naive   full score matrix, argsort of every row in both directions, ranks read off the sort

Usage:
  python benchmarks/bench_scoring.py                       # all three, prints ratios
  python benchmarks/bench_scoring.py --chunk-sizes 1024 2048 4096 8192 --skip-naive
"""

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_recall_module():
    # Load the pure-torch module by path: the package __init__ imports fairseq, whose memory
    # would otherwise be charged to the metric's peak RSS.
    path = os.path.join(REPO_ROOT, "cmd_plugin", "recall.py")
    spec = importlib.util.spec_from_file_location("cmd_recall_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_problem(num_images, captions_per_image, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    speech = torch.nn.functional.normalize(torch.randn(num_images * captions_per_image, dim, generator=gen), dim=1)
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=gen), dim=1)
    # Correlate each utterance with its image so recall is far from zero (exercises real ranks).
    ids = torch.randperm(num_images * captions_per_image, generator=gen) % num_images
    speech = torch.nn.functional.normalize(speech + 0.08 * images[ids], dim=1)
    return speech, images, ids


def naive_hits(speech, images, ids, ks):
    """Full-sort reference, tie-pessimistic like retrieval_recall."""
    scores = speech @ images.T  # (Ns, Ni)
    num_speech, num_images = scores.shape
    # Speech -> image: position of the paired image in the sorted row, then every competitor tied
    # with it that the sort put after it is moved above it.
    values, order = scores.sort(dim=1, descending=True)
    position = (order == ids.unsqueeze(1)).to(torch.uint8).argmax(dim=1)
    del order
    target = values.gather(1, position.unsqueeze(1))
    after = torch.arange(num_images).unsqueeze(0) > position.unsqueeze(1)
    s2i_rank = position + ((values == target) & after).sum(dim=1)
    del values, after
    # Image -> speech: first caption in the sorted column, plus non-captions tied with it after it.
    values, order = scores.T.sort(dim=1, descending=True)  # (Ni, Ns)
    del scores
    is_caption = ids[order] == torch.arange(num_images).unsqueeze(1)
    del order
    position = is_caption.to(torch.uint8).argmax(dim=1)
    best = values.gather(1, position.unsqueeze(1))
    after = torch.arange(num_speech).unsqueeze(0) > position.unsqueeze(1)
    i2s_rank = position + ((values == best) & after & ~is_caption).sum(dim=1)
    has_caption = torch.bincount(ids, minlength=num_images) > 0
    out = {}
    for k in ks:
        out[f"s2i_hits_r{k}"] = int((s2i_rank < k).sum())
        out[f"i2s_hits_r{k}"] = int(((i2s_rank < k) & has_caption).sum())
    return out


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(args):
    """Child process: time one variant, print one JSON line."""
    torch.set_num_threads(args.threads)
    speech, images, ids = make_problem(args.num_images, args.captions_per_image, args.dim, args.seed)
    recall = load_recall_module() if args.variant == "ours" else None
    ks = (1, 5, 10)
    rss_before = current_rss_bytes()
    times, hits = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        if args.variant == "matmul":
            scores = speech @ images.T
            del scores
        elif args.variant == "blocked":
            for block_start in range(0, speech.shape[0], args.chunk_size):
                scores = images @ speech[block_start : block_start + args.chunk_size].T
            del scores
        elif args.variant == "ours":
            result = recall.retrieval_recall(speech, images, ids, ks=ks, chunk_size=args.chunk_size)
        else:
            result = naive_hits(speech, images, ids, ks)
        times.append(time.perf_counter() - start)
        if args.variant in ("ours", "naive"):
            hits = {k: v for k, v in result.items() if "_hits_" in k}
    print(
        json.dumps(
            {
                "variant": args.variant,
                "chunk_size": args.chunk_size,
                "times": times,
                "peak_rss": peak_rss_bytes(),
                "rss_before": rss_before,
                "hits": hits,
            }
        )
    )


def spawn(args, variant, chunk_size=None, repeats=1):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--variant",
        variant,
        "--repeats",
        str(repeats),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--num-images",
        str(args.num_images),
        "--captions-per-image",
        str(args.captions_per_image),
        "--dim",
        str(args.dim),
    ]
    if chunk_size is not None:
        cmd += ["--chunk-size", str(chunk_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def gb(num_bytes):
    return num_bytes / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["matmul", "blocked", "ours", "naive"], help="internal: run one variant")
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of matmul/ours (best is reported)")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=None, help="also time ours at these sizes")
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
        return

    print(
        f"problem: {args.num_images * args.captions_per_image} utterances x {args.num_images} images, "
        f"dim {args.dim}, fp32, {args.threads} threads, torch {torch.__version__}"
    )
    matmul = spawn(args, "matmul", repeats=args.repeats)
    blocked = spawn(args, "blocked", chunk_size=args.chunk_size, repeats=args.repeats)
    ours = spawn(args, "ours", chunk_size=args.chunk_size, repeats=args.repeats)
    t_mm, t_blocked, t_ours = min(matmul["times"]), min(blocked["times"]), min(ours["times"])
    print(f"matmul floor      : {t_mm:7.2f} s   peak RSS {gb(matmul['peak_rss']):.2f} GB")
    print(f"blocked matmul    : {t_blocked:7.2f} s   peak RSS {gb(blocked['peak_rss']):.2f} GB")
    print(
        f"ours (chunk {args.chunk_size:5d}): {t_ours:7.2f} s   peak RSS {gb(ours['peak_rss']):.2f} GB "
        f"(inputs + interpreter before the call: {gb(ours['rss_before']):.2f} GB)"
    )
    for size in args.chunk_sizes or []:
        sweep = spawn(args, "ours", chunk_size=size, repeats=args.repeats)
        print(
            f"ours (chunk {size:5d}): {min(sweep['times']):7.2f} s   peak RSS {gb(sweep['peak_rss']):.2f} GB   "
            f"scoring/matmul = {min(sweep['times']) / t_mm:.2f}x"
        )
    print(f"scoring/matmul = {t_ours / t_mm:.2f}x   (target <= 2.5x)")
    print(f"scoring/blocked matmul = {t_ours / t_blocked:.2f}x   (cost of ranking on top of the same products)")
    print(f"peak RSS ours  = {gb(ours['peak_rss']):.2f} GB   (target < 1.5 GB)")
    if not args.skip_naive:
        naive = spawn(args, "naive", repeats=1)
        t_naive = min(naive["times"])
        print(f"naive argsort     : {t_naive:7.2f} s   peak RSS {gb(naive['peak_rss']):.2f} GB")
        print(f"argsort/ours   = {t_naive / t_ours:.1f}x   (target >= 5x)")
        same = naive["hits"] == ours["hits"]
        print(f"recall identical to naive: {same}  {ours['hits']}")
        if not same:
            print(f"naive hits: {naive['hits']}")
            sys.exit(1)


if __name__ == "__main__":
    main()
