#!/usr/bin/env python3
"""Encode every unique image of some manifest splits once with the frozen open_clip image
encoder, and write the outputs as a memory-mapped cache (``cmd_plugin/data/image_cache.py``).

Training then reads the cache instead of encoding pixels: ``task.image_feature_cache=DIR``
(the model's image encoder must stay frozen). The cache records the encoder it was made with
(model, fingerprint of its weights, model config, preprocessing); the task refuses it for another.

A build that is interrupted (killed, crashed, an unreadable image) keeps what it encoded in a
hidden sibling directory ``.<out>.partial`` and never leaves anything at ``--out`` that passes for
a cache; running the same command again resumes from there. Size: (1 + N) x E float16 values per
image, e.g. 394,752 bytes at ViT-L/14, so SpokenCOCO's 123k images need ~48.7 GB.

Example (Flickr8k, ViT-L/14):
  python examples/cache_image_features.py --manifest-dir manifests/flickr8k \\
      --splits train valid test --image-model ViT-L-14-quickgelu \\
      --image-pretrained /abs/ViT-L-14/open_clip_pytorch_model.bin \\
      --out /abs/cache/flickr8k_vitl14 --device cuda
"""

import argparse
import os
import sys
import time

import torch

try:
    import cmd_plugin  # noqa: F401
except ImportError:  # run as a script from anywhere: the repository root holds cmd_plugin/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmd_plugin.data.image_cache import cache_identity, check_weights_file, partial_dir_of, write_image_cache  # noqa: E402
from cmd_plugin.data.manifest import read_manifest  # noqa: E402
from cmd_plugin.models.clip_upstream import ClipImageUpstream  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--manifest-dir", required=True, help="directory of {split}.tsv / {split}.img")
    p.add_argument("--splits", nargs="+", default=["train", "valid", "test"], help="splits whose images to cache")
    p.add_argument("--image-model", required=True, help="open_clip model name (model.image_model)")
    p.add_argument("--image-pretrained", required=True, help="LOCAL weights file (model.image_pretrained)")
    p.add_argument("--image-model-config", default="", help="open_clip model JSON (model.image_model_config)")
    p.add_argument("--out", required=True, help="cache directory to write (replaced atomically if it exists)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--sync-interval",
        type=float,
        default=30.0,
        help="seconds between flushes of encoded rows to disk; a resumed build loses at most this much work",
    )
    return p.parse_args(argv)


def listed_images(manifest_dir: str, splits):
    """{absolute image path: '<split>.img:<line>' of its first listing}, in order of first appearance."""
    paths = {}
    for split in splits:
        manifest = read_manifest(manifest_dir, split)
        for row, rel in enumerate(manifest.image_paths):
            path = os.path.abspath(manifest.image_path(rel))
            if path not in paths:
                paths[path] = f"{manifest.img_file}:{row + 2}"
    return paths


def _size_on_disk(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def main(argv=None) -> int:
    args = parse_args(argv)
    prog = os.path.basename(sys.argv[0] or "cache_image_features.py")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{prog}: error: --device {args.device} but CUDA is not available", file=sys.stderr)
        return 1
    started = time.time()
    try:
        listed = listed_images(args.manifest_dir, args.splits)
        paths = list(listed)
        check_weights_file(args.image_pretrained)  # before the (slow) build
        upstream = ClipImageUpstream(args.image_model, args.image_pretrained, args.image_model_config, freeze=True)
        identity = cache_identity(upstream, args.image_pretrained)
        meta = write_image_cache(
            args.out,
            paths,
            upstream,
            identity,
            batch_size=args.batch_size,
            device=args.device,
            num_workers=args.num_workers,
            progress=not args.no_progress,
            where=[listed[p] for p in paths],
            sync_interval=args.sync_interval,
        )
    except (ValueError, FileNotFoundError) as exc:  # ManifestError, ImageCacheError, an unknown model
        print(f"{prog}: error: {exc}", file=sys.stderr)
        print(
            "no cache was written (an existing one is unchanged); images encoded so far are kept in "
            f"{partial_dir_of(args.out)} if it exists, and the same command resumes from them",
            file=sys.stderr,
        )
        return 1
    out = os.path.abspath(args.out)
    size = _size_on_disk(out)
    total = time.time() - started
    print(
        f"cached {meta['num_images']} images of {', '.join(args.splits)} "
        f"(E={meta['embed_dim']}, N={meta['num_patches']}, {meta['dtype']}) to {out}\n"
        f"size on disk {size / 2**20:.1f} MiB; encoding {meta['encode_seconds']:.1f} s "
        f"({(meta['num_images'] - meta['resumed_from_row']) / max(meta['encode_seconds'], 1e-9):.1f} images/s"
        f"{', resumed after %d already encoded' % meta['resumed_from_row'] if meta['resumed_from_row'] else ''}), "
        f"total {total:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
