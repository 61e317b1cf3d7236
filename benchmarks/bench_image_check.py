#!/usr/bin/env python3
"""Cost of decoding every image at preparation (``cmd_plugin.data.corpus_utils.check_images``).

Two image sets are written to a temporary directory:

* ``scene``: the generated corpus's images (``cmd_demo/scene_corpus.py``'s own
  ``sample_scene`` + ``render_scene``, 224 x 224 JPEG, as the generator saves them);
* ``coco-like``: 640 x 480 JPEGs at quality 90 of smooth colour fields plus pixel noise, the
  size and file size range of COCO 2014 images (~100-200 kB); real photographs decode at
  similar cost per pixel.

For each set it times (best of ``--repeats``) the threaded check as preparation runs it (draft
mode, ``--workers`` threads), the same with one thread, and a full decode without draft mode
with ``--workers`` threads; then extrapolates the draft-mode, threaded time to SpokenCOCO's
123,287 images (COCO 2014 train + val) and Flickr8k's 8,091. Files are read once before timing
so the page cache holds them: the figures are decoding cost, not disk reads.

    python benchmarks/bench_image_check.py --num-images 400 --workers 8
"""

import argparse
import os
import random
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from cmd_demo.scene_corpus import render_scene, sample_scene  # noqa: E402
from cmd_plugin.data import corpus_utils  # noqa: E402

SPOKENCOCO_IMAGES = 123_287
FLICKR8K_IMAGES = 8_091


def write_scene_images(directory, n, seed=0):
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        path = os.path.join(directory, f"scene_{i}.jpg")
        render_scene(sample_scene(rng), 224).save(path, quality=95)
        paths.append(path)
    return paths


def write_coco_like_images(directory, n, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0.005, 0.03, 3)
        base = np.stack([np.sin(xx * a + i), np.cos(yy * b), np.sin((xx + yy) * c)], axis=-1)
        pixels = 127 + 90 * base + rng.normal(0, 12, (480, 640, 3))
        path = os.path.join(directory, f"coco_like_{i}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def full_decode(path):
    with Image.open(path) as im:
        im.load()
        im.convert("RGB")


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name, paths, workers, repeats):
    items = [(p, f"list.txt:{i + 1}") for i, p in enumerate(paths)]
    for p in paths:  # into the page cache
        with open(p, "rb") as f:
            f.read()
    n = len(paths)
    draft = best_of(repeats, lambda: corpus_utils.check_images(items, workers=workers, show_progress=False))
    draft_1 = best_of(repeats, lambda: corpus_utils.check_images(items, workers=1, show_progress=False))
    full = best_of(
        repeats,
        lambda: corpus_utils._map_in_order(
            lambda chunk: [full_decode(p) for p, _ in chunk], items, workers, False, "", "img"
        ),
    )
    size_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
    print(f"{name}: {n} images, mean {size_kb:.0f} kB")
    print(f"  draft mode, {workers} threads : {draft:7.2f} s  {n / draft:8.0f} images/s")
    print(f"  draft mode, 1 thread    : {draft_1:7.2f} s  {n / draft_1:8.0f} images/s")
    print(
        f"  full decode, {workers} threads: {full:7.2f} s  {n / full:8.0f} images/s  (draft is {full / draft:.1f}x faster)"
    )
    print(
        f"  extrapolated, draft mode, {workers} threads: SpokenCOCO {SPOKENCOCO_IMAGES:,} images "
        f"{SPOKENCOCO_IMAGES * draft / n / 60:.1f} min; Flickr8k {FLICKR8K_IMAGES:,} images "
        f"{FLICKR8K_IMAGES * draft / n:.0f} s"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=8, help="threads, as prepare_*.py --workers")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"cpus: {os.cpu_count()}, load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench_image_check_") as tmp:
        measure(
            "scene (generated corpus, 224 px)", write_scene_images(tmp, args.num_images), args.workers, args.repeats
        )
        measure("coco-like (640x480, q90)", write_coco_like_images(tmp, args.num_images), args.workers, args.repeats)
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
