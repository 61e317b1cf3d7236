"""Benchmark: parameters, checkpoint size and training-step memory of the CMD model with the
paper's real upstream ARCHITECTURES (HuBERT-Large + CLIP ViT-L/14), random weights, CPU.

Nothing is downloaded: HuBERT-Large is a random-weight checkpoint in the released layout
(``cmd_demo.tiny_encoders.make_hubert_checkpoint``), CLIP is open_clip's ``ViT-L-14-quickgelu``
with random init (``image_pretrained=""``). Memory and parameter counts do not depend on the
weights' values.

Every measure runs in its own fresh interpreter (``--measure NAME``):
  ckpt     write the random HuBERT-Large checkpoint (its build peak stays out of the others)
  params   trainable / total parameter counts per part; checkpoint bytes (len of torch.save output)
           of the model's state_dict (frozen upstreams excluded) vs the full one
  forward  no-grad forward of the frozen encoders only (HuBERT all states + CLIP pooled/patches)
  step     one training step of a METHOD (--method): set_num_updates (the momentum model's EMA),
           model.train(), cmd_contrastive forward, backward
             sic      contrastive only (cmd_weight 0)
             cmd      SIC + CMD (cmd_weight 1, all pairs): the CMD paper
             c2f      coarse-to-fine: momentum model, queue of --queue-size entries (pre-filled),
                      distillation 0.4, SIM on a 2-layer multimodal encoder (the flickr8k c2f group's sizes)
             c2f_cmd  c2f + CMD
             c2f_fast c2f with a 1-layer multimodal encoder on speech frames averaged 4 at a time
                      (model.multimodal_layers=1, model.multimodal_frame_pool=4)
             c2f_lite c2f with SIM on 16 learned speech query tokens and 4 x 4-averaged patches
                      (model.multimodal_speech_tokens=16, model.multimodal_patch_pool=4)
  paired   wall time only, in ONE process: the no-grad frozen forward and the METHOD's step,
           alternated --repeats times (fastest of each): load changes on a shared machine hit both
  rerank   re-ranking cost per query: the matching head on the K pairs of one speech query (its
           sequence x K images' tokens, --rerank-ks), against SIC scoring of one query (its
           embedding against --rerank-images image embeddings + top-K) and the query's encoding

For forward and step: the model is built, one warm-up call of the same measure is made (grads
then dropped, as fairseq's zero_grad does), the peak-RSS mark is reset to the current RSS
(/proc/self/clear_refs, see benchmarks/common.py), and the measured call follows (``--repeats N``:
N calls, the fastest time and the largest peak are reported). Reported:
RSS before the call ("baseline": interpreter + weights + warm caches), ru_maxrss after it
(absolute peak), and the increment = peak - baseline. ``--no-warmup`` measures the first call.
Subprocesses run with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ = 128 KiB so that freed
memory leaves RSS (glibc otherwise keeps it: a warm-up's freed blocks then sit in the baseline
and the measured call reuses them); ``--keep-malloc`` turns that off.

Usage:
  python benchmarks/bench_memory.py                  # batch 2 x 5 s audio + 2 images 224 px, step of cmd
  python benchmarks/bench_memory.py --batch-size 4 --seconds 8
  python benchmarks/bench_memory.py --skip-params --methods sic cmd c2f c2f_cmd --rerank   # the C2F figures
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


METHODS = ("sic", "cmd", "c2f", "c2f_cmd", "c2f_fast", "c2f_lite")
C2F_FAST = dict(multimodal_layers=1, multimodal_frame_pool=4)
# SIM on 16 learned speech query tokens and the patch grid averaged 4 x 4 (model.multimodal_speech_tokens,
# model.multimodal_patch_pool)
C2F_LITE = dict(multimodal_speech_tokens=16, multimodal_patch_pool=4)
# flickr8k's C2F model sizes (examples/flickr8k/config.yaml with method=c2f), on the CMD paper's ViT-L/14
C2F_MODEL = dict(
    c2f_momentum=True,
    momentum=0.995,
    multimodal_layers=2,
    multimodal_heads=8,
    multimodal_ffn_dim=4096,
    multimodal_dropout=0.1,
)


def build(hubert_path, method="cmd", queue_size=16384):
    from cmd_plugin.models.cmd_speech_image import CmdSpeechImageConfig, CmdSpeechImageModel

    extra = dict(C2F_MODEL, queue_size=queue_size) if method.startswith("c2f") else {}
    extra["cmd_fusion"] = method in ("cmd", "c2f_cmd")  # the CMD fusion encoder is built for CMD only
    if method == "c2f_fast":
        extra.update(C2F_FAST)
    if method == "c2f_lite":
        extra.update(C2F_LITE)
    cfg = CmdSpeechImageConfig(hubert_path=hubert_path, image_model=IMAGE_MODEL, image_pretrained="", **extra)
    return CmdSpeechImageModel.build_model(cfg)


def build_criterion(method):
    from cmd_plugin.criterions.cmd_contrastive import CmdContrastiveConfig, CmdContrastiveCriterion

    weights = {
        "sic": dict(cmd_weight=0.0),
        "cmd": dict(cmd_weight=1.0),
        "c2f": dict(cmd_weight=0.0, sim_weight=1.0, distill_alpha=0.4, distill_ramp_updates=0),
        "c2f_cmd": dict(cmd_weight=1.0, sim_weight=1.0, distill_alpha=0.4, distill_ramp_updates=0),
    }
    weights["c2f_fast"] = weights["c2f_lite"] = weights["c2f"]
    weights = weights[method]
    return CmdContrastiveCriterion(
        CmdContrastiveConfig(cmd_pairs="all", global_batch_negatives=False, noise_seed=1, **weights), task=None
    )


def fill_queue(model, seed=0):
    """A full queue of random unit vectors (other images than the batch's): the SIC cost of a full queue."""
    import torch

    if getattr(model, "queue", None) is None:
        return
    gen = torch.Generator().manual_seed(seed)
    q = model.queue
    emb = torch.nn.functional.normalize(torch.randn(q.size, q.speech.size(1), generator=gen), dim=-1)
    keys = torch.stack([torch.zeros(q.size, dtype=torch.long), 10_000 + torch.arange(q.size)], dim=1)
    q.enqueue(emb, emb.roll(1, 0), keys)


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
    from cmd_demo.tiny_encoders import make_hubert_checkpoint

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
    frozen_with_grad = [
        n for n, p in model.named_parameters() if p.requires_grad and n.startswith(("hubert.", "image_encoder."))
    ]

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


def _run_step(model, criterion, sample, counter=[0]):  # noqa: B006 (the update count across calls)
    counter[0] += 1
    model.set_num_updates(counter[0])  # fairseq: before each step's forward; the momentum EMA runs here
    criterion.set_update_num(counter[0])
    model.train()
    loss, sample_size, logs = criterion(model, sample)
    loss.backward()
    return {"loss": float(loss), "sample_size": int(sample_size)}


def measure_forward_or_step(args):
    import torch

    import cmd_plugin.models.cmd_speech_image  # noqa: F401  (fairseq, open_clip imports)

    rss_after_imports = current_rss_bytes()
    t0 = time.perf_counter()
    model = build(args.hubert_path, args.method if args.measure == "step" else "cmd", args.queue_size)
    build_s = time.perf_counter() - t0
    sample = make_sample(args.batch_size, args.seconds, args.image_size)
    criterion = None
    if args.measure == "step":
        criterion = build_criterion(args.method)
        fill_queue(model)
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
    times = []
    for i in range(max(1, args.repeats)):  # min over repeats: the machine is shared, other jobs only add
        if i:
            model.zero_grad(set_to_none=True)
            gc.collect()
        t0 = time.perf_counter()
        info = run()
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    peak = peak_rss_bytes()  # the largest of the repeats (the mark was reset before the first)
    hwm = hwm_bytes()

    result = {
        "measure": args.measure,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "seconds": seconds,
        "seconds_all": times,
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
        result["method"] = args.method
        result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result["checkpoint_bytes"] = saved_bytes({"model": model.state_dict()})
        with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
        result["params_with_grad"] = len(with_grad)
        result["frozen_params_with_grad"] = [n for n in with_grad if n.startswith(("hubert.", "image_encoder."))]
        result["trainable_tensors"] = sum(1 for p in model.parameters() if p.requires_grad)
        result["layer_weights_grad_norm"] = float(model.layer_weights.grad.norm())
        result["grad_bytes"] = sum(
            p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
        )
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


def measure_paired(args):
    """Frozen forward and a method's training step timed alternately in one process (see docstring)."""
    import torch

    model = build(args.hubert_path, args.method, args.queue_size)
    criterion = build_criterion(args.method)
    fill_queue(model)
    sample = make_sample(args.batch_size, args.seconds, args.image_size)
    forward_times, step_times = [], []
    for i in range(1 + max(1, args.repeats)):  # the first round is the warm-up
        model.eval()
        t0 = time.perf_counter()
        _run_forward(model, sample)
        forward_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _run_step(model, criterion, sample)
        step_s = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        gc.collect()
        if i:
            forward_times.append(forward_s)
            step_times.append(step_s)
    return {
        "method": args.method,
        "forward_all": forward_times,
        "step_all": step_times,
        "forward": min(forward_times),
        "step": min(step_times),
        "threads": torch.get_num_threads(),
    }


def measure_rerank(args):
    """Per-query cost of re-ranking vs SIC scoring (see the module docstring)."""
    import torch

    from cmd_plugin.retrieval.rerank import SequencePairScorer, sic_topk

    model = build(args.hubert_path, args.method if args.method.startswith("c2f") else "c2f", queue_size=1).eval()
    gen = torch.Generator().manual_seed(0)
    pool = model.cfg.multimodal_frame_pool
    frames_per_utt = -(-frames(int(args.seconds * SAMPLE_RATE)) // pool)
    dim, embed = model.hubert.embed_dim, model.image_encoder.embed_dim
    num_patches = model.image_encoder.num_patches
    max_k = max(args.rerank_ks)
    raw = torch.randn(1, 1 + frames_per_utt, dim, generator=gen)
    tokens = torch.randn(max_k, 1 + num_patches, embed, generator=gen).half()
    out = {"frames": 1 + frames_per_utt, "num_patches": num_patches, "rerank": {}}
    with torch.no_grad():
        # the query's SIM input: every frame, or its summary tokens (once per query: timed with each K)
        summary = model.multimodal.summary
        t0 = time.perf_counter()
        seq = raw if summary is None else summary(raw, None)[0]
        out["summary_per_query"] = time.perf_counter() - t0
        sequences = [seq[0].half()]
        scorer = SequencePairScorer(model, sequences, tokens)
        for k in args.rerank_ks:
            u, j = torch.zeros(k, dtype=torch.long), torch.arange(k)
            batches = [(u[i : i + args.pair_batch], j[i : i + args.pair_batch]) for i in range(0, k, args.pair_batch)]
            for a, b in batches[:1]:  # warm-up
                scorer(a, b)
            t0 = time.perf_counter()
            for a, b in batches:
                scorer(a, b)
            out["rerank"][str(k)] = time.perf_counter() - t0 + out["summary_per_query"]
        # SIC scoring of one query: embedding vs every image embedding, top-K (timed over many queries)
        num_queries = 1000
        speech = torch.nn.functional.normalize(torch.randn(num_queries, embed, generator=gen), dim=-1)
        images = torch.nn.functional.normalize(torch.randn(args.rerank_images, embed, generator=gen), dim=-1)
        sic_topk(speech[:10], images, max_k)
        t0 = time.perf_counter()
        sic_topk(speech, images, max_k)
        out["sic_per_query"] = (time.perf_counter() - t0) / (2 * num_queries)  # sic_topk does both directions
        # encoding one query utterance (HuBERT-Large + speech layer), for scale
        source = 0.1 * torch.randn(1, int(args.seconds * SAMPLE_RATE), generator=gen)
        model.encode_speech(source[:, :16000])
        t0 = time.perf_counter()
        model.encode_speech(source)
        out["encode_per_query"] = time.perf_counter() - t0
    out["threads"] = torch.get_num_threads()
    out["method"] = args.method
    return out


# ----------------------------------------------------------------------------- driver


def spawn(args, measure, hubert_path, method="cmd"):
    argv = [
        os.path.abspath(__file__),
        "--measure",
        measure,
        "--hubert-path",
        hubert_path,
        "--batch-size",
        str(args.batch_size),
        "--seconds",
        str(args.seconds),
        "--image-size",
        str(args.image_size),
        "--method",
        method,
        "--queue-size",
        str(args.queue_size),
        "--rerank-images",
        str(args.rerank_images),
        "--pair-batch",
        str(args.pair_batch),
        "--repeats",
        str(args.repeats),
        "--rerank-ks",
        *[str(k) for k in args.rerank_ks],
    ]
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
    parser.add_argument("--measure", choices=["ckpt", "params", "forward", "step", "paired", "rerank"])
    parser.add_argument("--method", choices=METHODS, default="cmd", help="the step measured by --measure step")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=["cmd"],
        help="training steps to measure, each against the frozen forward (default: cmd)",
    )
    parser.add_argument("--queue-size", type=int, default=16384, help="C2F queue (the flickr8k group's)")
    parser.add_argument("--rerank", action="store_true", help="also measure the re-ranking cost per query")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="also time each method's step against the frozen forward in one process (alternated)",
    )
    parser.add_argument("--rerank-ks", type=int, nargs="+", default=[10, 50, 128])
    parser.add_argument("--rerank-images", type=int, default=1000, help="images SIC scores per query (Flickr8k test)")
    parser.add_argument("--pair-batch", type=int, default=64, help="pairs per matching-head call")
    parser.add_argument("--hubert-path")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measured calls of forward/step after the warm-up: time = the fastest (a shared "
        "machine only adds time), peak = the largest",
    )
    parser.add_argument("--skip-params", action="store_true")
    parser.add_argument(
        "--keep-malloc", action="store_true", help="leave glibc's malloc defaults (freed memory may stay resident)"
    )
    args = parser.parse_args()

    if args.measure:
        fn = {"ckpt": measure_ckpt, "params": measure_params, "rerank": measure_rerank, "paired": measure_paired}.get(
            args.measure, measure_forward_or_step
        )
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
            print(
                f"  {'trainable total':<38s} {p['trainable']:>12,d}  = {p['trainable'] / 1e6:.2f}M "
                f"(paper: 14M; ratio {p['trainable'] / PAPER_TRAINABLE:.3f}); parts sum {p['parts_sum']:,d}"
            )
            print(f"  {'HuBERT-Large (frozen)':<38s} {p['hubert']:>12,d}")
            print(f"  {'CLIP ViT-L/14 image tower (frozen)':<38s} {p['image_encoder']:>12,d}")
            print(f"  {'model total':<38s} {p['total']:>12,d}  = {p['total'] / 1e6:.1f}M (paper: 752M)")
            with_text = p["total"] + p["clip_text_and_rest"]
            print(
                f"  + CLIP text tower/logit scale not built: {p['clip_text_and_rest']:,d} -> "
                f"{with_text / 1e6:.1f}M with the whole CLIP"
            )
            print(f"  frozen parameters with requires_grad: {p['frozen_with_grad'] or 'none'}")
            print("\n== checkpoint size (len of torch.save bytes) ==")
            print(f"  model.state_dict() (frozen upstreams excluded): {mb(p['ckpt_bytes'])}")
            print(f"  + Adam moments (what checkpoint_last adds):     {mb(p['ckpt_with_adam_bytes'])}")
            print(
                f"  full state dict incl. upstreams:                {mb(p['full_ckpt_bytes'])}"
                f"  ({p['full_ckpt_bytes'] / p['ckpt_bytes']:.0f}x)"
            )

        fwd = spawn(args, "forward", hubert_path)
        steps = {method: spawn(args, "step", hubert_path, method) for method in args.methods}
        step = steps.get("cmd", next(iter(steps.values())))
        t = frames(int(args.seconds * SAMPLE_RATE))
        stacked = 25 * args.batch_size * t * 1024 * 4
        print(
            f"\n== memory: batch {args.batch_size} x {args.seconds:g} s audio + {args.batch_size} images "
            f"{args.image_size} px, {step['threads']} threads, warm-up {'off' if args.no_warmup else 'on'}, "
            f"malloc {'defaults' if args.keep_malloc else 'mmap/trim threshold 128 KiB'} =="
        )
        print(
            f"  RSS after imports (torch, fairseq, open_clip): {gb(fwd['rss_after_imports'])}; "
            f"after building the model: {gb(fwd['rss_after_build'])} (fp32 weights: 2.54 GB)"
        )
        for r, label in (
            (fwd, "no-grad forward, frozen encoders only"),
            (step, f"training step (fwd+bwd, {step['method']})"),
        ):
            print(
                f"  {label:<40s}: {r['seconds']:6.1f} s   RSS after build {gb(r['rss_after_build'])}, "
                f"baseline {gb(r['baseline'])}, peak {gb(r['peak'])} (VmHWM {gb(r['vm_hwm'])}), "
                f"increment {mb(r['increment'])}  [peak reset ok: {r['peak_reset_ok']}]"
            )
        print(
            f"  step/forward: absolute peak {step['peak'] / fwd['peak']:.3f}x, "
            f"increment {step['increment'] / max(fwd['increment'], 1):.2f}x   (target <= 1.3x)"
        )
        print(f"  step/forward wall time: {step['seconds'] / fwd['seconds']:.2f}x")
        print(
            f"  HuBERT states {fwd['states_shape']}: stacked 25 x B x T' x 1024 fp32 = {mb(stacked)} (T' = {t} frames)"
        )
        if "saved_bytes" in step:
            print(
                f"  autograd keeps {mb(step['saved_bytes'])} in {step['saved_tensors']} storages for backward "
                f"(largest: "
                + ", ".join(f"{mb(n)} {shape}" for n, shape in step["saved_largest"][:3])
                + f"); gradients {mb(step['grad_bytes'])}"
            )
        print(
            f"  gradients reached {step['params_with_grad']} of {step['trainable_tensors']} trainable tensors; "
            f"frozen upstream tensors with a gradient: {step['frozen_params_with_grad'] or 'none'}"
        )
        if len(steps) > 1 or "cmd" not in steps:
            print(
                f"\n== training step per method vs the no-grad frozen forward ({fwd['seconds']:.1f} s, peak "
                f"{gb(fwd['peak'])}, increment {mb(fwd['increment'])}); target <= 1.3x in time =="
            )
            print(
                f"  {'method':<8s} {'step s':>7s} {'time':>6s} {'peak':>9s} {'peak':>7s} {'increment':>10s} "
                f"{'trainable':>11s} {'checkpoint':>11s}"
            )
            for method, r in steps.items():
                print(
                    f"  {method:<8s} {r['seconds']:7.1f} {r['seconds'] / fwd['seconds']:5.2f}x {gb(r['peak']):>9s} "
                    f"{r['peak'] / fwd['peak']:6.3f}x {mb(r['increment']):>10s} {r['trainable_params'] / 1e6:10.2f}M "
                    f"{mb(r['checkpoint_bytes']):>11s}"
                )
        paired = {}
        if args.paired:
            print(
                f"\n== wall time, frozen forward and step alternated in one process, fastest of {args.repeats} "
                "(target <= 1.3x) =="
            )
            for method in args.methods:
                paired[method] = r = spawn(args, "paired", hubert_path, method)
                print(
                    f"  {method:<8s} forward {r['forward']:6.1f} s  step {r['step']:6.1f} s  "
                    f"step/forward {r['step'] / r['forward']:5.2f}x   (all: forward "
                    + ", ".join(f"{x:.1f}" for x in r["forward_all"])
                    + "; step "
                    + ", ".join(f"{x:.1f}" for x in r["step_all"])
                    + ")"
                )
        rr = {}
        for rerank_method in (
            (["c2f"] + [m for m in ("c2f_fast", "c2f_lite") if m in args.methods]) if args.rerank else []
        ):
            rr[rerank_method] = r = spawn(args, "rerank", hubert_path, rerank_method)
            print(
                f"\n== re-ranking cost per query, {rerank_method} ({r['threads']} threads; one utterance of {args.seconds:g} s = "
                f"{r['frames']} speech tokens x {r['num_patches'] + 1} image tokens per pair; pair batch {args.pair_batch}) =="
            )
            print(
                f"  SIC scoring: {1e3 * r['sic_per_query']:.3f} ms per query ({args.rerank_images} images, top-K); "
                f"encoding the query utterance: {r['encode_per_query']:.2f} s"
            )
            for k, seconds in r["rerank"].items():
                print(
                    f"  re-rank K={k:>3s}: {seconds:7.2f} s per query = {seconds / r['sic_per_query']:9.0f}x SIC scoring, "
                    f"{seconds / r['encode_per_query']:5.2f}x encoding the query"
                )
        print("\n" + json.dumps({"forward": fwd, "steps": steps, "paired": paired, "rerank": rr}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
