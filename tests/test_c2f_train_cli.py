"""Coarse-to-fine through the user's literal commands: method=c2f / method=c2f_cmd train the tiny
config, resume exactly where they stopped (EMA and queue restored), and eval_recall.py re-ranks a
C2F checkpoint with the matching head (every corpus's composition: test_method_configs.py)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from test_train_cli import REPO, make_corpus, run_train

METHODS = ["c2f", "c2f_cmd"]


def _check_c2f_config(cfg, method):
    model, crit = cfg["model"], cfg["criterion"]
    assert model["c2f_momentum"] is True and model["queue_size"] > 0 and model["multimodal_layers"] >= 1
    assert crit["sim_weight"] > 0 and crit["distill_alpha"] == 0.4 and crit["sic_weight"] == 1.0
    cmd = method == "c2f_cmd"
    assert crit["cmd_weight"] == (1.0 if cmd else 0.0) and model["cmd_fusion"] is cmd


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("c2f_corpus"), {"train": (8, 2), "valid": (4, 2)})


def _overrides(enc, data, save_dir, method, *extra):
    return [
        "--config-dir",
        os.path.join(REPO, "examples", "tiny"),
        "task._name=speech_image",
        f"method={method}",
        f"task.data={data}",
        f"model.hubert_path={enc['hubert_path']}",
        f"model.image_model={enc['image_model']}",
        f"model.image_model_config={enc['image_model_config']}",
        f"model.image_pretrained={enc['image_pretrained']}",
        f"checkpoint.save_dir={save_dir}",
        "dataset.batch_size=4",
        "common.log_interval=1",
        "model.queue_size=12",
        "optimization.update_freq=[2]",
        # the queue from the start; SIM negatives random for 2 updates, then hard ones ramped in over 2
        "criterion.queue_start=0",
        "criterion.sim_hard_start=2",
        "criterion.sim_hard_ramp=2",
        *extra,
    ]


def _train_log(stdout):
    """(num_updates, loss, sim_acc) of every train_inner line."""
    return [
        (int(u), float(loss), float(acc))
        for loss, acc, u in re.findall(
            r"\[train_inner\].*? loss=([0-9.]+),.*? sim_acc=([0-9.]+),.*? num_updates=(\d+)", stdout
        )
    ]


def _train(enc, data, save_dir, method, max_update):
    return run_train(
        _overrides(enc, data, save_dir, method, f"optimization.max_update={max_update}", "task.valid_rerank_k=10"),
        cwd=save_dir.parent,
    )


@pytest.fixture(scope="module")
def c2f_first_run(tiny_encoders, corpus, tmp_path_factory):
    """method=c2f stopped after update 4 (reused by the resume and the re-ranking tests)."""
    save_dir = tmp_path_factory.mktemp("c2f_run") / "split"
    proc = _train(tiny_encoders, corpus, save_dir, "c2f", 4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return save_dir, proc


@pytest.mark.parametrize("method", METHODS)
def test_literal_command_trains_and_resumes_exactly(tiny_encoders, corpus, c2f_first_run, tmp_path, method):
    """Updates 5-6 of a run stopped after update 4 and resumed equal those of an uninterrupted run (c2f);
    both methods train and resume. update_freq 2: one EMA step per update, every forward enqueued."""
    if method == "c2f":
        split_dir, first = c2f_first_run
    else:
        split_dir = tmp_path / "split"
        first = _train(tiny_encoders, corpus, split_dir, method, 4)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "whole-split recall on 8 utterances x 4 images" in first.stdout + first.stderr
    state = torch.load(split_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    _check_c2f_config(state["cfg"], method)
    assert state["cfg"]["model"]["multimodal_ffn_dim"] <= 256  # the tiny group's small sizes
    model = state["model"]
    # 4 updates of 2 forwards: the EMA of update u is applied at the next forward (fairseq calls
    # set_num_updates(u) then), so the checkpoint holds the EMA of updates 1-3
    assert int(model["momentum_model.last_update"]) == 3
    bsz = [int(b) for b in re.findall(r"\[train_inner\].*? bsz=(\d+),", first.stdout)]
    assert len(bsz) == 4 and int(model["queue.num_enqueued"]) == sum(bsz)  # every forward's items
    assert model["queue.valid"].all()

    resumed = _train(tiny_encoders, corpus, split_dir, method, 6)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 4 updates\)", resumed.stdout)
    after = _train_log(resumed.stdout)
    assert [u for u, _, _ in after] == [5, 6]
    if method == "c2f":
        whole = _train(tiny_encoders, corpus, tmp_path / "whole", method, 6)
        assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
        assert _train_log(whole.stdout)[:4] == _train_log(first.stdout)
        assert _train_log(whole.stdout)[4:] == after


def test_rerank_cli_with_k_covering_everything_equals_full_sim_scoring(corpus, c2f_first_run, tmp_path):
    from cmd_plugin.loading import load_cmd_checkpoint
    from cmd_plugin.retrieval.evaluate import encode_split
    from cmd_plugin.retrieval.recall import retrieval_recall
    from cmd_plugin.retrieval.rerank import SequencePairScorer

    save_dir, proc = c2f_first_run
    checkpoint, train_log = save_dir / "checkpoint_last.pt", proc.stdout
    # validation logged re-ranked recall too (task.valid_rerank_k)
    assert re.search(r"valid on 'valid' subset .*rerank_mean_r1 [0-9.]+", train_log)
    out_json = tmp_path / "rr.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "examples", "eval_recall.py"),
            "--checkpoint",
            str(checkpoint),
            "--data",
            corpus,
            "--split",
            "valid",
            "--rerank-k",
            "10",
            "--rerank-score",
            "sim",
            "--rerank-pair-batch",
            "5",
            "--output-json",
            str(out_json),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"checkpoint_last\.pt SIC +\|", proc.stdout)
    assert re.search(r"checkpoint_last\.pt re-ranked K=10 \(sim\) +\|", proc.stdout)
    assert re.search(r"time: SIC [0-9.]+ s .*; re-ranking [0-9.]+ s more \(32 pairs", proc.stdout)
    record = json.loads(out_json.read_text())
    assert record["rerank"]["effective_k"] == 4 and record["rerank"]["num_pairs"] == 32

    # reference: the matching head on EVERY (utterance, image) pair, ranked like SIC scores
    model, task = load_cmd_checkpoint(str(checkpoint), data=corpus, keep_matching=True)
    assert model.momentum_model is None and model.queue is None  # absent from inference
    assert model.multimodal is not None and model.matching_head is not None  # kept: re-ranking asked for them
    emb = encode_split(model, task, "valid", batch_size=3, progress=False, keep_sequences=True)
    scorer = SequencePairScorer(model, emb.speech_sequences, emb.image_tokens)
    ns, ni = emb.speech.size(0), emb.images.size(0)
    full = scorer(torch.arange(ns).repeat_interleave(ni), torch.arange(ni).repeat(ns)).view(ns, ni)
    expected = retrieval_recall(full, torch.eye(ni), emb.image_ids, ks=(1, 5, 10))
    for key, value in record["rerank"]["recall"].items():
        assert value == pytest.approx(float(expected[key])), key
    # SIC row: the plain recall of the same embeddings
    sic = retrieval_recall(emb.speech, emb.images, emb.image_ids, ks=(1, 5, 10))
    assert record["recall"]["mean_r1"] == pytest.approx(float(sic["mean_r1"]))
    # the matching head's AUC on the valid split: positives against each utterance's hardest SIC negative
    assert re.search(r"matching head on the valid split \(\d+ utterances\): AUC", proc.stdout)
    auc = record["rerank"]["sim_auc"]
    rows = torch.arange(ns)
    sims = emb.speech @ emb.images.T
    sims[rows, emb.image_ids] = float("-inf")
    pos, neg = full[rows, emb.image_ids], full[rows, sims.argmax(dim=1)]
    diff = pos[:, None] - neg[None, :]
    expected_auc = float((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.numel()
    assert auc["split"] == "valid" and auc["pairs"] == ns and auc["auc_hard"] == pytest.approx(expected_auc, abs=1e-6)
    assert 0.0 <= auc["auc_random"] <= 1.0
    # the SIC cosine on the same pairs, and what re-ranking did to each query's first answer
    sic_pos, sic_neg = (emb.speech @ emb.images.T)[rows, emb.image_ids], sims.max(dim=1).values
    diff = sic_pos[:, None] - sic_neg[None, :]
    assert auc["sic_auc_hard"] == pytest.approx(
        float((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.numel(), abs=1e-6
    )
    changes = record["rerank"]["top1_changes"]
    assert changes["s2i_kept_right"] + changes["s2i_broken"] == record["hits"]["s2i_hits_r1"]
    assert re.search(r"first answer after re-ranking: speech->image \d+ fixed, \d+ broken", proc.stdout)


def test_two_stage_recipe_starts_c2f_from_a_sic_checkpoint(tiny_encoders, corpus, tmp_path):
    """checkpoint.restore_file with reset optimizer/meters/dataloader/lr: the SIC run's weights load into a
    C2F model whose C2F parts start fresh (documented in docs/c2f.md as the two-stage recipe)."""
    first = run_train(
        _overrides(tiny_encoders, corpus, tmp_path / "sic", "sic", "model.queue_size=0", "optimization.max_update=2"),
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    sic = tmp_path / "sic" / "checkpoint_last.pt"
    second = run_train(
        _overrides(
            tiny_encoders,
            corpus,
            tmp_path / "c2f",
            "c2f",
            "optimization.max_update=2",
            f"checkpoint.restore_file={sic}",
            "checkpoint.reset_optimizer=true",
            "checkpoint.reset_lr_scheduler=true",
            "checkpoint.reset_meters=true",
            "checkpoint.reset_dataloader=true",
        ),
        cwd=tmp_path,
    )
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert re.search(r"Loaded checkpoint .*sic/checkpoint_last\.pt", out)
    assert "the checkpoint has no multimodal, matching_head, queue, momentum_model: initialised fresh" in out
    assert [u for u, _, _ in _train_log(second.stdout)] == [1, 2]  # a new run: updates counted from 0
    state = torch.load(tmp_path / "c2f" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert any(k.startswith("multimodal.") for k in state["model"]) and int(state["model"]["queue.num_enqueued"]) > 0
