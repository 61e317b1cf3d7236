"""Benchmark: parameters, checkpoint size and training-step memory of the CMD model with the
paper's real upstream ARCHITECTURES (HuBERT-Large + CLIP ViT-L/14), random weights, CPU.

Nothing is downloaded: HuBERT-Large is a random-weight checkpoint in the released layout
(``cmd_plugin.tiny_encoders.make_hubert_checkpoint``), CLIP is open_clip's ``ViT-L-14-quickgelu``
with random init (``image_pretrained=""``). Memory and parameter counts do not depend on the
weights' values.

Every measure runs in its own fresh interpreter (``--measure NAME``):
  ckpt     write the random HuBERT-Large checkpoint (its build peak stays out of the others)
  params   trainable / total parameter counts per part; checkpoint bytes (len of torch.save output)
           of the model's state_dict (frozen upstreams excluded) vs the full one
  forward  no-grad forward of the frozen encoders only (HuBERT all states + CLIP pooled/patches)
  step     one training step: model.train(), cmd_contrastive (all pairs) forward, backward

For forward and step: the model is built, one warm-up call of the same measure is made (grads
then dropped, as fairseq's zero_grad does), the peak-RSS mark is reset to the current RSS
(/proc/self/clear_refs, see benchmarks/common.py), and the measured call follows. Reported:
RSS before the call ("baseline": interpreter + weights + warm caches), ru_maxrss after it
(absolute peak), and the increment = peak - baseline. ``--no-warmup`` measures the first call.
Subprocesses run with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ = 128 KiB so that freed
memory leaves RSS (glibc otherwise keeps it: a warm-up's freed blocks then sit in the baseline
and the measured call reuses them); ``--keep-malloc`` turns that off.

Usage:
  python benchmarks/bench_memory.py                  # batch 2 x 5 s audio + 2 images 224 px
  python benchmarks/bench_memory.py --batch-size 4 --seconds 8
"""

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    current_rss_bytes,
    gb,
    hwm_bytes,
    mb,
    peak_rss_bytes,
    reset_peak_rss,
    run_json_subprocess,
)

PAPER_TRAINABLE = 14e6
PAPER_TOTAL = 752e6
IMAGE_MODEL = "ViT-L-14-quickgelu"
SAMPLE_RATE = 16000


class _CountingWriter:
    """A write-only file object that keeps only the number of bytes written."""

    def __init__(self):
        self.num_bytes = 0

    def write(self, data):
        n = len(data)
        self.num_bytes += n
        return n

    def flush(self):
        pass


def saved_bytes(obj) -> int:
    import torch

    writer = _CountingWriter()
    torch.save(obj, writer)
    return writer.num_bytes


def build(hubert_path):
    from cmd_plugin.models.cmd_speech_image import CmdSpeechImageConfig, CmdSpeechImageModel

    cfg = CmdSpeechImageConfig(hubert_path=hubert_path, image_model=IMAGE_MODEL, image_pretrained="")
    return CmdSpeechImageModel.build_model(cfg)


