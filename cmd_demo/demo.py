"""The stages of the CPU demo (``examples/demo.py``) and of the ablation harness (``examples/ablation.py``).

Each stage runs, in a subprocess, the same script of ``examples/`` a user runs on real data: tiny
encoders -> generated spoken-scene corpus (Flickr 8k layout) -> prepare_flickr8k.py -> a speech
upstream made with fairseq's own HuBERT recipe on the training split (train_hubert_upstream.py)
-> tiny CLIP image-text pre-training on the training split's written captions ->
fairseq-hydra-train on ``examples/tiny`` with the upstreams frozen -> eval_recall.py -> the
minimal-pairs test -> spoken image search. A stage whose output already exists under the work
directory is skipped (:func:`build_inputs`). The scripts are the checkout's (``REPO/examples``):
this package is meant to be installed editable from the checkout.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import torch
import yaml

from cmd_demo.minimal_pairs_scoring import format_table as format_minimal_pairs
from cmd_demo.pointing_game import format_scores as format_pointing_game
from cmd_plugin.checkpoints import load_checkpoint_state
from cmd_plugin.data.manifest import read_manifest
from cmd_plugin.progress import JobFailed, LoggedJob, format_seconds, run_jobs
from cmd_plugin.retrieval.recall import format_recall_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
# OMP_NUM_THREADS of the plugin's training. None: torch's default, one thread per core, the fastest of the
# ways of using 2 cores that were measured (docs/demo.md, "Where the time goes")
TRAIN_THREADS = None


def run(cmd, log_path=None, label=None, **job):
    """Run one stage's command. With ``log_path`` its output goes there and a progress line names the
    log every 30 s (``job``: :class:`cmd_plugin.progress.LoggedJob`'s fields, e.g. ``total_updates``);
    without, its output is shown as it comes. Returns the seconds it took."""
    if log_path is None:
        print("+ " + " ".join(cmd), flush=True)
        start = time.time()
        subprocess.run(cmd, check=True)
        return time.time() - start
    return run_side_by_side(
        [LoggedJob(label or os.path.basename(cmd[1 if len(cmd) > 1 else 0]), cmd, log_path, **job)]
    )[0]


def run_side_by_side(jobs):
    """Independent stages at once (:func:`cmd_plugin.progress.run_jobs`); their seconds, in order."""
    try:
        seconds = run_jobs(jobs)
    except JobFailed as e:
        raise SystemExit(str(e))
    return [seconds[job.label] for job in jobs]


def check_corpus(corpus, args):
    """A corpus left by an earlier run is reused only if it was made with the options asked for."""
    path = os.path.join(corpus, "scene_corpus.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read the corpus record ({e}); rerun with --fresh")
    wanted = {
        "seed": args.seed,
        "speakers": args.num_speakers,
        "images": {"train": args.num_train_images, "valid": args.num_valid_images, "test": args.num_test_images},
    }
    differing = [
        f"{key}: corpus has {meta.get(key)!r}, asked for {value!r}"
        for key, value in wanted.items()
        if meta.get(key) != value
    ]
    if differing:
        raise SystemExit(
            f"{path}: the existing corpus was made with other options ({'; '.join(differing)}); "
            "rerun with --fresh or another --work-dir"
        )


def search_demo(py, work, manifests, checkpoint, num_queries=3, top_k=10):
    """Spoken image search on the test split: index its images, query with spoken test captions
    (transcripts from test.wrd), write the results page. Returns (page path, query record)."""
    test = read_manifest(manifests, "test")
    search_dir = os.path.join(work, "search")
    images = os.path.join(search_dir, "test_images")
    for rel in test.unique_images:  # a folder of just the test images, as a user's photos would be
        dst = os.path.join(images, rel)
        if not os.path.isfile(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(test.image_path(rel), dst)
    # the first caption of images spread over the split
    picks = [test.unique_images[i * len(test.unique_images) // num_queries] for i in range(num_queries)]
    utterances = [test.image_paths.index(rel) for rel in picks]
    transcripts = os.path.join(search_dir, "query_transcripts.txt")
    with open(transcripts, "w", encoding="utf-8") as f:
        # "<transcript>\t<paired image>": the results page marks the image each caption describes
        f.writelines(f"{test.texts[u] if test.texts else ''}\t{test.image_paths[u]}\n" for u in utterances)
    script = os.path.join(EXAMPLES, "search.py")
    index = os.path.join(search_dir, "test_images_index.pt")
    run(
        [py, script, "index", "--checkpoint", checkpoint, "--images", images, "--out", index, "--no-progress"],
        log_path=os.path.join(search_dir, "index.log"),
    )
    page = os.path.join(search_dir, "results.html")
    cmd = [
        py,
        script,
        "query",
        "--index",
        index,
        "--checkpoint",
        checkpoint,
        *[test.audio_path(u) for u in utterances],
        "--top-k",
        str(top_k),
        "--html",
        page,
        "--transcripts",
        transcripts,
        "--json",
    ]
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(os.path.join(search_dir, "query.log"), "w") as log:
        log.write(proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"search query failed ({proc.returncode})")
    record = json.loads(proc.stdout)
    for q, u in zip(record["queries"], utterances):
        hit = q.get("paired_rank")
        print(
            f'  "{q["transcript"]}": paired image at rank {hit if hit else f"> {top_k}"}; '
            f"top: {q['results'][0]['path']} ({q['results'][0]['score']:.3f})"
        )
    return page, record


def learned_layer_weights(checkpoint):
    """softmax(layer_weights) of a trained model: how it mixes the upstream's layer states."""
    state = load_checkpoint_state(checkpoint, what="cmd_plugin checkpoint")["model"]
    key = next(k for k in state if k.endswith("layer_weights"))
    return torch.softmax(state[key].float(), dim=0).tolist()


def held_out_set_job(work, name, label, script):
    """A held-out test set's generation as a job (None when WORK/name exists): its own seed and voices,
    no scene of the corpus. It needs only the corpus, so the demo makes it beside the upstreams."""
    out_dir = os.path.join(work, name)
    if os.path.isdir(out_dir):
        return None
    corpus_scenes = os.path.join(work, "corpus", "scene_corpus.json")
    return LoggedJob(
        label,
        [sys.executable, *script, "--out-dir", out_dir, "--exclude-scenes", corpus_scenes],
        os.path.join(work, name + ".log"),
        threads=1,
    )


def minimal_pairs_job(work):
    return held_out_set_job(
        work, "minimal_pairs", "minimal-pairs set", [os.path.join(EXAMPLES, "generate_minimal_pairs.py")]
    )


def pointing_game_job(work):
    """Fresh scenes of two or three groups, one spoken caption per group (cmd_demo/pointing_game.py)."""
    return held_out_set_job(
        work, "pointing_game", "pointing-game set", [os.path.join(EXAMPLES, "pointing_game.py"), "make"]
    )


def _score_on_set(set_job, checkpoint, timings, label, record, cmd):
    """Make the set if it is missing, then run ``cmd`` (+ --output-json) on it; returns the record written
    next to the checkpoint."""
    if set_job is not None:
        timings[set_job.label] = run_side_by_side([set_job])[0]
    out_json = os.path.join(os.path.dirname(checkpoint), record + ".json")
    timings[label] = run(
        [sys.executable, *cmd, "--output-json", out_json], log_path=out_json[: -len(".json")] + ".log", label=label
    )
    with open(out_json) as f:
        return json.load(f)


def pointing_game_stage(work, checkpoint, timings):
    """Where the checkpoint's explanation maps point, on the pointing-game set, beside its frozen CLIP's
    own text tower on the written captions; returns the record."""
    script = os.path.join(EXAMPLES, "pointing_game.py")
    cmd = [
        script,
        "score",
        "--checkpoint",
        checkpoint,
        "--set",
        os.path.join(work, "pointing_game"),
        "--written-captions",
    ]
    return _score_on_set(pointing_game_job(work), checkpoint, timings, "pointing game", "pointing_game_score", cmd)


def minimal_pairs_stage(work, checkpoint, timings):
    """The fine-grained test: a minimal-pairs set beside the corpus (its own seed and voices, no
    training scene), scored with the trained checkpoint. Returns score_minimal_pairs.py's record."""
    script = os.path.join(EXAMPLES, "score_minimal_pairs.py")
    cmd = [script, "--checkpoint", checkpoint, "--pairs-dir", os.path.join(work, "minimal_pairs"), "--written-captions"]
    return _score_on_set(minimal_pairs_job(work), checkpoint, timings, "minimal pairs", "minimal_pairs_score", cmd)


def print_lines_starting(path, start, prefix=""):
    """Echo a finished stage's summary lines from its log (nothing when the log is not there)."""
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith(start):
                    print("  " + prefix + line.rstrip(), flush=True)


def configured_max_update():
    """The tiny config's optimization.max_update (what a training runs when --max-update is not given)."""
    with open(os.path.join(EXAMPLES, "tiny", "config.yaml")) as f:
        return yaml.safe_load(f)["optimization"]["max_update"]


def add_corpus_arguments(parser):
    """Options of the shared stages (encoders, corpus, CLIP pre-training): demo and ablation harness."""
    parser.add_argument(
        "--work-dir", default=os.path.join(REPO, "work_dirs", "demo"), help="where everything is written"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the encoders, corpus and CLIP pre-training")
    parser.add_argument("--num-train-images", type=int, default=1000)
    parser.add_argument("--num-valid-images", type=int, default=50)
    parser.add_argument("--num-test-images", type=int, default=200)
    parser.add_argument("--num-speakers", type=int, default=8, help="espeak-ng voices of the corpus")
    from cmd_demo.clip_pretraining import NEGATIVE_MODES, ClipPretrainingConfig

    parser.add_argument(
        "--clip-steps", type=int, default=ClipPretrainingConfig.steps, help="tiny CLIP image-text pre-training steps"
    )
    parser.add_argument(
        "--clip-negatives",
        choices=NEGATIVE_MODES,
        default=ClipPretrainingConfig.negatives,
        help="tiny CLIP hard negatives, training scenes with one attribute changed "
        "(pretrain_tiny_clip.py --negatives; docs/image_tower.md)",
    )
    parser.add_argument(
        "--upstream-config",
        default=os.path.join(EXAMPLES, "tiny", "hubert_upstream.yaml"),
        help="overrides of fairseq's HuBERT recipe for the speech upstream (train_hubert_upstream.py)",
    )
    parser.add_argument(
        "--no-speech-cache",
        dest="speech_cache",
        action="store_false",
        help="train from waveforms, running the frozen HuBERT at every step, instead of reading its states "
        "from a cache made once (cache_speech_features.py)",
    )
    parser.add_argument("--max-update", type=int, default=None, help="override the tiny config's max_update")
    parser.add_argument("--fresh", action="store_true", help="delete the work dir first")


def build_inputs(args, timings):
    """Run (or reuse) the stages before training: tiny encoders, corpus, manifests, CLIP
    pre-training. Returns the paths training needs; stage times go into ``timings``."""
    if not os.path.isdir(EXAMPLES):
        raise SystemExit(
            f"{EXAMPLES}: not found; the demo runs the scripts of the checkout's examples/ "
            "(install the checkout: pip install --no-build-isolation -e .)"
        )
    work = os.path.abspath(args.work_dir)
    if args.fresh and os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    py = sys.executable

    encoders = os.path.join(work, "encoders")
    if not os.path.isfile(os.path.join(encoders, "tiny_hubert.pt")):
        timings["tiny encoders"] = run(
            [py, os.path.join(EXAMPLES, "make_tiny_encoders.py"), "--out-dir", encoders, "--seed", str(args.seed)]
        )
    clip_dir = os.path.join(encoders, "tiny_clip")
    clip_config = [os.path.join(clip_dir, f) for f in os.listdir(clip_dir) if f.endswith(".json")][0]

    corpus = os.path.join(work, "corpus")
    if not os.path.isdir(corpus):
        timings["corpus"] = run(
            [
                py,
                os.path.join(EXAMPLES, "generate_scene_corpus.py"),
                "--out-dir",
                corpus,
                "--seed",
                str(args.seed),
                "--num-train-images",
                str(args.num_train_images),
                "--num-valid-images",
                str(args.num_valid_images),
                "--num-test-images",
                str(args.num_test_images),
                "--num-speakers",
                str(args.num_speakers),
            ]
        )
    else:
        check_corpus(corpus, args)
    manifests = os.path.join(work, "manifests")
    if not os.path.isfile(os.path.join(manifests, "test.tsv")):
        timings["prepare"] = run(
            [
                py,
                os.path.join(EXAMPLES, "prepare_flickr8k.py"),
                "--audio-dir",
                os.path.join(corpus, "flickr_audio"),
                "--image-dir",
                corpus,
                "--text-dir",
                os.path.join(corpus, "Flickr8k_text"),
                "--out-dir",
                manifests,
            ]
        )

    # Independent stages side by side: the speech upstream (the paper's is a frozen
    # pre-trained HuBERT: the tiny one is made with fairseq's own HuBERT recipe on the training split),
    # the image upstream (the paper's is a frozen CLIP pre-trained on image-text pairs: the tiny one gets
    # the same start from the training split's written captions) and the minimal-pairs set. Valid and
    # test are never read by either pre-training. The upstream keeps torch's threads (one per core, faster
    # for a fairseq training than one thread: docs/demo.md, "Where the time goes"); the short stages one each.
    # The recipe's MFCC, k-means and labels have the machine to themselves: beside the other jobs they
    # took 86 s instead of 25 (docs/demo.md), so those start once the labels are written.
    upstream_dir = os.path.join(work, "upstream")
    negatives = "" if args.clip_negatives == "none" else f"_neg-{args.clip_negatives}"
    pretrained_clip = os.path.join(work, f"tiny_clip_pretrained_{args.clip_steps}steps{negatives}.bin")
    jobs = []
    after_labels = None
    if not os.path.isfile(os.path.join(upstream_dir, "upstream.json")):
        after_labels = os.path.join(upstream_dir, ".labels.done")  # train_hubert_upstream.py's stage marker
        jobs.append(
            LoggedJob(
                "speech upstream (fairseq HuBERT recipe)",
                [
                    py,
                    os.path.join(EXAMPLES, "train_hubert_upstream.py"),
                    "--data",
                    manifests,
                    "--out-dir",
                    upstream_dir,
                    "--config",
                    args.upstream_config,
                ],
                os.path.join(work, "upstream.log"),
            )
        )
    if not os.path.isfile(pretrained_clip):
        jobs.append(
            LoggedJob(
                "CLIP pre-training",
                [
                    py,
                    os.path.join(EXAMPLES, "pretrain_tiny_clip.py"),
                    "--data",
                    manifests,
                    "--split",
                    "train",
                    "--valid-split",
                    "valid",
                    "--clip-dir",
                    clip_dir,
                    "--out-weights",
                    pretrained_clip,
                    "--steps",
                    str(args.clip_steps),
                    "--seed",
                    str(args.seed),
                    "--negatives",
                    args.clip_negatives,
                    "--scenes",
                    os.path.join(corpus, "scene_corpus.json"),
                ],
                os.path.join(work, "clip_pretraining.log"),
                threads=1,
                start_after=after_labels,
            )
        )
    for set_job in (minimal_pairs_job(work), pointing_game_job(work)):
        if set_job:
            set_job.start_after = after_labels
            jobs.append(set_job)
    if jobs:
        timings.update(zip([job.label for job in jobs], run_side_by_side(jobs)))
        print_lines_starting(os.path.join(work, "clip_pretraining.log"), "held-out")
        print_lines_starting(os.path.join(work, "upstream.log"), "stage times", prefix="speech upstream ")
    with open(os.path.join(upstream_dir, "upstream.json")) as f:
        upstream = json.load(f)
    # The frozen upstream's states of the training and valid utterances, once: training reads them
    # instead of running HuBERT at every step (2.2x faster training, the same valid figures:
    # docs/demo.md, "Where the time goes"). In the upstream's directory: a new upstream, a new cache.
    speech_cache = ""
    if getattr(args, "speech_cache", True):
        speech_cache = os.path.join(upstream_dir, "speech_cache")
        if not all(os.path.isfile(os.path.join(speech_cache, f"{split}.json")) for split in ("train", "valid")):
            timings["speech states"] = run(
                [
                    py,
                    os.path.join(EXAMPLES, "cache_speech_features.py"),
                    "--manifest-dir",
                    manifests,
                    "--splits",
                    "train",
                    "valid",
                    "--hubert",
                    upstream["upstream"],
                    "--out",
                    speech_cache,
                ],
                log_path=os.path.join(work, "speech_cache.log"),
                label="speech states",
            )
    return {
        "work": work,
        "manifests": manifests,
        "hubert": upstream["upstream"],
        "upstream": upstream,
        "speech_cache": speech_cache,
        "clip_name": os.path.splitext(os.path.basename(clip_config))[0],
        "clip_config": clip_config,
        "clip_weights": pretrained_clip,
    }


def train_and_score(inputs, save_dir, overrides, seed, max_update, log_path, splits=("test",), timings=None, tag=""):
    """Train the tiny config with ``overrides`` (a list of key=value) into a fresh ``save_dir``,
    then score checkpoint_best.pt (chosen on valid mean R@1) on each split with eval_recall.py.
    Returns {split: eval_recall's JSON record}; the records are also written next to the checkpoints."""
    py = sys.executable
    train_bin = shutil.which("fairseq-hydra-train") or os.path.join(os.path.dirname(py), "fairseq-hydra-train")
    if os.path.isdir(save_dir):
        shutil.rmtree(save_dir)
    cmd = [
        train_bin,
        "--config-dir",
        os.path.join(EXAMPLES, "tiny"),
        "task._name=speech_image",
        f"task.data={inputs['manifests']}",
        f"model.hubert_path={inputs['hubert']}",
        f"model.image_model={inputs['clip_name']}",
        f"model.image_model_config={inputs['clip_config']}",
        f"model.image_pretrained={inputs['clip_weights']}",
        f"checkpoint.save_dir={save_dir}",
        f"common.seed={seed}",
        *overrides,
    ]
    if inputs.get("speech_cache"):
        cmd.append(f"task.speech_feature_cache={inputs['speech_cache']}")
    if max_update:
        cmd.append(f"optimization.max_update={max_update}")
    timings = {} if timings is None else timings
    timings[f"train {tag}"] = run(
        cmd,
        log_path=log_path,
        label=f"train {tag}",
        fairseq=True,
        metric="mean_r1",
        total_updates=max_update or configured_max_update(),
        threads=TRAIN_THREADS,
    )
    records = {}
    for split in splits:
        result_json = os.path.join(save_dir, f"recall_{split}.json")
        timings[f"eval {tag}" + ("" if split == "test" else f" {split}")] = run(
            [
                py,
                os.path.join(EXAMPLES, "eval_recall.py"),
                "--checkpoint",
                os.path.join(save_dir, "checkpoint_best.pt"),
                "--data",
                inputs["manifests"],
                "--split",
                split,
                "--output-json",
                result_json,
                "--no-progress",
            ],
            log_path=os.path.join(save_dir, f"eval_{split}.log"),
            label=f"eval {tag} {split}",
        )
        with open(result_json) as f:
            records[split] = json.load(f)
    return records


def run_demo(args):
    """The whole demo with the options of ``examples/demo.py`` (:func:`add_corpus_arguments`,
    ``train_seed``, ``ablation``): train, score and print the tables, the minimal pairs and search."""
    timings = {}
    t0 = time.time()
    inputs = build_inputs(args, timings)
    work = inputs["work"]
    train_seed = args.seed if args.train_seed is None else args.train_seed
    # the method config group (cmd_plugin/config/method/): SIC + CMD, and SIC alone (alpha = 0)
    variants = [("CMD (alpha=1)", "cmd", "method=cmd")] + (
        [("no CMD (alpha=0)", "no_cmd", "method=sic")] if args.ablation else []
    )
    rows = []
    for label, tag, method in variants:
        if train_seed != args.seed:
            tag = f"{tag}_seed{train_seed}"
        save_dir = os.path.join(work, f"checkpoints_{tag}")
        records = train_and_score(
            inputs,
            save_dir,
            [method],
            train_seed,
            args.max_update,
            os.path.join(work, f"train_{tag}.log"),
            timings=timings,
            tag=tag,
        )
        rows.append((label, records["test"]))

    record = rows[0][1]
    chance = record["chance"]
    counts = record["counts"]
    print()
    print(f"Test split of the generated corpus: {counts['num_utterances']} utterances x {counts['num_images']} images")
    print(format_recall_rows([(label, r["recall"]) for label, r in rows] + [("chance", chance)]))
    print()
    for label, r in rows:
        ratio = r["recall"]["mean_r10"] / chance["mean_r10"]
        print(f"{label}: mean R@10 = {r['recall']['mean_r10']:.1f} = {ratio:.1f}x chance")
    print(
        "layer weights the model learnt over the frozen upstream's states (softmax; input, L1, ...): "
        + " ".join(f"{w:.2f}" for w in learned_layer_weights(record["checkpoint"]))
    )
    print()
    mp_record = minimal_pairs_stage(work, record["checkpoint"], timings)
    print(format_minimal_pairs(mp_record))
    print()
    print(format_pointing_game(pointing_game_stage(work, record["checkpoint"], timings)))
    print()
    t = time.time()
    page, search_record = search_demo(sys.executable, work, inputs["manifests"], record["checkpoint"])
    timings["search"] = time.time() - t
    ms, nq = search_record["timing_seconds"], len(search_record["queries"])
    print(
        f"spoken image search over {search_record['num_images']} test images ({search_record['method']}): "
        f"{1000 * ms['per_query']:.1f} ms per query (embedding {1000 * ms['embed_queries'] / nq:.1f} ms, "
        f"search {1000 * ms['search'] / nq:.2f} ms); results page: {page}"
    )
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {time.time() - t0:.0f}s")
    index = os.path.join(work, "search", "test_images_index.pt")
    print()
    print(f"Done in {format_seconds(time.time() - t0)}. To look at what it made:")
    print(f"  the results page (each spoken query, its top 10, its paired image marked): file://{page}")
    print("  search it by voice in your browser (Ctrl-C stops it):")
    print(
        f"  {sys.executable} {os.path.join(EXAMPLES, 'search.py')} serve --checkpoint {record['checkpoint']} "
        f"--index {index}   # then open http://127.0.0.1:7860"
    )
    print(
        f"  each stage's log: {work}/*.log; the model's checkpoints, records and training log: "
        f"{os.path.dirname(record['checkpoint'])}"
    )
