#!/usr/bin/env python
"""Spoken image search with a trained cmd_speech_image checkpoint: index a folder, query by voice.

    python examples/search.py index --checkpoint CK --images DIR [--out INDEX]
    python examples/search.py query --index INDEX --checkpoint CK AUDIO... [--top-k 10] [--json] [--html OUT.html]

index: embeds every jpg/jpeg/png/webp under DIR (recursively) once and writes the index
(default DIR/.cmd_plugin_search_index.pt). Run again on a changed folder, it embeds only new
or modified files (path, size and mtime) and drops deleted ones; unreadable images are named and
skipped. The file is replaced atomically; a long first run also saves its progress every
--save-every-minutes, so an interrupted run resumes where it stopped.

query: embeds each AUDIO (any rate/channels soundfile reads) and prints the top-k images with
their cosine similarity; --json prints one JSON document instead; --html writes one
self-contained page (audio players, transcripts from --transcripts, thumbnails).

An index records the identity of the image encoder that made it (weights, config,
preprocessing) and is refused by a checkpoint with another one. Search is exact (blocked
matrix products, bounded memory) unless the index holds an approximate FAISS index (built with
--approximate always, or automatically from --approximate-min-images images), whose candidates
are re-scored exactly; --exact forces exact search.
"""

import argparse
import json
import logging
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run from any directory without installing the package
    sys.path.insert(0, REPO_ROOT)

from cmd_plugin.search_index import (  # noqa: E402
    ApproximateIndexConfig,
    SearchIndexError,
    check_identity,
    load_index,
    merged_index,
    plan_update,
    save_index,
    scan_images,
    search,
    update_approximate,
)

logger = logging.getLogger("search")
DEFAULT_INDEX_NAME = ".cmd_plugin_search_index.pt"


