#!/usr/bin/env python3
"""Run the frozen HuBERT upstream once over some manifest splits and keep every utterance's layer
states (``cmd_plugin/data/speech_cache.py``), so that training reads them instead of recomputing
them at every step: ``task.speech_feature_cache=DIR`` (with ``model.freeze_hubert=true``).

The cache records the upstream it was made with (fingerprint of its weights, which states, waveform
normalisation); the task refuses it for another upstream, and for a manifest whose utterances differ.
Scoring (``eval_recall.py``, the embedding API) always encodes waveforms.

Size: frames x states x D x 2 bytes -- 64 KB per second of speech for the demo's 4-layer, 128-wide
upstream, 2.56 MB per second for HuBERT-Large (Flickr8k's training captions: ~400 GB): meant for
small upstreams, or for a sweep that trains many runs on one corpus.

Example (the demo's upstream; the demo does this itself):
  python examples/cache_speech_features.py --manifest-dir work_dirs/demo/manifests --splits train valid \\
      --hubert work_dirs/demo/upstream/hubert_finetuned.pt --out work_dirs/demo/speech_cache
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

from cmd_plugin.data.manifest import ManifestError, read_manifest  # noqa: E402
from cmd_plugin.data.speech_cache import cache_paths, write_speech_cache  # noqa: E402
from cmd_plugin.data.speech_image_dataset import SpeechImageDataset  # noqa: E402
from cmd_plugin.models.hubert_upstream import HUBERT_STATE_CHOICES, HubertUpstream  # noqa: E402
from cmd_plugin.progress import CountProgress  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--manifest-dir", required=True, help="directory of {split}.tsv (task.data)")
    p.add_argument("--splits", nargs="+", default=["train", "valid"], help="splits to cache (those training reads)")
    p.add_argument("--hubert", required=True, help="fairseq HuBERT checkpoint (model.hubert_path)")
    p.add_argument(
        "--layer-states",
        choices=HUBERT_STATE_CHOICES,
        default="superb",
        help="which states, as model.hubert_layer_states (default: the model's default)",
    )
    p.add_argument("--out", required=True, help="cache directory (a split's files are replaced when rebuilt)")
    p.add_argument("--max-batch-seconds", type=float, default=200.0, help="padded seconds of audio per batch")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    prog = os.path.basename(sys.argv[0] or "cache_speech_features.py")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{prog}: error: --device {args.device}, but CUDA is not available", file=sys.stderr)
        return 2
    try:
        manifests = {split: read_manifest(args.manifest_dir, split) for split in args.splits}
    except ManifestError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    hubert = HubertUpstream(args.hubert, freeze=True, layer_states=args.layer_states).to(args.device)
    for split, manifest in manifests.items():
        start = time.time()
        reader = SpeechImageDataset(manifest, split, images=lambda paths: {}, shuffle=False)
        progress = CountProgress(f"{split}: speech states", len(manifest), "utterances")
        try:
            meta = write_speech_cache(
                hubert,
                manifest,
                split,
                args.out,
                reader.read_wave,
                max_batch_samples=int(args.max_batch_seconds * hubert.sample_rate),
                progress=lambda done, total: progress.update(done),
            )
        except ManifestError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1
        size = os.path.getsize(cache_paths(args.out, split)["states"])
        frames, states, dim = meta["shape"]
        print(
            f"{split}: {len(manifest)} utterances, {frames} frames x {states} states x {dim} "
            f"({size / 2**20:.1f} MiB) in {time.time() - start:.1f}s -> {args.out}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