def make_sample(batch_size, seconds, image_size, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    num = int(seconds * SAMPLE_RATE)
    source = 0.1 * torch.randn(batch_size, num, generator=gen)
    padding_mask = torch.zeros(batch_size, num, dtype=torch.bool)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    return {
        "id": torch.arange(batch_size),
        "net_input": {
            "source": source,
            "padding_mask": padding_mask,
            "images": images,
            "image_index": torch.arange(batch_size),
        },
        "image_ids": torch.arange(batch_size),
        "ntokens": batch_size * num,
        "nsentences": batch_size,
        "split": "train",
    }


# ----------------------------------------------------------------------------- measures


def measure_ckpt(args):
    from cmd_plugin.tiny_encoders import make_hubert_checkpoint

    t0 = time.perf_counter()
    make_hubert_checkpoint(args.hubert_path, size="large", seed=0)
    return {"seconds": time.perf_counter() - t0, "file_bytes": os.path.getsize(args.hubert_path)}


def measure_params(args):
    import torch
    from torch import nn

    model = build(args.hubert_path)
    parts = {
        "layer_weights": [model.layer_weights],
        "cls_token": [model.cls_token],
        "speech_encoder (1 transformer layer)": list(model.speech_encoder.parameters()),
        "speech_proj": list(model.speech_proj.parameters()),
        "fusion": list(model.fusion.parameters()),
        "temperature (logit_scale)": [model.logit_scale],
    }
    part_counts = {name: sum(p.numel() for p in ps) for name, ps in parts.items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hubert = sum(p.numel() for p in model.hubert.parameters())
    image = sum(p.numel() for p in model.image_encoder.parameters())
    total = sum(p.numel() for p in model.parameters())
    frozen_with_grad = [n for n, p in model.named_parameters()
                        if p.requires_grad and n.startswith(("hubert.", "image_encoder."))]

    trained_state = model.state_dict()
    full_state = nn.Module.state_dict(model)
    ckpt_bytes = saved_bytes({"model": trained_state})
    full_bytes = saved_bytes({"model": full_state})
    # what fairseq's checkpoint_last.pt adds: Adam's two moments per trained weight
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    with_adam_bytes = saved_bytes({"model": trained_state, "last_optimizer_state": optimizer.state_dict()})
    del optimizer, full_state, trained_state, model
    gc.collect()

    # The paper's 752M total: the CLIP text tower is the one part we do not build.
    import open_clip

    clip = open_clip.create_model(IMAGE_MODEL, pretrained=None)
    clip_total = sum(p.numel() for p in clip.parameters())
    clip_visual = sum(p.numel() for p in clip.visual.parameters())
    return {
        "parts": part_counts,
        "trainable": trainable,
        "parts_sum": sum(part_counts.values()),
        "hubert": hubert,
        "image_encoder": image,
        "total": total,
        "frozen_with_grad": frozen_with_grad,
        "clip_full": clip_total,
        "clip_text_and_rest": clip_total - clip_visual,
        "ckpt_bytes": ckpt_bytes,
        "full_ckpt_bytes": full_bytes,
        "ckpt_with_adam_bytes": with_adam_bytes,
    }


def _run_forward(model, sample):
    import torch

    net = sample["net_input"]
    with torch.no_grad():
        states, frame_mask = model.hubert(net["source"], net["padding_mask"])
        pooled, patches = model.image_encoder(net["images"])
    return {"states_shape": list(states.shape)}


def _run_step(model, criterion, sample):
    model.train()
    loss, sample_size, logs = criterion(model, sample)
    loss.backward()
    return {"loss": float(loss), "sample_size": int(sample_size)}


def measure_forward_or_step(args):
    import torch

    import cmd_plugin.models.cmd_speech_image  # noqa: F401  (fairseq, open_clip imports)

    rss_after_imports = current_rss_bytes()
    t0 = time.perf_counter()
    model = build(args.hubert_path)
    build_s = time.perf_counter() - t0
    sample = make_sample(args.batch_size, args.seconds, args.image_size)
    criterion = None
    if args.measure == "step":
        from cmd_plugin.criterions.cmd_contrastive import CmdContrastiveConfig, CmdContrastiveCriterion

        criterion = CmdContrastiveCriterion(
            CmdContrastiveConfig(cmd_weight=1.0, cmd_pairs="all", global_batch_negatives=False, noise_seed=1),
            task=None,
        )
        run = lambda: _run_step(model, criterion, sample)  # noqa: E731
    else:
        model.eval()
        run = lambda: _run_forward(model, sample)  # noqa: E731

    gc.collect()
    rss_after_build = current_rss_bytes()
    warmup_s = None
    if not args.no_warmup:
        t0 = time.perf_counter()
        run()
        warmup_s = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        gc.collect()
    baseline = current_rss_bytes()
    reset_ok = reset_peak_rss()
    baseline = max(baseline, current_rss_bytes())
    t0 = time.perf_counter()
    info = run()
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    hwm = hwm_bytes()

    result = {
        "measure": args.measure,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "seconds": seconds,
        "rss_after_imports": rss_after_imports,
        "rss_after_build": rss_after_build,
        "baseline": baseline,
        "peak": peak,
        "vm_hwm": hwm,
        "increment": peak - baseline,
        "peak_reset_ok": reset_ok,
        "threads": torch.get_num_threads(),
        **info,
    }
    if args.measure == "step":
        with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
        result["params_with_grad"] = len(with_grad)
        result["frozen_params_with_grad"] = [n for n in with_grad if n.startswith(("hubert.", "image_encoder."))]
        result["trainable_tensors"] = sum(1 for p in model.parameters() if p.requires_grad)
        result["layer_weights_grad_norm"] = float(model.layer_weights.grad.norm())
        result["grad_bytes"] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                                   if p.grad is not None)
        result.update(saved_for_backward(model, criterion, sample))
    return result


def saved_for_backward(model, criterion, sample):
    """After the measured step: one more step recording what autograd keeps for backward
    (distinct storages, parameters excluded), to explain the step's extra memory."""
    import torch

    model.zero_grad(set_to_none=True)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = (storage.nbytes(), list(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()
        loss, _, _ = criterion(model, sample)
    total = sum(n for n, _ in saved.values())
    largest = sorted(saved.values(), key=lambda v: -v[0])[:5]
    loss.backward()
    return {"saved_bytes": total, "saved_tensors": len(saved), "saved_largest": largest}


# ----------------------------------------------------------------------------- driver


def spawn(args, measure, hubert_path):
    argv = [os.path.abspath(__file__), "--measure", measure, "--hubert-path", hubert_path,
            "--batch-size", str(args.batch_size), "--seconds", str(args.seconds),
            "--image-size", str(args.image_size)]
    if args.no_warmup:
        argv.append("--no-warmup")
    env = dict(os.environ)
    if not args.keep_malloc:
        # A fixed mmap threshold makes glibc return every freed block >= 128 KiB to the OS at
        # once (the default threshold grows to 32 MiB after the first frees, and freed heap
        # memory then stays resident): RSS then follows the live tensors, and the baseline
        # after a warm-up does not hide a measure's own working memory in retained heap.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(128 * 1024))
    return run_json_subprocess(argv, env=env)


def frames(num_samples):
    # HuBERT's conv stack: (512,10,5) + 4 x (512,3,2) + 2 x (512,2,2), no padding
    n = num_samples
    for k, s in [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2:
        n = (n - k) // s + 1
    return n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", choices=["ckpt", "params", "forward", "step"])
    parser.add_argument("--hubert-path")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--skip-params", action="store_true")
    parser.add_argument("--keep-malloc", action="store_true",
                        help="leave glibc's malloc defaults (freed memory may stay resident)")
    args = parser.parse_args()

    if args.measure:
        fn = {"ckpt": measure_ckpt, "params": measure_params}.get(args.measure, measure_forward_or_step)
        print(json.dumps(fn(args)))
        return

    tmp = tempfile.mkdtemp(prefix="bench_memory_")
    try:
        hubert_path = os.path.join(tmp, "hubert_large_random.pt")
        made = spawn(args, "ckpt", hubert_path)
        print(f"random HuBERT-Large checkpoint: {gb(made['file_bytes'])} written in {made['seconds']:.1f} s")

        if not args.skip_params:
            p = spawn(args, "params", hubert_path)
            print("\n== parameters ==")
            for name, n in p["parts"].items():
                print(f"  {name:<38s} {n:>12,d}")
            print(f"  {'trainable total':<38s} {p['trainable']:>12,d}  = {p['trainable'] / 1e6:.2f}M "
                  f"(paper: 14M; ratio {p['trainable'] / PAPER_TRAINABLE:.3f}); parts sum {p['parts_sum']:,d}")
            print(f"  {'HuBERT-Large (frozen)':<38s} {p['hubert']:>12,d}")
            print(f"  {'CLIP ViT-L/14 image tower (frozen)':<38s} {p['image_encoder']:>12,d}")
            print(f"  {'model total':<38s} {p['total']:>12,d}  = {p['total'] / 1e6:.1f}M (paper: 752M)")
            with_text = p["total"] + p["clip_text_and_rest"]
            print(f"  + CLIP text tower/logit scale not built: {p['clip_text_and_rest']:,d} -> "
                  f"{with_text / 1e6:.1f}M with the whole CLIP")
            print(f"  frozen parameters with requires_grad: {p['frozen_with_grad'] or 'none'}")
            print("\n== checkpoint size (len of torch.save bytes) ==")
            print(f"  model.state_dict() (frozen upstreams excluded): {mb(p['ckpt_bytes'])}")
            print(f"  + Adam moments (what checkpoint_last adds):     {mb(p['ckpt_with_adam_bytes'])}")
            print(f"  full state dict incl. upstreams:                {mb(p['full_ckpt_bytes'])}"
                  f"  ({p['full_ckpt_bytes'] / p['ckpt_bytes']:.0f}x)")

        fwd = spawn(args, "forward", hubert_path)
        step = spawn(args, "step", hubert_path)
        t = frames(int(args.seconds * SAMPLE_RATE))
        stacked = 25 * args.batch_size * t * 1024 * 4
        print(f"\n== memory: batch {args.batch_size} x {args.seconds:g} s audio + {args.batch_size} images "
              f"{args.image_size} px, {step['threads']} threads, warm-up {'off' if args.no_warmup else 'on'}, "
              f"malloc {'defaults' if args.keep_malloc else 'mmap/trim threshold 128 KiB'} ==")
        print(f"  RSS after imports (torch, fairseq, open_clip): {gb(fwd['rss_after_imports'])}; "
              f"after building the model: {gb(fwd['rss_after_build'])} (fp32 weights: 2.54 GB)")
        for r, label in ((fwd, "no-grad forward, frozen encoders only"), (step, "training step (fwd+bwd, cmd all)")):
            print(f"  {label:<40s}: {r['seconds']:6.1f} s   RSS after build {gb(r['rss_after_build'])}, "
                  f"baseline {gb(r['baseline'])}, peak {gb(r['peak'])} (VmHWM {gb(r['vm_hwm'])}), "
                  f"increment {mb(r['increment'])}  [peak reset ok: {r['peak_reset_ok']}]")
        print(f"  step/forward: absolute peak {step['peak'] / fwd['peak']:.3f}x, "
              f"increment {step['increment'] / max(fwd['increment'], 1):.2f}x   (target <= 1.3x)")
        print(f"  step/forward wall time: {step['seconds'] / fwd['seconds']:.2f}x")
        print(f"  HuBERT states {fwd['states_shape']}: stacked 25 x B x T' x 1024 fp32 = {mb(stacked)} "
              f"(T' = {t} frames)")
        if "saved_bytes" in step:
            print(f"  autograd keeps {mb(step['saved_bytes'])} in {step['saved_tensors']} storages for backward "
                  f"(largest: " + ", ".join(f"{mb(n)} {shape}" for n, shape in step["saved_largest"][:3])
                  + f"); gradients {mb(step['grad_bytes'])}")
        print(f"  gradients reached {step['params_with_grad']} of {step['trainable_tensors']} trainable tensors; "
              f"frozen upstream tensors with a gradient: {step['frozen_params_with_grad'] or 'none'}")
        print("\n" + json.dumps({"forward": fwd, "step": step}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