def _add_model_options(p):
    p.add_argument("--checkpoint", required=True, help="trained cmd_speech_image checkpoint")
    p.add_argument("--hubert-path", help="new location of the HuBERT checkpoint named by the checkpoint")
    p.add_argument("--image-pretrained", help="new location of the image encoder weights")
    p.add_argument("--image-model-config", help="new location of the open_clip model JSON")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--fp16", action="store_true", help="encode under float16 autocast (CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = ApproximateIndexConfig()
    help_of = {f.name: f.metadata["help"] for f in ApproximateIndexConfig.__dataclass_fields__.values()}

    p = sub.add_parser("index", help="embed a folder of images into an index (incrementally)")
    _add_model_options(p)
    p.add_argument("--images", required=True, help="folder of images (jpg/jpeg/png/webp, searched recursively)")
    p.add_argument("--out", help=f"index file to write or update (default: IMAGES/{DEFAULT_INDEX_NAME})")
    p.add_argument("--rebuild", action="store_true",
                   help="ignore an existing --out (another model's, or unreadable) and embed everything")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes (default: 0)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage of the embeddings: float32 (default) or float16 (half the memory and file "
                        "size, but exact search is ~3x slower on a CPU: see benchmarks/bench_search.py)")
    p.add_argument("--save-every-minutes", type=float, default=10.0,
                   help="save progress this often during a long run (0 = only at the end; default: 10)")
    p.add_argument("--approximate", choices=("auto", "always", "never"), default=defaults.mode, help=help_of["mode"])
    p.add_argument("--approximate-min-images", type=int, default=defaults.min_images, help=help_of["min_images"])
    p.add_argument("--nlist", type=int, default=defaults.nlist, help=help_of["nlist"])
    p.add_argument("--nprobe", type=int, default=defaults.nprobe, help=help_of["nprobe"])
    p.add_argument("--ann-encoding", choices=("Flat", "SQfp16", "SQ8"), default=defaults.encoding,
                   help=help_of["encoding"])

    q = sub.add_parser("query", help="search an index with spoken queries")
    _add_model_options(q)
    q.add_argument("--index", required=True, help="index file written by the index command")
    q.add_argument("audio", nargs="+", metavar="AUDIO", help="spoken queries (wav, flac, ogg, mp3, ...)")
    q.add_argument("--top-k", type=int, default=10, help="images per query (default: 10)")
    q.add_argument("--json", action="store_true", help="print results as one JSON document")
    q.add_argument("--html", help="write a self-contained results page here")
    q.add_argument("--transcripts", help="text file with one transcript per AUDIO, in order (shown on the page)")
    q.add_argument("--exact", action="store_true", help="exact search even when the index has an approximate one")
    q.add_argument("--nprobe", type=int, help="cells the approximate index visits (default: the index's)")
    q.add_argument("--long-audio", choices=("windows", "error"), default="windows",
                   help="queries longer than the model's limit: embed in equal windows and average "
                        "(default), or refuse them")
    q.add_argument("--batch-size", type=int, default=8, help="queries per batch (default: 8)")
    return parser


def _load_encoder(args, long_audio="windows"):
    from cmd_plugin.inference import SpeechImageEncoder

    return SpeechImageEncoder.from_checkpoint(
        args.checkpoint, device=args.device, fp16=args.fp16, hubert_path=args.hubert_path,
        image_pretrained=args.image_pretrained, image_model_config=args.image_model_config, long_audio=long_audio)


def _identity_words():
    from cmd_plugin.inference import IDENTITY_WORDS

    return IDENTITY_WORDS


# ---------------------------------------------------------------- index


def run_index(args) -> dict:
    from cmd_plugin.evaluate import resolve_device

    if args.batch_size < 1 or args.num_workers < 0:
        raise SearchIndexError("--batch-size must be positive and --num-workers >= 0")
    cfg = ApproximateIndexConfig(mode=args.approximate, min_images=args.approximate_min_images,
                                 nlist=args.nlist, nprobe=args.nprobe, encoding=args.ann_encoding)
    images = os.path.abspath(args.images)
    out = os.path.abspath(args.out or os.path.join(images, DEFAULT_INDEX_NAME))
    started = time.time()
    files = scan_images(images)
    if not files:
        raise SearchIndexError(f"{images}: no images found (expected .jpg, .jpeg, .png or .webp files under it)")
    old = None
    if os.path.exists(out) and not args.rebuild:
        try:
            old = load_index(out)
        except SearchIndexError as err:
            raise SearchIndexError(f"{err} (left as it is: pass --rebuild to replace it, or another --out)") from None
    resolve_device(args.device, args.fp16)
    encoder = _load_encoder(args)
    if old is not None:
        try:
            check_identity(old, encoder.identity, _identity_words())
        except SearchIndexError as err:
            raise SearchIndexError(f"{err}; or pass --rebuild to replace it") from None
        if old.root != images:
            logger.info(f"{out}: images root moved from {old.root} to {images}; matching files by relative path")

    plan = plan_update(old, files)
    logger.info(f"{len(files)} images under {images}: {len(plan.keep_rows)} unchanged, "
                f"{len(plan.to_embed) - len(plan.modified)} new, {len(plan.modified)} modified, "
                f"{len(plan.removed) - len(plan.modified)} removed")

    # progress saves: the old index's unchanged rows plus what has been embedded so far
    done_positions, done_chunks = [], []
    last_save = [time.time()]

    def on_batch(positions, emb):
        done_positions.extend(positions)
        done_chunks.append(emb)
        if args.save_every_minutes > 0 and time.time() - last_save[0] > 60 * args.save_every_minutes:
            import torch

            partial = merged_index(old, plan, [plan.to_embed[p] for p in done_positions], torch.cat(done_chunks),
                                   images, encoder.identity, dtype=args.dtype)
            partial.approximate = None  # built once, at the end
            partial.meta.update(partial=True)
            save_index(partial, out)
            logger.info(f"progress saved to {out} ({len(done_positions)} of {len(plan.to_embed)} images embedded)")
            last_save[0] = time.time()

    to_embed_paths = [os.path.join(images, *f.path.split("/")) for f in plan.to_embed]
    emb, positions, failures = encoder.embed_image_files(
        to_embed_paths, batch_size=args.batch_size, num_workers=args.num_workers,
        progress=not args.no_progress, on_batch=on_batch)
    for path, message in failures:
        print(f"skipped: {message}", file=sys.stderr)
    embedded = [plan.to_embed[p] for p in positions]
    index = merged_index(old, plan, embedded, emb, images, encoder.identity, dtype=args.dtype)
    if len(index) == 0:
        raise SearchIndexError(f"{images}: none of the {len(files)} images could be read "
                               f"({len(failures)} unreadable); nothing written")
    update_approximate(index, old, cfg)
    index.meta.update(
        partial=False,
        checkpoint=os.path.abspath(args.checkpoint),
        updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        created=(old.meta.get("created") if old is not None else None) or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        num_images=len(index),
        last_update={"embedded": len(embedded), "unchanged": len(plan.keep_rows),
                     "removed": len(plan.removed) - len(plan.modified), "modified": len(plan.modified),
                     "unreadable": len(failures), "seconds": round(time.time() - started, 3)},
    )
    save_index(index, out)
    summary = index.meta["last_update"]
    approx = index.approximate["params"]["factory"] if index.approximate else "none (exact search)"
    print(f"indexed {len(index)} images in {out}: {summary['embedded']} embedded, {summary['unchanged']} unchanged, "
          f"{summary['removed']} removed, {summary['unreadable']} unreadable skipped; approximate index: {approx}; "
          f"{summary['seconds']:.1f} s")
    if failures:
        print(f"warning: {len(failures)} unreadable image(s) skipped (listed above)", file=sys.stderr)
    return {"index": out, **summary, "num_images": len(index)}


# ---------------------------------------------------------------- query


def _read_transcripts(path, count):
    if not path:
        return [None] * count
    if not os.path.isfile(path):
        raise SearchIndexError(f"{path}: transcripts file not found")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) != count:
        raise SearchIndexError(f"{path}: {len(lines)} lines, expected {count} (one transcript per AUDIO, in order)")
    return [line.strip() or None for line in lines]


