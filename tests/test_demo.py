"""examples/demo.py end to end at toy size: every stage runs the real command and the table is printed."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO_ROOT, "examples", "demo.py")
TOY = [
    "--num-train-images",
    "12",
    "--num-valid-images",
    "3",
    "--num-test-images",
    "4",
    "--num-speakers",
    "5",
    "--clip-steps",
    "10",
    "--max-update",
    "4",
]


@pytest.fixture(scope="module", autouse=True)
def toy_upstream_config(tmp_path_factory):
    """fairseq's HuBERT recipe at toy size (3 updates each) for the demo's upstream stage."""
    from test_hubert_recipe import _toy_config

    # espeak captions of the toy corpus last up to ≈ 4 s (64,000 samples)
    path = _toy_config(tmp_path_factory.mktemp("toy_upstream") / "toy.yaml", max_tokens=100000)
    TOY.extend(["--upstream-config", path])
    yield path
    del TOY[-2:]


def _demo(work, *extra):
    # a progress line every second: the toy stages are over in seconds, a real demo reports every 30 s
    return subprocess.run(
        [sys.executable, DEMO, "--work-dir", str(work), *TOY, *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, CMD_PLUGIN_PROGRESS_SECONDS="1"),
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    missing = [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed; run `apt-get install -y espeak-ng sox`")
    work = tmp_path_factory.mktemp("demo")
    proc = _demo(work, "--ablation")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc.stdout


def test_demo_prints_both_rows_next_to_chance_from_the_eval_records(demo_run):
    work, out = demo_run
    assert "Test split of the generated corpus: 20 utterances x 4 images" in out
    table = out[out.index("Speech→Image") :]
    for tag, label in (("cmd", "CMD (alpha=1)"), ("no_cmd", "no CMD (alpha=0)")):
        with open(work / f"checkpoints_{tag}" / "recall_test.json") as f:
            record = json.load(f)
        assert record["counts"] == {**record["counts"], "num_utterances": 20, "num_images": 4}
        row = next(line for line in table.splitlines() if line.startswith(label))
        assert f"{record['recall']['mean_r1']:.1f}" in row.split("|")[-1]
        assert (work / f"checkpoints_{tag}" / "checkpoint_best.pt").is_file()
    assert any(line.startswith("chance") for line in table.splitlines())
    # the image tower that was trained against is the pre-trained tiny CLIP, not the random one
    clip = [p.name for p in work.glob("tiny_clip_pretrained_10steps*.bin")]  # *: the hard-negative mode
    assert len(clip) == 1 and clip[0] in (work / "train_cmd.log").read_text()
    for stage in (
        "tiny encoders",
        "corpus",
        "prepare",
        "speech upstream (fairseq HuBERT recipe)",
        "CLIP pre-training",
        "train cmd",
        "eval no_cmd",
        "minimal-pairs set",
        "minimal pairs",
        "speech states",
        "pointing-game set",
        "pointing game",
    ):
        assert stage in out.split("stage times:")[-1]
    # the model was trained on the recipe's fine-tuned upstream, frozen
    upstream = json.loads((work / "upstream" / "upstream.json").read_text())
    assert upstream["upstream"] == str(work / "upstream" / "hubert_finetuned.pt")
    train_log = (work / "train_cmd.log").read_text()
    assert f"model.hubert_path={upstream['upstream']}" in train_log or upstream["upstream"] in train_log
    # ... reading its states from the cache made once after the recipe, in the upstream's directory
    assert (work / "upstream" / "speech_cache" / "train.json").is_file()
    assert "frozen upstream states from cache" in train_log
    weights = out.split("layer weights the model learnt")[1].splitlines()[0].split(":")[-1].split()
    assert len(weights) == 3 and abs(sum(float(w) for w in weights) - 1.0) < 0.02
    # the fine-grained test follows the R@K table, from the record next to the checkpoint
    with open(work / "checkpoints_cmd" / "minimal_pairs_score.json") as f:
        mp = json.load(f)
    assert out.index("Minimal pairs") > out.index("Speech→Image")
    assert f"{mp['mean_accuracy']:.1f}" in out
    # ... and the pointing game of its explanation maps (a CMD checkpoint: the cosine with each patch's
    # value-path token, with each plain patch token, and its fusion encoder's attention)
    with open(work / "checkpoints_cmd" / "pointing_game_score.json") as f:
        pg = json.load(f)
    assert list(pg["kinds"]) == ["dense_similarity", "patch_similarity", "fusion_attention"]
    assert f"dense_similarity: {pg['kinds']['dense_similarity']['accuracy']:.1f} %" in out
    assert list(pg["written_captions"]["kinds"]) == ["dense_similarity", "patch_similarity"]
    # it ends with the command that serves its own index and checkpoint in a browser
    # it closes with where to look: the results page, the app, the logs
    closing = out.split("\nDone in ")[1]
    assert f"file://{work / 'search' / 'results.html'}" in closing and f"{work}/*.log" in closing
    serve = closing.split("search it by voice in your browser")[1].splitlines()[1]
    assert "search.py serve" in serve and str(work / "search" / "test_images_index.pt") in serve
    assert str(work / "checkpoints_cmd" / "checkpoint_best.pt") in serve


def test_demo_runs_independent_stages_side_by_side_and_reports_progress_naming_the_logs(demo_run):
    work, out = demo_run
    lines = out.splitlines()
    started = {label: i for i, line in enumerate(lines) for label in re.findall(r"^\+ \[([^\]]+)\]", line)}
    done = {label: i for i, line in enumerate(lines) for label in re.findall(r"^  \[([^\]]+)\] done in", line)}
    side_by_side = ("speech upstream (fairseq HuBERT recipe)", "CLIP pre-training", "minimal-pairs set")
    assert max(started[label] for label in side_by_side) < min(done[label] for label in side_by_side)
    # the recipe's MFCC and k-means run alone: the others start once its labels are written
    assert f"[CLIP pre-training] starts once {work / 'upstream' / '.labels.done'} exists" in out
    assert f"(log: {work / 'upstream.log'})" in out and f"(log: {work / 'train_cmd.log'})" in out
    # the training's progress lines: updates done of the total and the latest valid figure
    progress = [line for line in lines if line.startswith("  [train cmd ") and "done in" not in line]
    assert progress and all(line.endswith(f"(log: {work / 'train_cmd.log'})") for line in progress)
    assert any(re.search(r"\d+/4 updates", line) for line in progress)
    # the upstream's lines pass on the recipe's own (pre-training, fine-tuning) with their logs
    recipe = [line for line in lines if line.startswith("  [speech upstream") and "done in" not in line]
    assert any("[HuBERT pre-training" in line or "HuBERT pre-training: started" in line for line in recipe)


def test_demo_output_has_none_of_the_known_harmless_alarms(demo_run):
    from test_quiet_output import KNOWN_HARMLESS

    _, out = demo_run
    assert [what for what, text in KNOWN_HARMLESS.items() if text in out] == []


def test_rerun_reuses_the_corpus_and_another_training_seed_keeps_the_first_run(demo_run):
    work, _ = demo_run
    before = (work / "checkpoints_cmd" / "checkpoint_best.pt").stat().st_mtime
    proc = _demo(work, "--train-seed", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = proc.stdout.split("stage times:")[-1]
    assert "corpus" not in stages and "CLIP pre-training" not in stages and "train cmd_seed2" in stages
    assert (work / "checkpoints_cmd_seed2" / "checkpoint_best.pt").is_file()
    assert (work / "checkpoints_cmd" / "checkpoint_best.pt").stat().st_mtime == before
    assert "common.seed=2" in proc.stdout


def test_a_corpus_made_with_other_options_is_refused(demo_run):
    work, _ = demo_run
    args = [sys.executable, DEMO, "--work-dir", str(work), *TOY]
    args[args.index("--num-train-images") + 1] = "13"
    proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "scene_corpus.json" in proc.stderr and "asked for" in proc.stderr and "--fresh" in proc.stderr


ABLATION = os.path.join(REPO_ROOT, "examples", "ablation.py")


def _ablation(work, *extra):
    return subprocess.run(
        [sys.executable, ABLATION, "--work-dir", str(work), *TOY, *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_ablation_harness_trains_rows_by_seeds_then_resumes_without_retraining(demo_run):
    work, _ = demo_run
    proc = _ablation(work, "--rows", "sic", "cmd-cosine", "--seeds", "1", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 runs trained, 0 reused" in proc.stdout
    out_dir = work / "ablation"
    with open(out_dir / "ablation_u4.json") as f:
        record = json.load(f)
    for row in ("sic", "cmd-cosine"):
        per_seed = record["rows"][row]["per_seed"]
        assert set(per_seed) == {"1", "2"}
        test_r1 = [per_seed[s]["test"]["mean_r1"] for s in ("1", "2")]
        mean, sd = record["rows"][row]["mean_sd"]["mean_r1"]
        assert mean == pytest.approx(sum(test_r1) / 2)
        assert sd == pytest.approx(abs(test_r1[0] - test_r1[1]) / 2**0.5)
        # each run's checkpoint was chosen on valid and scored on valid and test
        for seed in ("1", "2"):
            run_dir = out_dir / "u4" / row / f"seed{seed}"
            assert (run_dir / "checkpoint_best.pt").is_file()
            with open(run_dir / "recall_test.json") as f:
                assert json.load(f)["recall"]["mean_r1"] == per_seed[seed]["test"]["mean_r1"]
        table = proc.stdout[proc.stdout.index("Ablation on the generated corpus") :]
        line = next(line for line in table.splitlines() if line.startswith(row + " "))
        assert f"{mean:.1f}±{sd:.1f}" in line
    # the CMD row logged its fusion attention; the alpha = 0 row has none
    assert set(record["rows"]["cmd-cosine"]["per_seed"]["1"]["attention"]) == {
        "attn_entropy",
        "attn_max",
        "attn_cos_mean_pool",
    }
    assert record["rows"]["sic"]["per_seed"]["1"]["attention"] == {}
    assert (out_dir / "ablation_u4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every run: its valid curve (one validation per epoch, ending at the last update) and its checkpoint
    # scored on the minimal-pairs set, the same figures as the run's own score_minimal_pairs.py record
    for row in ("sic", "cmd-cosine"):
        run = record["rows"][row]["per_seed"]["1"]
        assert run["valid_curve"] and run["valid_curve"][-1][0] == 4
        with open(out_dir / "u4" / row / "seed1" / "minimal_pairs_score.json") as f:
            mp = json.load(f)
        assert run["minimal_pairs"]["mp_mean"] == mp["mean_accuracy"]
        assert run["minimal_pairs"]["mp_colour"] == mp["attributes"]["colour"]["accuracy"]
    assert "minimal pairs (pairwise accuracy" in proc.stdout
    assert (out_dir / "ablation_u4_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = _ablation(work, "--rows", "sic", "cmd-cosine", "--seeds", "1", "2")
    assert again.returncode == 0 and "0 runs trained, 4 reused" in again.stdout
    # a sweep in progress: the table of what finished, the rest listed, nothing trained
    partial = _ablation(work, "--rows", "sic", "cmd-cosine", "--seeds", "1", "2", "3", "--report-only")
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "not finished yet (left out): sic seed 3, cmd-cosine seed 3" in partial.stdout
    assert "0 runs trained, 4 reused, 2 not finished" in partial.stdout
    assert not (out_dir / "u4" / "sic" / "seed3").exists()
    # the committed records alone (JSON, gzipped training logs; no checkpoint, no work dir) make the same report
    records = work.parent / "records_only"
    for path in (out_dir / "u4").rglob("*"):
        if path.suffix == ".json" or path.name.endswith(".train.log"):
            dst = records / "u4" / path.relative_to(out_dir / "u4")
            dst.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".json":
                shutil.copy(path, dst)
            else:
                with open(path, "rb") as src, gzip.open(str(dst) + ".gz", "wb") as gz:
                    gz.write(src.read())
    from_records = subprocess.run(
        [
            sys.executable,
            ABLATION,
            "--work-dir",
            str(work.parent / "no_such_work_dir"),
            "--out-dir",
            str(records),
            "--max-update",
            "4",
            "--rows",
            "sic",
            "cmd-cosine",
            "--seeds",
            "1",
            "2",
            "--report-only",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert from_records.returncode == 0, from_records.stderr[-3000:]
    assert not (work.parent / "no_such_work_dir").exists()
    with open(records / "ablation_u4.json") as f:
        again_record = json.load(f)
    for row in ("sic", "cmd-cosine"):
        assert again_record["rows"][row]["mean_sd"] == record["rows"][row]["mean_sd"]
        assert (
            again_record["rows"][row]["per_seed"]["1"]["attention"] == record["rows"][row]["per_seed"]["1"]["attention"]
        )


def test_ablation_rejects_an_unknown_row_before_any_work(tmp_path):
    proc = _ablation(tmp_path / "none", "--rows", "cmd-dot")
    assert proc.returncode != 0 and "unknown row 'cmd-dot'" in proc.stderr
    assert not (tmp_path / "none").exists()


def test_demo_searches_the_test_images_with_spoken_captions_and_writes_the_page(demo_run):
    work, out = demo_run
    page = work / "search" / "results.html"
    line = next(line for line in out.splitlines() if line.startswith("spoken image search over 4 test images"))
    assert line.endswith(f"results page: {page}") and "ms per query" in line
    html = page.read_text()
    lines = (work / "search" / "query_transcripts.txt").read_text().splitlines()
    transcripts = [line.split("\t")[0] for line in lines]  # "<transcript>\t<paired image>"
    assert len(transcripts) == 3 and all(transcripts) and all(len(line.split("\t")) == 2 for line in lines)
    assert html.count("<audio") == 3 and all(t.replace("'", "&#x27;") in html for t in transcripts)
    # each query's paired image is named by the page, and its rank printed
    assert all(os.path.basename(line.split("\t")[1]) in html for line in lines)
    assert len(re.findall(r"paired image at rank [1-4];", out)) == 3
    assert html.count("data:image/jpeg;base64,") == 3 * 4  # top 10 of 4 images: all four per query
    assert (work / "search" / "test_images_index.pt").is_file()
