"""Coarse-to-fine's training schedule: the SIM negative curriculum (random, then hard), the queue start,
and the logged values that show SIM learning (AUC against hard and random negatives, the prior)."""

import math

import pytest
import torch
from test_c2f_model import C2F_MODEL, c2f_criterion
from test_model import build_model, make_batch

from cmd_plugin.objectives.c2f.hard_negatives import hard_negative_share, negative_probabilities, sample_hard_negatives
from cmd_plugin.objectives.c2f.losses import binary_entropy, ranking_pairs, sim_pairs

IDS = torch.tensor([0, 0, 1, 2, 3, 4])


def test_hard_negative_share_schedule():
    assert [hard_negative_share(u, 0, 0) for u in (0, 5)] == [1.0, 1.0]  # ALBEF
    assert [hard_negative_share(u, 100, 0) for u in (0, 99, 100, 500)] == [0.0, 0.0, 1.0, 1.0]
    assert [hard_negative_share(u, 100, 200) for u in (99, 100, 200, 300, 301)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert hard_negative_share(50, 0, 200) == 0.25
    with pytest.raises(ValueError, match=">= 0"):
        hard_negative_share(0, -1, 0)


def test_random_negatives_are_uniform_over_other_images_and_hard_ones_follow_the_similarities():
    logits = torch.zeros(6, 6)
    logits[:, 5] = 30.0  # image 4 (column 5) is by far the most similar to everything
    counts = torch.zeros(6)
    for seed in range(400):
        index, valid, hard = sample_hard_negatives(logits, IDS, IDS, torch.Generator().manual_seed(seed), 0.0)
        assert valid.all() and not hard.any()
        counts[index[0]] += 1  # row 0 (image 0): columns 2..5 are its non-positives
    assert counts[:2].sum() == 0 and (counts[2:] > 60).all()  # uniform: ~100 each
    index, _, hard = sample_hard_negatives(logits, IDS, IDS, torch.Generator().manual_seed(0), 1.0)
    assert hard.all() and (index[:5] == 5).all()
    # at share 1 the generator is used exactly as before the curriculum existed
    gen = torch.Generator().manual_seed(3)
    probs, _ = negative_probabilities(logits, IDS, IDS)
    reference = torch.multinomial(probs, 1, generator=gen)[:, 0]
    again, _, _ = sample_hard_negatives(logits, IDS, IDS, torch.Generator().manual_seed(3))
    assert torch.equal(again, reference)


def test_mixed_share_draws_about_that_share_of_hard_rows():
    keys = torch.arange(40)
    hard_rows = sum(
        int(sample_hard_negatives(torch.randn(40, 40), keys, keys, torch.Generator().manual_seed(s), 0.25)[2].sum())
        for s in range(20)
    )
    assert 140 < hard_rows < 260  # 800 rows x 0.25 = 200


def test_validation_pairs_hold_a_hard_and_a_random_negative_per_item():
    keys = torch.stack([torch.full((6,), 7), IDS], dim=1)
    pairs = sim_pairs(torch.randn(6, 6), keys, torch.Generator().manual_seed(0), (1.0, 0.0))
    assert pairs.labels.tolist() == [1] * 6 + [0] * 24
    assert int(pairs.hard.sum()) == 12 and not pairs.hard[:6].any() and pairs.hard[6:18].all()
    negative = pairs.labels == 0
    assert not (IDS[pairs.speech_index[negative]] == IDS[pairs.image_index[negative]]).any()


def test_ranking_pairs_and_prior_entropy():
    assert ranking_pairs(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.0, 1.0])) == (4.5, 6)
    assert ranking_pairs(torch.tensor([1.0]), torch.tensor([])) == (0.0, 0)
    assert binary_entropy(1 / 3) == pytest.approx(0.6365, abs=1e-4)  # 1 positive : 2 negatives
    assert binary_entropy(0.5) == pytest.approx(math.log(2))


def test_training_logs_auc_of_the_kind_drawn_and_validation_logs_both(tiny_encoders):
    model = build_model(tiny_encoders, **C2F_MODEL)
    crit = c2f_criterion(distill_alpha=0.0, sim_hard_start=10, sim_hard_ramp=0)
    batch = make_batch([0, 0, 1, 2, 3, 4])
    model.train()
    crit.set_update_num(3)  # before the hard start: random negatives only
    _, _, log = crit(model, batch)
    assert "sim_auc_random_pairs" in log and "sim_auc_hard_pairs" not in log
    assert log["sim_prior"] == pytest.approx(binary_entropy(1 / 3) * 6)
    crit.set_update_num(10)
    _, _, log = crit(model, batch)
    assert "sim_auc_hard_pairs" in log and "sim_auc_random_pairs" not in log
    model.eval()
    with torch.no_grad():
        _, _, log = crit(model, batch)
    assert log["sim_auc_hard_pairs"] == 6 * 12 and log["sim_auc_random_pairs"] == 6 * 12
    assert log["sim_pairs"] == 18  # the validation loss uses the positives and the hard negatives


def test_the_queue_is_scored_and_filled_only_from_queue_start(tiny_encoders):
    model = build_model(tiny_encoders, **{**C2F_MODEL, "multimodal_layers": 0})
    crit = c2f_criterion(sim_weight=0.0, distill_alpha=0.0, queue_start=2)
    batch = make_batch([0, 1, 2])
    model.train()
    for update in (0, 1):
        crit.set_update_num(update)
        _, _, log = crit(model, batch)
        assert "queue_negatives" not in log and len(model.queue) == 0
    crit.set_update_num(2)
    _, _, log = crit(model, batch)
    assert log["queue_negatives"] == 0 and len(model.queue) == 3
    crit.set_update_num(3)
    _, _, log = crit(model, batch)
    assert log["queue_negatives"] == 3 * 3