def run_query(args) -> dict:
    from cmd_plugin.evaluate import resolve_device
    from cmd_plugin.inference import InferenceError

    if args.top_k < 1 or args.batch_size < 1:
        raise SearchIndexError("--top-k and --batch-size must be positive")
    index = load_index(args.index)
    if len(index) == 0:
        raise SearchIndexError(f"{args.index}: the index holds no images")
    for path in args.audio:
        if not os.path.isfile(path):
            raise InferenceError(f"{path}: audio file not found")
    transcripts = _read_transcripts(args.transcripts, len(args.audio))
    resolve_device(args.device, args.fp16)
    t0 = time.perf_counter()
    encoder = _load_encoder(args, long_audio=args.long_audio)
    check_identity(index, encoder.identity, _identity_words())
    load_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    waves = [encoder.load_audio(path) for path in args.audio]
    queries = encoder.embed_waveforms(waves, names=list(args.audio), batch_size=args.batch_size)
    embed_seconds = time.perf_counter() - t1
    results = search(index, queries, k=args.top_k, exact=True if args.exact else None, nprobe=args.nprobe)

    record = {
        "index": os.path.abspath(args.index),
        "checkpoint": os.path.abspath(args.checkpoint),
        "num_images": len(index),
        "method": results.method,
        "timing_seconds": {
            "load_model": round(load_seconds, 4),
            "embed_queries": round(embed_seconds, 4),
            "search": round(results.seconds, 6),
            "per_query": round((embed_seconds + results.seconds) / len(args.audio), 4),
        },
        "queries": [],
    }
    for qi, path in enumerate(args.audio):
        record["queries"].append({
            "audio": os.path.abspath(path),
            "duration_seconds": round(waves[qi].numel() / encoder.sample_rate, 3),
            "transcript": transcripts[qi],
            "results": [
                {"rank": rank, "score": round(score, 6), "path": index.paths[row],
                 "absolute_path": index.absolute_path(row)}
                for rank, (row, score) in enumerate(zip(results.rows[qi], results.scores[qi]), start=1)
            ],
        })
    if args.html:
        _write_page(args.html, record, waves, encoder.sample_rate)
        record["html"] = os.path.abspath(args.html)
    if args.json:
        print(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        for q in record["queries"]:
            said = f"  \"{q['transcript']}\"" if q["transcript"] else ""
            print(f"{q['audio']}{said}")
            for r in q["results"]:
                print(f"  {r['rank']:>3}. {r['score']:.4f}  {r['absolute_path']}")
        t = record["timing_seconds"]
        print(f"{len(index)} images, {results.method} search; per query: {1000 * t['per_query']:.1f} ms "
              f"(embedding {1000 * t['embed_queries'] / len(args.audio):.1f} ms, "
              f"search {1000 * t['search'] / len(args.audio):.2f} ms); model load {t['load_model']:.1f} s")
        if args.html:
            print(f"results page: {record['html']}")
    return record


def _write_page(path, record, waves, sample_rate):
    from cmd_plugin.files import atomic_write
    from cmd_plugin.search_page import PageQuery, PageResult, render_page

    queries = [
        PageQuery(name=os.path.basename(q["audio"]), waveform=waves[i].numpy(), sample_rate=sample_rate,
                  transcript=q["transcript"],
                  results=[PageResult(r["rank"], r["score"], r["path"], r["absolute_path"]) for r in q["results"]])
        for i, q in enumerate(record["queries"])
    ]
    subtitle = f"{record['num_images']} images in {record['index']}; {record['method']} search"
    page = render_page(queries, subtitle=subtitle)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)

    atomic_write(path, write)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it picked
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "index":
            run_index(args)
        else:
            run_query(args)
    except (FileNotFoundError, ValueError) as err:  # SearchIndexError, InferenceError, EvaluationError
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
