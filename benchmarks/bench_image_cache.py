"""One training step at the paper's sizes with the image side encoded online vs read from the cache.

HuBERT-Large and CLIP ViT-L/14 architectures with random weights (nothing can be downloaded
here), CPU. Images are real JPEG files (Flickr-sized, 500 x 375) so the online side pays what
training pays: decode, open_clip's preprocessing, the frozen ViT-L forward. The cache side reads
the same images' fp16 features from a cache written by ``write_image_cache``.

    python benchmarks/bench_image_cache.py [--batch-size 4] [--seconds 5] [--repeats 2]

Prints the image side (collate + encode) and the whole step (collate + forward + CMD/contrastive
loss + backward) for both, and their ratios, measured in this one run.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMAGE_MODEL = "ViT-L-14-quickgelu"


def timed(fn, repeats):
    best = float("inf")
    out = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4, help="utterances = distinct images per batch")
    parser.add_argument("--seconds", type=float, default=5.0, help="audio length per utterance")
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings (after one warm-up)")
    args = parser.parse_args()

    import open_clip

    from cmd_demo.tiny_encoders import make_hubert_checkpoint
    from cmd_plugin.criterions.cmd_contrastive import CmdContrastiveConfig, CmdContrastiveCriterion
    from cmd_plugin.data.image_cache import CachedImages, ImageFeatureCache, encoder_identity, write_image_cache
    from cmd_plugin.data.manifest import SpeechImageManifest
    from cmd_plugin.data.speech_image_dataset import PixelImages
    from cmd_plugin.models.clip_upstream import ClipImageUpstream
    from cmd_plugin.models.cmd_speech_image import CmdSpeechImageConfig, CmdSpeechImageModel
    from cmd_plugin.tasks.speech_image import image_transform

    torch.manual_seed(0)
    bsz = args.batch_size
    with tempfile.TemporaryDirectory(prefix="bench_image_cache_") as tmp:
        hubert_path = make_hubert_checkpoint(os.path.join(tmp, "hubert_large_random.pt"), size="large")
        clip_weights = os.path.join(tmp, "vit_l_14_random.bin")
        torch.save(open_clip.create_model(IMAGE_MODEL, pretrained=None).state_dict(), clip_weights)

        rng = np.random.default_rng(0)
        image_dir = os.path.join(tmp, "images")
        os.makedirs(image_dir)
        names = [f"{i}.jpg" for i in range(bsz)]
        for name in names:
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(os.path.join(image_dir, name))
        num = int(args.seconds * 16000)
        manifest = SpeechImageManifest("/unused", [f"{i}.wav" for i in range(bsz)], [num] * bsz, image_dir, names)

        cache_dir = os.path.join(tmp, "cache")
        identity = encoder_identity(IMAGE_MODEL, clip_weights)
        upstream = ClipImageUpstream(IMAGE_MODEL, clip_weights, freeze=True)
        write_image_cache(
            cache_dir, [manifest.image_path(n) for n in names], upstream, identity, batch_size=bsz, progress=False
        )
        del upstream

        model = CmdSpeechImageModel.build_model(
            CmdSpeechImageConfig(hubert_path=hubert_path, image_model=IMAGE_MODEL, image_pretrained=clip_weights)
        )
        criterion = CmdContrastiveCriterion(CmdContrastiveConfig(noise_seed=1), task=None)
        pixels = PixelImages(manifest, image_transform(IMAGE_MODEL))
        cache = ImageFeatureCache(cache_dir)
        cache.check_identity(identity)
        cached = CachedImages(manifest, cache)

        source = 0.1 * torch.randn(bsz, num)
        audio = {
            "source": source,
            "padding_mask": torch.zeros(bsz, num, dtype=torch.bool),
            "image_index": torch.arange(bsz),
        }

        def image_side_online():
            with torch.no_grad():
                return model.encode_image(pixels(names)["images"])

        def image_side_cached():
            feats = cached(names)
            return torch.nn.functional.normalize(feats["image_cls"], dim=-1), feats["image_patches"]

        def step(read):
            def run():
                model.train()
                sample = {
                    "net_input": dict(audio, **read(names)),
                    "image_ids": torch.arange(bsz),
                    "id": torch.arange(bsz),
                    "ntokens": bsz * num,
                    "split": "train",
                }
                model.zero_grad()
                loss, _, _ = criterion(model, sample)
                loss.backward()
                return loss.item()

            return run

        image_side_online(), image_side_cached()  # warm-up
        t_img_online, _ = timed(image_side_online, args.repeats)
        t_img_cached, _ = timed(image_side_cached, args.repeats)
        step(pixels)()
        t_step_online, loss_online = timed(step(pixels), args.repeats)
        t_step_cached, loss_cached = timed(step(cached), args.repeats)

    print(
        f"batch: {bsz} utterances of {args.seconds:g} s, {bsz} distinct 500x375 JPEGs; "
        f"HuBERT-Large + {IMAGE_MODEL} (random weights), CPU, {torch.get_num_threads()} threads"
    )
    print(f"image side online (decode + preprocess + ViT-L/14): {t_img_online:8.3f} s")
    print(f"image side cached (fp16 memmap lookup)            : {t_img_cached:8.4f} s")
    print(f"image side online/cached = {t_img_online / t_img_cached:.0f}x   (target >= 50x)")
    print(f"training step online images: {t_step_online:8.2f} s   loss {loss_online:.4f}")
    print(f"training step cached images: {t_step_cached:8.2f} s   loss {loss_cached:.4f}")
    print(f"step online/cached = {t_step_online / t_step_cached:.2f}x")


if __name__ == "__main__":
    main()
