#!/usr/bin/env python
"""Spoken search with a trained cmd_speech_image checkpoint: speech -> images and image -> speech.

    python examples/search.py index --checkpoint CK --images DIR [--out INDEX]
    python examples/search.py index-audio --checkpoint CK --audio DIR [--out INDEX]
    python examples/search.py query --index INDEX --checkpoint CK QUERY... [--top-k 10] [--rerank-k K]
                                    [--json] [--html OUT.html]
    python examples/search.py serve --index INDEX [--index AUDIO_INDEX] --checkpoint CK [--port 7860]

index: embeds every jpg/jpeg/png/webp under DIR (recursively) once and writes the index
(default DIR/.cmd_plugin_search_index.pt). Run again on a changed folder, it embeds only new
or modified files (path, size and mtime) and drops deleted ones; unreadable images are named and
skipped. The file is replaced atomically; a long first run also saves its progress every
--save-every-minutes, so an interrupted run resumes where it stopped.

index-audio: the same for spoken clips (wav/flac/ogg/opus/mp3 under DIR, default
DIR/.cmd_plugin_audio_index.pt), embedded by the checkpoint's speech side (S_cls; clips longer
than the model's limit in equal windows, averaged): the index that image queries search.

query: QUERY files are spoken clips (any rate/channels soundfile reads) for an index of images,
images for an index of spoken clips. Prints the top-k with their cosine similarity; --rerank-k K
re-scores the top K with the matching head of a coarse-to-fine checkpoint (--rerank-score);
--json prints one JSON document instead; --html writes one self-contained page (players,
transcripts from --transcripts, thumbnails; the paired image marked when the transcripts file
names it: "TRANSCRIPT<TAB>IMAGE_PATH" lines).

serve: a local web app (Gradio) on 127.0.0.1: record from the microphone or upload a clip and
see the ranked images; upload an image and hear the ranked clips (with --index of spoken clips);
re-rank with the matching head; the time of each step shown. The model and indexes are loaded
once and only read.

An index records the identity of the encoder that made it (image index: the image encoder's
weights, config and preprocessing; clip index: the speech side's weights) and is refused by a
checkpoint with another one. Search is exact (blocked matrix products, bounded memory) unless the
index holds an approximate FAISS index (built with --approximate always, or automatically from
--approximate-min-images rows), whose candidates are re-scored exactly; --exact forces exact search.
"""

import argparse
import json
import logging
import os
import sys
import time

import torch
from tqdm import tqdm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run from any directory without installing the package
    sys.path.insert(0, REPO_ROOT)

from cmd_plugin.files import atomic_write_text  # noqa: E402
from cmd_plugin.inference import (  # noqa: E402
    IDENTITY_WORDS,
    InferenceError,
    SpeechImageEncoder,
    check_audible,
    load_image,
)
from cmd_plugin.loading import add_loading_options, resolve_device, upstream_paths  # noqa: E402
from cmd_plugin.retrieval.rerank import RERANK_SCORES  # noqa: E402
from cmd_plugin.search.index import (  # noqa: E402
    ApproximateIndexConfig,
    SearchIndexError,
    check_identity,
    load_index,
    merged_index,
    plan_update,
    save_index,
    scan_images,
    update_approximate,
)
from cmd_plugin.search.page import PageQuery, PageResult, explanation_view, render_page  # noqa: E402
from cmd_plugin.search.service import SearchService  # noqa: E402

logger = logging.getLogger("search")
DEFAULT_INDEX_NAME = ".cmd_plugin_search_index.pt"
DEFAULT_AUDIO_INDEX_NAME = ".cmd_plugin_audio_index.pt"


