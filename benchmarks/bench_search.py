#!/usr/bin/env python
"""Spoken image search at scale: exact vs approximate (FAISS IVF) search of an image index.

Synthetic but clustered data, like CLIP image embeddings (a photo collection is many near
duplicates and themes, not uniform noise): ``--clusters`` random unit centres in 768 dims
(default: one per 50 images, the same difficulty at every size); each image is its centre plus
Gaussian noise of norm ``--image-noise``, renormalised; queries are drawn the same way around
random centres with more noise (``--query-noise``: speech embeddings sit farther from the
images they describe than images from each other). Defaults 1.0 and 1.5: two images of one
cluster have cosine ~0.5, a query and its cluster's images ~0.4.

For each size (default 100,000 and 1,000,000 images) it reports:
- build time of the approximate index (k-means training + adding every vector) and the time
  to write and to load the index file;
- per-query latency, one query at a time (each the best of --repeats runs), p50 and p95 over
  the queries: exact search (blocked matmul + partial selection over the stored embeddings,
  float32 by default) and approximate search at several nprobe values (FAISS shortlist + exact
  re-scoring of the shortlist);
- recall@10 of approximate search against exact search (share of the exact top 10 found);
- memory per image: stored embeddings, the serialized FAISS index, and the whole index file.

    python benchmarks/bench_search.py                       # 100k and 1M, ~15 min on 1 thread
    python benchmarks/bench_search.py --sizes 100000 --dtypes float16 float32   # storage comparison
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks.common import current_rss_bytes  # noqa: E402
from cmd_plugin.search.index import (  # noqa: E402
    ApproximateIndexConfig,
    SearchIndex,
    build_approximate,
    exact_top_k,
    load_approximate,
    load_index,
    save_index,
    search,
)

DIM = 768


def noise_scales(dim, decay):
    """Per-dimension noise scale with variance ~ (i + 1) ** -decay, total variance 1: decay 0 is
    isotropic; real embedding sets have decaying PCA spectra (a low effective dimension)."""
    var = (torch.arange(dim, dtype=torch.float64) + 1) ** -decay
    return (var / var.sum()).sqrt().float()


def clustered(n, centres, noise, gen, dtype, decay=0.0, block=65536):
    """(n, D) unit vectors: a random centre each plus Gaussian noise of norm ~``noise``."""
    out = torch.empty(n, centres.shape[1], dtype=dtype)
    scale = noise * noise_scales(centres.shape[1], decay)
    for start in range(0, n, block):
        m = min(block, n - start)
        which = torch.randint(0, centres.shape[0], (m,), generator=gen)
        x = centres[which] + scale * torch.randn(m, centres.shape[1], generator=gen)
        out[start : start + m] = torch.nn.functional.normalize(x, dim=1).to(dtype)
    return out


def percentiles(seconds):
    a = np.asarray(seconds) * 1000
    return np.percentile(a, 50), np.percentile(a, 95)


def bench_size(n, args, dtype_name):
    dtype = {"float16": torch.float16, "float32": torch.float32}[dtype_name]
    gen = torch.Generator().manual_seed(args.seed)
    clusters = args.clusters or max(1, n // args.images_per_cluster)
    centres = torch.nn.functional.normalize(torch.randn(clusters, DIM, generator=gen), dim=1)
    t = time.perf_counter()
    images = clustered(n, centres, args.image_noise, gen, dtype, args.noise_decay)
    queries = clustered(args.queries, centres, args.query_noise, gen, torch.float32, args.noise_decay)
    print(
        f"\n== {n:,} images x {DIM} ({dtype_name}), {clusters:,} clusters, {args.queries} queries "
        f"(generated in {time.perf_counter() - t:.1f} s)",
        flush=True,
    )

    # exact: all queries in one batched call for the reference, then one at a time for latency
    t = time.perf_counter()
    _, exact_rows = exact_top_k(queries, images, args.k)
    print(f"exact top-{args.k}, {args.queries} queries in one batch: {time.perf_counter() - t:.2f} s", flush=True)
    lat = []
    for i in range(min(args.queries, args.exact_latency_queries)):
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            exact_top_k(queries[i : i + 1], images, args.k)
            best = min(best, time.perf_counter() - t)
        lat.append(best)
    p50, p95 = percentiles(lat)
    print(
        f"exact, one query at a time ({len(lat)} queries, best of {args.repeats}): p50 {p50:.1f} ms, p95 {p95:.1f} ms",
        flush=True,
    )
    rows = [("exact", p50, p95, 1.0)]

    ids = torch.arange(n, dtype=torch.long)
    cfg = ApproximateIndexConfig(
        mode="always", encoding=args.encoding, nlist=args.nlist, train_points_per_list=args.train_points_per_list
    )
    rss0 = current_rss_bytes()
    t = time.perf_counter()
    approx = build_approximate(images, ids, cfg)
    build = time.perf_counter() - t
    params = approx["params"]
    ann_bytes = approx["data"].numel()
    print(
        f"approximate index {params['factory']} (trained on {params['train_sample']:,} vectors): "
        f"built in {build:.1f} s; serialized {ann_bytes / n:.0f} bytes/image",
        flush=True,
    )
    index = SearchIndex(
        root="/synthetic",
        paths=[f"{i}.jpg" for i in range(n)],
        embeddings=images,
        mtimes_ns=torch.zeros(n, dtype=torch.long),
        sizes=torch.zeros(n, dtype=torch.long),
        ids=ids,
        next_id=n,
        identity={"synthetic": True},
        approximate=approx,
    )
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        path = os.path.join(tmp, "index.pt")
        t = time.perf_counter()
        save_index(index, path)
        save_s = time.perf_counter() - t
        file_bytes = os.path.getsize(path)
        t = time.perf_counter()
        loaded = load_index(path)
        ann = load_approximate(loaded.approximate)
        load_s = time.perf_counter() - t
        print(
            f"index file: written in {save_s:.1f} s, {file_bytes / 2**20:.0f} MiB = "
            f"{file_bytes / n:.0f} bytes/image; "
            f"loaded (mmap + FAISS deserialize) in {load_s:.2f} s",
            flush=True,
        )
        for nprobe in args.nprobes:
            lat, found = [], 0
            nprobe = nprobe or params["nprobe"]
            for i in range(args.queries):
                best = float("inf")
                for _ in range(args.repeats):
                    res = search(loaded, queries[i : i + 1], k=args.k, nprobe=nprobe, ann=ann)
                    best = min(best, res.seconds)
                lat.append(best)
                found += len(set(res.rows[0]) & set(exact_rows[i].tolist()))
            recall = found / (args.queries * args.k)
            p50a, p95a = percentiles(lat)
            print(
                f"approximate nprobe {nprobe:>3}: p50 {p50a:.2f} ms, p95 {p95a:.2f} ms, "
                f"recall@{args.k} vs exact {recall:.4f}",
                flush=True,
            )
            rows.append((f"approx nprobe {nprobe}", p50a, p95a, recall))
        del loaded, ann
    del approx, index
    print(f"RSS after the build: {current_rss_bytes() / 2**30:.2f} GiB (before: {rss0 / 2**30:.2f} GiB)")
    emb_bytes = images.element_size() * DIM
    print(
        f"memory per image: embeddings {emb_bytes} B ({dtype_name}) + FAISS {ann_bytes / n:.0f} B "
        f"= {emb_bytes + ann_bytes / n:.0f} B; index file {file_bytes / n:.0f} B"
    )
    print(
        f"summary {n:,}: build {build:.1f} s | "
        + " | ".join(f"{name}: p50 {a:.2f} ms p95 {b:.2f} ms R@10 {r:.3f}" for name, a, b, r in rows)
    )
    exact_p50 = rows[0][1]
    default = next((r for r in rows if r[0] == f"approx nprobe {params['nprobe']}"), None)
    if default is not None:
        print(
            f"exact/approximate p50 latency at the default nprobe ({params['nprobe']}): "
            f"{exact_p50 / default[1]:.1f}x; "
            f"recall@10 {default[3]:.3f} (target >= 0.95)"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32"],
        choices=["float16", "float32"],
        help="storage dtype(s) of the embeddings",
    )
    p.add_argument(
        "--clusters",
        type=int,
        default=0,
        help="cluster centres (themes) in the collection; 0: N / --images-per-cluster",
    )
    p.add_argument(
        "--images-per-cluster",
        type=int,
        default=50,
        help="images per cluster when --clusters is 0 (the same difficulty at every size)",
    )
    p.add_argument("--image-noise", type=float, default=1.0, help="image noise relative to the centre")
    p.add_argument("--query-noise", type=float, default=1.5, help="query noise relative to the centre")
    p.add_argument(
        "--noise-decay",
        type=float,
        default=0.0,
        help="noise variance of dimension i ~ (i+1)**-decay; 0 = isotropic (the hardest case)",
    )
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--exact-latency-queries", type=int, default=50, help="queries timed one by one, exact")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="each query's latency is the best of this many runs (the machine is shared)",
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument(
        "--nprobes",
        type=int,
        nargs="+",
        default=[0, 32, 128],
        help="nprobe values to time (0 = the index's default, nlist / 8)",
    )
    p.add_argument("--nlist", type=int, default=0, help="IVF cells (default 0: the index's automatic choice)")
    p.add_argument("--train-points-per-list", type=int, default=ApproximateIndexConfig().train_points_per_list)
    p.add_argument("--encoding", default="SQfp16", choices=["Flat", "SQfp16", "SQ8"])
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp-dir", default=None, help="where the index file is written and read")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, faiss {faiss.__version__}, {args.threads} thread(s), "
        f"{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}"
    )
    for n in args.sizes:
        for dtype in args.dtypes:
            bench_size(n, args, dtype)


if __name__ == "__main__":
    main()
