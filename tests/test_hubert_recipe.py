"""examples/train_hubert_upstream.py: fairseq's own HuBERT recipe (MFCC k-means -> pre-training -> CTC
fine-tuning) on a manifest's training split, at toy size; the result loads as the plugin's frozen upstream."""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from test_train_cli import make_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "train_hubert_upstream.py")
WORDS = ["a", "big", "red", "circle", "on", "the", "left", "two", "small", "blue", "squares"]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_hubert_upstream", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = _load_script()


def _toy_config(path, n_clusters=8, max_tokens=40000):
    """The tiny recipe at toy size. ``max_tokens``: samples per batch, at least the longest utterance
    (fairseq refuses longer ones); 40,000 for these tests' random 0.5-1 s clips."""
    with open(os.path.join(REPO, "examples", "tiny", "hubert_upstream.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg = copy.deepcopy(cfg)
    cfg["kmeans"].update(n_clusters=n_clusters, percent=-1, n_init=1, max_iter=5, batch_size=1000)
    cfg["holdout_fraction"] = 0.25
    for stage in ("pretrain", "finetune"):
        o = cfg[stage]["overrides"]
        o.update(
            {
                "optimization.max_update": 3,
                "dataset.max_tokens": max_tokens,
                "common.log_interval": 1,
                "model.encoder_layers": 2,
                "model.encoder_embed_dim": 32,
                "model.encoder_ffn_embed_dim": 64,
                "model.encoder_attention_heads": 2,
                "model.conv_pos": 8,
                "model.conv_pos_groups": 4,
            }
        )
    pre = cfg["pretrain"]["overrides"]
    pre.update(
        {
            "model.conv_feature_layers": "[(32, 400, 160)] + [(32, 2, 2)]",
            "model.final_dim": 16,
            "lr_scheduler.warmup_updates": 1,
            "checkpoint.save_interval_updates": 0,
        }
    )
    ft = cfg["finetune"]["overrides"]
    for key in list(ft):  # the fine-tuned model's shape comes from the pre-trained one
        if key.startswith("model.encoder") or key.startswith("model.conv_pos"):
            ft.pop(key)
    ft.update(
        {
            "lr_scheduler.warmup_steps": 1,
            "lr_scheduler.decay_steps": 2,
            "model.mask_prob": 0.1,
            "dataset.validate_interval_updates": 0,
        }
    )
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def _add_captions(data, rng_seed=0):
    """train.wrd / valid.wrd for a corpus made by make_corpus (the recipe's CTC targets)."""
    import random

    rng = random.Random(rng_seed)
    for split in ("train", "valid"):
        with open(os.path.join(data, f"{split}.tsv")) as f:
            n = len(f.read().splitlines()) - 1
        with open(os.path.join(data, f"{split}.wrd"), "w") as f:
            f.writelines(" ".join(rng.choices(WORDS, k=5)) + "\n" for _ in range(n))


def _run(data, out, config, *extra):
    return subprocess.run(
        [sys.executable, SCRIPT, "--data", data, "--out-dir", str(out), "--config", config, *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubert_recipe")
    data = make_corpus(root, {"train": (8, 2), "valid": (2, 2)})
    _add_captions(data)
    config = _toy_config(root / "toy.yaml")
    out = root / "upstream"
    proc = _run(data, out, config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, out, config, proc


def test_letters_and_frames_follow_fairseq_conventions():
    assert recipe.words_to_letters("A big cat's toy .") == "A | B I G | C A T ' S | T O Y |"
    assert recipe.mfcc_frames(399) == 0 and recipe.mfcc_frames(400) == 1 and recipe.mfcc_frames(16000) == 98


def test_recipe_writes_released_layout_checkpoints_that_load_frozen(recipe_run):
    from cmd_plugin.checkpoints import load_checkpoint_state
    from cmd_plugin.models.hubert_upstream import HubertUpstream

    data, out, _, proc = recipe_run
    record = json.loads((out / "upstream.json").read_text())
    assert record["upstream"] == str(out / "hubert_finetuned.pt")
    pre = load_checkpoint_state(str(out / "hubert_pretrained.pt"), what="test")
    ft = load_checkpoint_state(str(out / "hubert_finetuned.pt"), what="test")
    assert pre["cfg"]["model"]["_name"] == "hubert" and ft["cfg"]["model"]["_name"] == "hubert_ctc"
    assert pre["cfg"]["task"]["labels"] == ["km"] and ft["cfg"]["task"]["labels"] == ["ltr"]
    # fairseq's own trainers ran the shipped recipe configs
    log = (out / "pretrain.log").read_text()
    assert "hubert_base_librispeech" in proc.stdout and "base_10h" in proc.stdout
    assert "num_updates=3" in log or "num_updates 3" in log
    for path in ("hubert_pretrained.pt", "hubert_finetuned.pt"):
        upstream = HubertUpstream(str(out / path), freeze=True)
        assert upstream.num_states == 3 and upstream.embed_dim == 32
        assert not any(p.requires_grad for p in upstream.parameters())
        states, _ = upstream(torch.randn(2, 16000))
        assert states.shape[:2] == (3, 2) and torch.isfinite(states).all()


def test_only_the_training_split_is_used_and_held_out_by_image(recipe_run):
    data, out, _, _ = recipe_run
    with open(os.path.join(data, "train.tsv")) as f:
        train_wavs = {line.split("\t")[0] for line in f.read().splitlines()[1:]}
    seen = []
    for split in ("train", "valid"):
        with open(out / "data" / f"{split}.tsv") as f:
            rows = [line.split("\t")[0] for line in f.read().splitlines()[1:]]
        assert rows and set(rows) <= train_wavs
        seen.append(rows)
        labels = (out / "data" / f"{split}.km").read_text().splitlines()
        assert len(labels) == len(rows)
        assert (out / "data" / f"{split}.ltr").read_text().count("\n") == len(rows)
    assert not set(seen[0]) & set(seen[1])
    # both captions of an image (train_<i>_<c>.wav) fall on the same side
    images = [{w.rsplit("_", 1)[0] for w in rows} for rows in seen]
    assert not images[0] & images[1]


def test_rerun_reuses_every_stage_and_an_interrupted_training_resumes(recipe_run):
    data, out, config, _ = recipe_run
    proc = _run(data, out, config)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fairseq-hydra-train" not in proc.stdout and "learn_kmeans" not in proc.stdout
    # a pre-training stopped before its final copy: the same command resumes it from fairseq's
    # checkpoint_last.pt (read by fairseq's own torch.load) and only then replaces the outputs
    before = (out / "hubert_pretrained.pt").stat().st_mtime_ns
    os.remove(out / "hubert_pretrained.pt")
    os.remove(out / "hubert_finetuned.pt")
    proc = _run(data, out, config, "--no-finetune")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (out / "pretrain.log").read_text()
    assert "Loaded checkpoint" in log and "@ 3 updates" in log
    assert (out / "hubert_pretrained.pt").stat().st_mtime_ns != before
    assert json.loads((out / "upstream.json").read_text())["upstream"] == str(out / "hubert_pretrained.pt")
    assert not list(out.glob(".*.tmp"))


def test_a_corpus_too_small_for_kmeans_is_refused_with_the_sizes(tmp_path):
    data = make_corpus(tmp_path, {"train": (2, 1), "valid": (1, 1)})
    _add_captions(data)
    config = _toy_config(tmp_path / "toy.yaml", n_clusters=100000)
    proc = _run(data, tmp_path / "out", config)
    assert proc.returncode != 0
    assert "MFCC frames, fewer than the 100000 k-means clusters" in proc.stderr
    assert "train.tsv: 1 utterances" in proc.stderr or "train.tsv: 2 utterances" in proc.stderr
    assert not (tmp_path / "out" / "hubert_pretrained.pt").exists()


def test_missing_training_manifest_is_named(tmp_path):
    proc = _run(str(tmp_path), tmp_path / "out", os.path.join(REPO, "examples", "tiny", "hubert_upstream.yaml"))
    assert proc.returncode != 0 and f"{tmp_path}/train.tsv not found" in proc.stderr


def _load_probe():
    spec = importlib.util.spec_from_file_location("probe_upstream", os.path.join(REPO, "examples", "probe_upstream.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_arithmetic_finds_a_word_that_a_layer_encodes_and_not_one_it_does_not():
    import numpy as np

    probe = _load_probe()
    texts = ["Two red circles .", "a blue box on the left", "one red disk", "three squares"]
    assert probe.word_matrix(texts, ["red", "circle", "box", "square"]).tolist() == [
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 1],
    ]
    assert probe.balanced_accuracy(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])) == 0.75
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(400, 2))
    # layer 0 carries word 0 (plus noise) and nothing of word 1; layer 1 carries nothing
    x = rng.standard_normal((2, 400, 8))
    x[0, :, 0] += 3.0 * (2 * y[:, 0] - 1)
    scores = probe.probe_layers(x[:, :300], y[:300], x[:, 300:], y[300:])
    assert 70 < scores[0] < 80  # mean over the two words: ≈ 100 % and ≈ 50 %
    assert 40 < scores[1] < 60


def test_probe_cli_tables_every_state_of_each_upstream_and_the_random_one(recipe_run, tmp_path):
    import shutil

    data, out, _, _ = recipe_run
    probe_data = tmp_path / "manifests"
    probe_data.mkdir()
    for split in ("train", "valid"):
        for ext in ("tsv", "img"):
            shutil.copy(os.path.join(data, f"{split}.{ext}"), probe_data / f"{split}.{ext}")
        with open(os.path.join(data, f"{split}.tsv")) as f:
            n = len(f.read().splitlines()) - 1
        # each caption names a colour and a shape, in a pattern with both classes of every word
        (probe_data / f"{split}.wrd").write_text(
            "".join(f"{'red' if i % 2 else 'blue'} {'circles' if i % 3 else 'square'} .\n" for i in range(n))
        )
    out_json = tmp_path / "probe.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "examples", "probe_upstream.py"),
            "--data",
            str(probe_data),
            "--upstream",
            f"pretrained={out / 'hubert_pretrained.pt'}",
            "--random",
            "--min-count",
            "2",
            "--output-json",
            str(out_json),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out_json.read_text())
    assert record["words"] == ["red", "blue", "circle", "square"] and record["train_utterances"] == 16
    assert set(record["balanced_accuracy"]) == {"random", "pretrained"}
    for scores in record["balanced_accuracy"].values():
        assert len(scores) == 3 and all(0 <= v <= 100 for v in scores)
    header = next(line for line in proc.stdout.splitlines() if line.startswith("state"))
    assert header.split() == ["state", "random", "pretrained"]
    assert [line.split()[0] for line in proc.stdout.splitlines()[-3:]] == ["input", "L1", "L2"]