def _add_model_options(p):
    p.add_argument("--checkpoint", required=True, help="trained cmd_speech_image checkpoint")
    add_loading_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_index_options(p, modality, defaults, help_of):
    what, folder, name = (
        ("images", "--images", DEFAULT_INDEX_NAME)
        if modality == "image"
        else ("spoken clips", "--audio", DEFAULT_AUDIO_INDEX_NAME)
    )
    _add_model_options(p)
    if modality == "image":
        p.add_argument("--images", required=True, help="folder of images (jpg/jpeg/png/webp, searched recursively)")
    else:
        p.add_argument(
            "--audio", required=True, help="folder of spoken clips (wav/flac/ogg/opus/mp3, searched recursively)"
        )
    p.add_argument("--out", help=f"index file to write or update (default: {folder[2:].upper()}/{name})")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="ignore an existing --out (another model's, or unreadable) and embed everything",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32 if modality == "image" else 8,
        help=f"{what} per batch (default: {32 if modality == 'image' else 8})",
    )
    if modality == "image":
        p.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes (default: 0)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="storage of the embeddings: float32 (default) or float16 (half the memory and file "
        "size, but exact search is ~3x slower on a CPU: see benchmarks/bench_search.py)",
    )
    p.add_argument(
        "--save-every-minutes",
        type=float,
        default=10.0,
        help="save progress this often during a long run (0 = only at the end; default: 10)",
    )
    p.add_argument("--approximate", choices=("auto", "always", "never"), default=defaults.mode, help=help_of["mode"])
    p.add_argument("--approximate-min-images", type=int, default=defaults.min_images, help=help_of["min_images"])
    p.add_argument("--nlist", type=int, default=defaults.nlist, help=help_of["nlist"])
    p.add_argument("--nprobe", type=int, default=defaults.nprobe, help=help_of["nprobe"])
    p.add_argument(
        "--ann-encoding", choices=("Flat", "SQfp16", "SQ8"), default=defaults.encoding, help=help_of["encoding"]
    )


def _add_search_options(q):
    q.add_argument("--top-k", type=int, default=10, help="results per query (default: 10)")
    q.add_argument(
        "--rerank-k",
        type=int,
        default=0,
        help="re-score the top K with the matching head of a coarse-to-fine checkpoint (0 = off, "
        "the default; a checkpoint without the head is refused)",
    )
    q.add_argument(
        "--rerank-score",
        choices=RERANK_SCORES,
        default=None,
        help="re-ranking score: sim = the match logit (ALBEF), sim+sic = match logit + cosine (BLIP); "
        "default: the checkpoint's task.valid_rerank_score",
    )
    q.add_argument("--exact", action="store_true", help="exact search even when the index has an approximate one")
    q.add_argument("--nprobe", type=int, help="cells the approximate index visits (default: the index's)")
    q.add_argument(
        "--long-audio",
        choices=("windows", "error"),
        default="windows",
        help="spoken queries longer than the model's limit: embed in equal windows and average "
        "(default), or refuse them",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = ApproximateIndexConfig()
    help_of = {f.name: f.metadata["help"] for f in ApproximateIndexConfig.__dataclass_fields__.values()}

    p = sub.add_parser("index", help="embed a folder of images into an index (incrementally)")
    _add_index_options(p, "image", defaults, help_of)
    p = sub.add_parser("index-audio", help="embed a folder of spoken clips into an index (incrementally)")
    _add_index_options(p, "audio", defaults, help_of)

    q = sub.add_parser("query", help="search an index: spoken queries for images, image queries for clips")
    _add_model_options(q)
    q.add_argument("--index", required=True, help="index file written by the index or index-audio command")
    q.add_argument(
        "queries",
        nargs="+",
        metavar="QUERY",
        help="spoken queries (wav, flac, ogg, mp3, ...) for an index of images; "
        "images (jpg, png, webp) for an index of spoken clips",
    )
    _add_search_options(q)
    q.add_argument("--json", action="store_true", help="print results as one JSON document")
    q.add_argument("--html", help="write a self-contained results page here")
    q.add_argument(
        "--explain",
        type=int,
        default=3,
        metavar="K",
        help="with --html, show for each spoken query where it lands on each of its top K images (the "
        "cosine of its embedding with each patch's value-path token, the map that pointed best; see "
        "docs/grounding.md) and which part of the query drove it; 0: off (default: 3)",
    )
    q.add_argument(
        "--transcripts",
        help="text file, one line per spoken QUERY in order: its transcript, optionally followed by "
        "a tab and its paired image's path (relative to the indexed folder), which the page marks",
    )
    q.add_argument("--batch-size", type=int, default=8, help="queries per batch (default: 8)")

    s = sub.add_parser("serve", help="a local web app: speak (or upload) to search, image -> clips, re-ranking")
    _add_model_options(s)
    s.add_argument(
        "--index",
        required=True,
        action="append",
        help="index written by index (images) or index-audio (spoken clips); give it twice for both",
    )
    _add_search_options(s)
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the "
        "network: anyone who reaches the port can search your files)",
    )
    s.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    s.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="searches run at once (threads sharing the one model; default: 4); more wait in a queue",
    )
    s.add_argument(
        "--max-query-seconds",
        type=float,
        default=60.0,
        help="longest spoken query accepted (default: 60 s; longer than the model's limit is embedded "
        "in windows unless --long-audio error)",
    )
    s.add_argument("--max-upload-mb", type=float, default=50.0, help="largest file accepted (default: 50 MB)")
    s.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch's intra-op CPU threads (default 0: CPUs / --concurrency, at least 1: concurrent "
        "searches then share the cores instead of oversubscribing them)",
    )
    return parser


def _load_encoder(args, long_audio="windows", keep_matching=False):
    return SpeechImageEncoder.from_checkpoint(
        args.checkpoint,
        device=args.device,
        fp16=args.fp16,
        long_audio=long_audio,
        keep_matching=keep_matching,
        **upstream_paths(args),
    )


# ---------------------------------------------------------------- index


def run_index(args, modality="image") -> dict:
    audio = modality == "audio"
    what = "spoken clips" if audio else "images"
    if args.batch_size < 1 or getattr(args, "num_workers", 0) < 0:
        raise SearchIndexError("--batch-size must be positive and --num-workers >= 0")
    cfg = ApproximateIndexConfig(
        mode=args.approximate,
        min_images=args.approximate_min_images,
        nlist=args.nlist,
        nprobe=args.nprobe,
        encoding=args.ann_encoding,
    )
    folder = os.path.abspath(args.audio if audio else args.images)
    out = os.path.abspath(args.out or os.path.join(folder, DEFAULT_AUDIO_INDEX_NAME if audio else DEFAULT_INDEX_NAME))
    started = time.time()
    files = scan_images(folder, modality)
    if not files:
        expected = ".wav, .flac, .ogg, .opus or .mp3" if audio else ".jpg, .jpeg, .png or .webp"
        raise SearchIndexError(f"{folder}: no {what} found (expected {expected} files under it)")
    old = None
    if os.path.exists(out) and not args.rebuild:
        try:
            old = load_index(out)
        except SearchIndexError as err:
            raise SearchIndexError(f"{err} (left as it is: pass --rebuild to replace it, or another --out)") from None
        if old.modality != modality:
            raise SearchIndexError(
                f"{out}: an index of {old.what}, this command writes one of {what} (left as it is: give another --out)"
            )
    resolve_device(args.device, args.fp16)
    encoder = _load_encoder(args)
    identity = encoder.speech_identity if audio else encoder.identity
    if old is not None:
        try:
            check_identity(old, identity, IDENTITY_WORDS)
        except SearchIndexError as err:
            raise SearchIndexError(f"{err}; or pass --rebuild to replace it") from None
        if old.root != folder:
            logger.info(f"{out}: root moved from {old.root} to {folder}; matching files by relative path")

    plan = plan_update(old, files)
    logger.info(
        f"{len(files)} {what} under {folder}: {len(plan.keep_rows)} unchanged, "
        f"{len(plan.to_embed) - len(plan.modified)} new, {len(plan.modified)} modified, "
        f"{len(plan.removed) - len(plan.modified)} removed"
    )

    # progress saves: the old index's unchanged rows plus what has been embedded so far
    done_positions, done_chunks = [], []
    last_save = [time.time()]

    def on_batch(positions, emb):
        done_positions.extend(positions)
        done_chunks.append(emb)
        if args.save_every_minutes > 0 and time.time() - last_save[0] > 60 * args.save_every_minutes:
            partial = merged_index(
                old,
                plan,
                [plan.to_embed[p] for p in done_positions],
                torch.cat(done_chunks),
                folder,
                identity,
                dtype=args.dtype,
                modality=modality,
            )
            partial.approximate = None  # built once, at the end
            partial.meta.update(partial=True)
            save_index(partial, out)
            logger.info(f"progress saved to {out} ({len(done_positions)} of {len(plan.to_embed)} {what} embedded)")
            last_save[0] = time.time()

    to_embed_paths = [os.path.join(folder, *f.path.split("/")) for f in plan.to_embed]
    if audio:
        emb, positions, failures = _embed_clip_files(
            encoder, to_embed_paths, args.batch_size, not args.no_progress, on_batch
        )
    else:
        emb, positions, failures = encoder.embed_image_files(
            to_embed_paths,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            progress=not args.no_progress,
            on_batch=on_batch,
        )
    for path, message in failures:
        print(f"skipped: {message}", file=sys.stderr)
    embedded = [plan.to_embed[p] for p in positions]
    index = merged_index(old, plan, embedded, emb, folder, identity, dtype=args.dtype, modality=modality)
    if len(index) == 0:
        raise SearchIndexError(
            f"{folder}: none of the {len(files)} {what} could be read ({len(failures)} unreadable); nothing written"
        )
    update_approximate(index, old, cfg)
    index.meta.update(
        partial=False,
        checkpoint=os.path.abspath(args.checkpoint),
        updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        created=(old.meta.get("created") if old is not None else None) or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        num_images=len(index),
        last_update={
            "embedded": len(embedded),
            "unchanged": len(plan.keep_rows),
            "removed": len(plan.removed) - len(plan.modified),
            "modified": len(plan.modified),
            "unreadable": len(failures),
            "seconds": round(time.time() - started, 3),
        },
    )
    if audio:
        index.meta.update(num_clips=len(index), long_audio="windows")
    save_index(index, out)
    summary = index.meta["last_update"]
    approx = index.approximate["params"]["factory"] if index.approximate else "none (exact search)"
    print(
        f"indexed {len(index)} {what} in {out}: {summary['embedded']} embedded, {summary['unchanged']} unchanged, "
        f"{summary['removed']} removed, {summary['unreadable']} unreadable skipped; approximate index: {approx}; "
        f"{summary['seconds']:.1f} s"
    )
    if failures:
        print(
            f"warning: {len(failures)} unreadable {'clip' if audio else 'image'}(s) skipped (listed above)",
            file=sys.stderr,
        )
    return {"index": out, **summary, "num_rows": len(index)}


def _embed_clip_files(encoder, paths, batch_size, progress, on_batch):
    """Spoken clips -> (embeddings (M, E), positions (M,) of ``paths``, failures [(path, message)]):
    read one batch at a time (unreadable or too short clips named and skipped), longest first."""
    chunks, positions, failures = [], [], []
    with tqdm(total=len(paths), unit="clip", desc="embedding clips", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            waves, names, pos = [], [], []
            for p in range(start, min(start + batch_size, len(paths))):
                try:
                    wave = encoder.load_audio(paths[p])
                    if wave.numel() < encoder.min_samples:
                        encoder.windows(wave, paths[p])  # raises, naming the file and the minimum
                    waves.append(wave)
                    names.append(paths[p])
                    pos.append(p)
                except InferenceError as err:
                    failures.append((paths[p], str(err)))
            if waves:
                emb = encoder.embed_waveforms(waves, names, batch_size=batch_size)
                chunks.append(emb)
                positions.extend(pos)
                on_batch(pos, emb)
            bar.update(min(batch_size, len(paths) - start))
    emb = torch.cat(chunks) if chunks else torch.empty(0, encoder.embed_dim)
    return emb, positions, failures


# ---------------------------------------------------------------- query


def _read_transcripts(path, count, root=None):
    """[(transcript or None, paired image path or None)] for ``count`` queries."""
    if not path:
        return [(None, None)] * count
    if not os.path.isfile(path):
        raise SearchIndexError(f"{path}: transcripts file not found")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) != count:
        raise SearchIndexError(f"{path}: {len(lines)} lines, expected {count} (one transcript per QUERY, in order)")
    out = []
    for number, line in enumerate(lines, start=1):
        text, tab, paired = line.partition("\t")
        paired = paired.strip()
        if tab and "\t" in paired:
            raise SearchIndexError(
                f"{path}:{number}: expected TRANSCRIPT or TRANSCRIPT<TAB>IMAGE_PATH, found {line.count(chr(9))} tabs"
            )
        if paired and root and os.path.isabs(paired):
            relative = os.path.relpath(paired, root)
            paired = relative if not relative.startswith("..") else paired
        out.append((text.strip() or None, paired.replace(os.sep, "/") or None))
    return out


def _service(args, encoder, indexes, max_query_seconds=None):
    by_kind = {}
    for index in indexes:
        if index.modality in by_kind:
            raise SearchIndexError(
                f"{index.source} and {by_kind[index.modality].source} are both indexes of "
                f"{index.what}: give at most one of each kind"
            )
        by_kind[index.modality] = index
    return SearchService(
        encoder,
        image_index=by_kind.get("image"),
        audio_index=by_kind.get("audio"),
        max_query_seconds=max_query_seconds,
        exact=True if args.exact else None,
        nprobe=args.nprobe,
    )


def run_query(args) -> dict:
    if args.top_k < 1 or args.batch_size < 1 or args.rerank_k < 0:
        raise SearchIndexError("--top-k and --batch-size must be positive, --rerank-k >= 0")
    index = load_index(args.index)
    if len(index) == 0:
        raise SearchIndexError(f"{args.index}: the index holds no {index.what}")
    speech = index.modality == "image"  # spoken queries search images; image queries search clips
    for path in args.queries:
        if not os.path.isfile(path):
            raise InferenceError(f"{path}: {'audio' if speech else 'image'} file not found")
    if args.transcripts and not speech:
        raise SearchIndexError(
            f"--transcripts describes spoken queries; {args.index} is an index of spoken clips (its queries are images)"
        )
    transcripts = _read_transcripts(args.transcripts, len(args.queries), index.root)
    resolve_device(args.device, args.fp16)
    t0 = time.perf_counter()
    explain_k = args.explain if (args.html and speech) else 0
    if explain_k < 0:
        raise SearchIndexError(f"--explain must be >= 0, got {args.explain}")
    # the matching head explains a result too (its Grad-CAM, for towers without a value path), re-ranking or not
    encoder = _load_encoder(args, long_audio=args.long_audio, keep_matching=args.rerank_k > 0 or explain_k > 0)
    service = _service(args, encoder, [index])
    service.check_rerank(args.rerank_k, args.rerank_score)
    load_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    if speech:
        waves = [encoder.load_audio(path) for path in args.queries]
        for wave, path in zip(waves, args.queries):
            check_audible(wave, path)
        decoded = time.perf_counter()
        queries, sequences = encoder.embed_waveforms(
            waves, names=list(args.queries), batch_size=args.batch_size, return_sequences=True
        )
        embedded = time.perf_counter()
        answers = service.rank_images(queries, sequences, args.top_k, args.rerank_k, args.rerank_score)
    else:
        waves = None
        pixels = torch.stack([load_image(path, encoder.transform) for path in args.queries])
        decoded = time.perf_counter()
        parts = [
            service.embed_image_queries(pixels[i : i + args.batch_size]) for i in range(0, len(pixels), args.batch_size)
        ]
        queries, tokens = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        embedded = time.perf_counter()
        answers = service.rank_clips(queries, tokens, args.top_k, args.rerank_k, args.rerank_score)
    if explain_k:
        for answer, wave in zip(answers, waves):
            service.explain_hits(answer, explain_k, wave=wave)
    search_seconds = sum(a.timings["search"] for a in answers)
    rerank_seconds = sum(a.timings["rerank"] for a in answers)
    explain_seconds = sum(a.timings.get("explain", 0.0) for a in answers)
    n = len(args.queries)
    record = {
        "index": os.path.abspath(args.index),
        "checkpoint": os.path.abspath(args.checkpoint),
        "modality": index.modality,
        "num_images" if speech else "num_clips": len(index),
        "method": answers[0].method,
        "rerank": answers[0].rerank,
        "timing_seconds": {
            "load_model": round(load_seconds, 4),
            "decode_queries": round(decoded - t1, 4),
            "embed_queries": round(embedded - t1, 4),  # decoding included
            "search": round(search_seconds, 6),
            "rerank": round(rerank_seconds, 4),
            "per_query": round((embedded - t1 + search_seconds + rerank_seconds) / n, 4),
            "explain": round(explain_seconds, 4),  # not in per_query: the page's maps, not the search
        },
        "explained_top": explain_k,
        "queries": [],
    }
    for qi, (path, answer) in enumerate(zip(args.queries, answers)):
        entry = {"audio" if speech else "image": os.path.abspath(path)}
        if speech:
            transcript, paired = transcripts[qi]
            entry.update(duration_seconds=round(waves[qi].numel() / encoder.sample_rate, 3), transcript=transcript)
            if paired is not None:
                entry.update(
                    paired_image=paired, paired_rank=next((h.rank for h in answer.hits if h.path == paired), None)
                )
        entry["results"] = [h.as_dict() for h in answer.hits]
        for r in entry["results"]:
            if r["rank"] in answer.extra.get("explanations", {}):
                r["explanation"] = answer.extra["explanations"][r["rank"]].to_dict()
            elif r["rank"] in answer.extra.get("explain_errors", {}):
                r["explanation_error"] = answer.extra["explain_errors"][r["rank"]]
        record["queries"].append(entry)
    if args.html:
        _write_page(args.html, record, waves, encoder, answers)
        record["html"] = os.path.abspath(args.html)
    if args.json:
        print(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        for q in record["queries"]:
            said = f'  "{q["transcript"]}"' if q.get("transcript") else ""
            print(f"{q.get('audio') or q.get('image')}{said}")
            for r in q["results"]:
                match = f"  (match {r['match']:.3f}, cosine {r['cosine']:.4f})" if r["reranked"] else ""
                print(f"  {r['rank']:>3}. {r['score']:.4f}  {r['absolute_path']}{match}")
            if q.get("paired_image"):
                rank = q["paired_rank"]
                print(
                    f"  paired image {q['paired_image']}: {f'rank {rank}' if rank else f'not in the top {args.top_k}'}"
                )
        t = record["timing_seconds"]
        rerank = ""
        if record["rerank"]:
            rerank = (
                f", re-ranking top {record['rerank']['k']} ({record['rerank']['score']}) "
                f"{1000 * t['rerank'] / n:.1f} ms"
            )
        print(
            f"{len(index)} {index.what}, {record['method']} search; per query: {1000 * t['per_query']:.1f} ms "
            f"(embedding {1000 * t['embed_queries'] / n:.1f} ms, "
            f"search {1000 * t['search'] / n:.2f} ms{rerank}); model load {t['load_model']:.1f} s"
        )
        if explain_k:
            explained = sum(len(a.extra.get("explanations", {})) for a in answers)
            print(
                f"explaining the top {explain_k} of each query for the page: "
                f"{1000 * t['explain'] / max(explained, 1):.1f} ms per result ({explained} results)"
            )
        if args.html:
            print(f"results page: {record['html']}")
    return record


def page_result(r, clip_wave=None, sample_rate=16000, explanation=None):
    """A query record's result -> the page's card (match and cosine shown when re-ranked; the map of
    ``explanation``, a :func:`explanation_view`, when given)."""
    detail = f"match {r['match']:.3f} \u00b7 cosine {r['cosine']:.3f}" if r.get("reranked") else ""
    label = "re-ranked" if r.get("reranked") else "cosine"
    return PageResult(
        r["rank"],
        r["score"],
        r["path"],
        r["absolute_path"],
        detail=detail,
        waveform=clip_wave,
        sample_rate=sample_rate,
        score_label=label,
        explanation=explanation,
    )


def _write_page(path, record, waves, encoder, answers=None):
    queries = []
    for i, q in enumerate(record["queries"]):
        if "audio" in q:
            explained = (answers[i].extra.get("explanations", {}) if answers else {}) or {}
            views = {
                rank: explanation_view(e, r["absolute_path"], waves[i].numpy(), encoder.sample_rate)
                for r in q["results"]
                for rank, e in explained.items()
                if r["rank"] == rank
            }
            queries.append(
                PageQuery(
                    name=os.path.basename(q["audio"]),
                    waveform=waves[i].numpy(),
                    sample_rate=encoder.sample_rate,
                    transcript=q["transcript"],
                    paired=q.get("paired_image"),
                    results=[page_result(r, explanation=views.get(r["rank"])) for r in q["results"]],
                )
            )
        else:
            results = []
            for r in q["results"]:
                try:
                    clip = encoder.load_audio(r["absolute_path"]).numpy()
                except InferenceError:
                    clip = None  # shown as a "cannot read" box
                results.append(page_result(r, clip, encoder.sample_rate))
            queries.append(PageQuery(name=os.path.basename(q["image"]), image_path=q["image"], results=results))
    what = "images" if record["modality"] == "image" else "spoken clips"
    count = record.get("num_images", record.get("num_clips"))
    subtitle = f"{count} {what} in {record['index']}; {record['method']} search"
    if record["rerank"]:
        subtitle += f"; top {record['rerank']['k']} re-ranked by the matching head ({record['rerank']['score']})"
    if record.get("explained_top"):
        subtitle += (
            f"; on the top {record['explained_top']} of each query, where it lands (heatmap) and which part of "
            "the query drove it (the coloured strip under the waveform)"
        )
    title = "Spoken image search" if record["modality"] == "image" else "Image to speech search"
    atomic_write_text(path, render_page(queries, title=title, subtitle=subtitle))


# ---------------------------------------------------------------- serve


def run_serve(args, block=True):
    """Load the model and the indexes once, then serve the web app (examples/search_app.py).
    With ``block=False`` returns (app, url) with the server running in the background."""
    if args.top_k < 1 or args.rerank_k < 0 or args.concurrency < 1 or not 0 < args.port < 65536:
        raise SearchIndexError("--top-k and --concurrency must be positive, --rerank-k >= 0, --port in 1..65535")
    if args.max_query_seconds <= 0 or args.max_upload_mb <= 0 or args.torch_threads < 0:
        raise SearchIndexError("--max-query-seconds and --max-upload-mb must be positive, --torch-threads >= 0")
    threads = args.torch_threads or max(1, (os.cpu_count() or 1) // args.concurrency)
    torch.set_num_threads(threads)
    logger.info(f"torch uses {threads} CPU thread(s) per search, {args.concurrency} searches at once")
    indexes = [load_index(path) for path in args.index]
    resolve_device(args.device, args.fp16)
    # the app offers re-ranking whenever the checkpoint has a matching head
    encoder = _load_encoder(args, long_audio=args.long_audio, keep_matching=True)
    service = _service(args, encoder, indexes, max_query_seconds=args.max_query_seconds)
    service.check_rerank(args.rerank_k, args.rerank_score)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import search_app  # imports gradio, an optional package (the "app" extra): only to serve

    return search_app.serve(
        service,
        host=args.host,
        port=args.port,
        concurrency=args.concurrency,
        top_k=args.top_k,
        rerank_k=args.rerank_k,
        rerank_score=args.rerank_score,
        max_upload_mb=args.max_upload_mb,
        checkpoint=args.checkpoint,
        block=block,
    )


def main(argv=None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", stream=sys.stderr
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it picked
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "index":
            run_index(args)
        elif args.command == "index-audio":
            run_index(args, modality="audio")
        elif args.command == "query":
            run_query(args)
        else:
            run_serve(args)
    except (FileNotFoundError, ValueError, OSError) as err:  # SearchIndexError, InferenceError, CheckpointError
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
