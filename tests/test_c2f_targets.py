"""Momentum-distillation targets and SIM hard-negative sampling (coarse-to-fine)."""

import math

import pytest
import torch

from cmd_plugin.objectives.c2f.distillation import distillation_targets, distillation_weight
from cmd_plugin.objectives.c2f.hard_negatives import negative_probabilities, sample_hard_negatives
from cmd_plugin.objectives.sic import soft_cross_entropy
from cmd_plugin.objectives.targets import multi_positive_targets

# ---- momentum distillation ----


def _hard_targets():
    batch = torch.tensor([[1, 4], [1, 5], [1, 4], [1, 6]])
    queue = torch.tensor([[1, 5], [2, 4], [1, 4], [1, 7], [1, 6]])
    return multi_positive_targets(batch, torch.cat([batch, queue]))


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_distillation_targets_are_distributions(alpha):
    hard = _hard_targets()
    momentum_logits = torch.randn(hard.shape, generator=torch.Generator().manual_seed(0)) * 10
    targets = distillation_targets(momentum_logits, hard, alpha)
    assert targets.dtype == torch.float32 and not targets.requires_grad
    assert (targets >= 0).all()
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(hard.size(0)), rtol=0, atol=1e-6)
    # the mixture puts exactly (1 - alpha) of its mass on the positives' hard share
    soft = torch.softmax(momentum_logits, dim=1)
    torch.testing.assert_close(targets, alpha * soft + (1 - alpha) * hard)
    # fp16 momentum logits (mixed-precision training) give the same fp32 distribution
    half = distillation_targets(momentum_logits.half(), hard, alpha)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.sum(dim=1), torch.ones(hard.size(0)), rtol=0, atol=1e-6)


def test_distillation_at_alpha_zero_is_the_hard_multi_positive_target():
    hard = _hard_targets()
    broken = torch.full(hard.shape, float("nan"))  # never read at alpha = 0
    assert torch.equal(distillation_targets(broken, hard, 0.0), hard)
    # and the loss is then the project's multi-positive SIC loss
    ids = torch.tensor([4, 5, 4, 6])
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    hard_in_batch = multi_positive_targets(ids, ids)
    targets = distillation_targets(torch.randn(4, 4), hard_in_batch, 0.0)
    assert torch.equal(soft_cross_entropy(logits, targets), soft_cross_entropy(logits, hard_in_batch))
    # and at alpha > 0 a different loss
    mixed = distillation_targets(torch.randn(4, 4), hard_in_batch, 0.4)
    assert not torch.allclose(soft_cross_entropy(logits, mixed), soft_cross_entropy(logits, hard_in_batch))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        distillation_targets(broken, hard, 1.5)


def test_distillation_weight_ramps_linearly_then_holds():
    assert distillation_weight(0, 0.4, 100) == 0.0
    assert math.isclose(distillation_weight(25, 0.4, 100), 0.1)
    assert math.isclose(distillation_weight(100, 0.4, 100), 0.4)
    assert math.isclose(distillation_weight(10_000, 0.4, 100), 0.4)
    assert distillation_weight(0, 0.4, 0) == 0.4  # no ramp
    with pytest.raises(ValueError, match="ramp_updates"):
        distillation_weight(1, 0.4, -1)


# ---- hard negatives ----

IDS = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])  # duplicate images: captions of one image


def _logits(rows, cols, seed=0, scale=5.0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale


def test_hard_negative_is_never_a_caption_of_the_same_image():
    logits = _logits(8, 8)
    # make the same-image columns by far the most similar: a sampler that only down-weights them
    # (or masks after an fp16 softmax) would pick them
    logits = logits + 50.0 * (IDS[:, None] == IDS[None, :]).float()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        index, valid, _ = sample_hard_negatives(logits, IDS, IDS, gen)
        assert valid.all()
        assert (IDS[index] != IDS).all()
    # image -> speech direction: rows are images of the batch items, columns speech items
    index, valid, _ = sample_hard_negatives(logits.t(), IDS, IDS, gen)
    assert valid.all() and (IDS[index] != IDS).all()


def test_rows_with_no_other_image_are_skipped_and_never_nan():
    # every column is image 5: rows of image 5 have nothing to sample, a row of image 6 has all
    cols = torch.tensor([5, 5, 5])
    rows = torch.tensor([5, 6, 5])
    index, valid, _ = sample_hard_negatives(_logits(3, 3), rows, cols, torch.Generator().manual_seed(0))
    assert valid.tolist() == [False, True, False]
    assert index[0] == -1 and index[2] == -1 and 0 <= index[1] < 3
    probs, has_negative = negative_probabilities(_logits(3, 3), rows, cols)
    assert not torch.isnan(probs).any() and probs[0].sum() == 0 and has_negative.tolist() == [False, True, False]
    # a batch made only of captions of one image: all skipped, no error
    index, valid, _ = sample_hard_negatives(
        _logits(4, 4), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    )
    assert not valid.any() and (index == -1).all()


def test_fp16_logits_with_huge_values_sample_in_fp32():
    logits = _logits(8, 8, scale=1.0).half()
    logits[:, 1] = 60000.0  # column of image 0: only a positive for rows 0-2
    logits[:, 4] = -60000.0
    gen = torch.Generator().manual_seed(0)
    probs, _ = negative_probabilities(logits, IDS, IDS)
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(8))
    index, valid, _ = sample_hard_negatives(logits, IDS, IDS, gen)
    assert valid.all() and (IDS[index] != IDS).all()
    # rows 3.. are not image 0: their negative is column 1, whose logit dwarfs every other
    assert (index[3:] == 1).all()


def test_unusable_logits_fall_back_to_a_uniform_non_positive():
    logits = _logits(8, 8)
    logits[0, 5] = float("nan")
    logits[3, 0] = float("inf")
    logits[6] = float("-inf")  # every column -inf: no softmax weight anywhere
    probs, has_negative = negative_probabilities(logits, IDS, IDS)
    assert has_negative.all() and torch.isfinite(probs).all()
    for row in (0, 3, 6):
        negatives = (IDS != IDS[row]).float()
        torch.testing.assert_close(probs[row], negatives / negatives.sum())
    # other rows keep their softmax
    assert not torch.allclose(probs[1], (IDS != IDS[1]).float() / (IDS != IDS[1]).sum())


def test_split_aware_keys_mask_only_the_same_split_and_image():
    rows = torch.tensor([[1, 0], [2, 0]])
    cols = torch.tensor([[1, 0], [2, 0], [1, 1]])
    probs, _ = negative_probabilities(torch.zeros(2, 3), rows, cols)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5]]))


def test_same_generator_state_draws_the_same_negatives():
    logits = _logits(8, 8, scale=1.0)
    a, _, _ = sample_hard_negatives(logits, IDS, IDS, torch.Generator().manual_seed(7))
    b, _, _ = sample_hard_negatives(logits, IDS, IDS, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    draws = {
        tuple(sample_hard_negatives(logits, IDS, IDS, torch.Generator().manual_seed(s))[0].tolist()) for s in range(5)
    }
    assert len(draws) > 1


def test_negatives_follow_the_softmax_of_the_sic_logits():
    """20,000 draws of one row: each column's frequency within 0.015 (>= 4 standard deviations)
    of softmax over the other images' columns; uniform sampling or a wrong temperature fails."""
    row_logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, 1.5, 0.5, 2.5])
    n = 20_000
    logits = row_logits.repeat(n, 1)
    rows = torch.full((n,), 2)
    cols = torch.tensor([2, 0, 1, 3, 1, 2, 4, 5])  # columns 0 and 5 show the row's image
    index, valid, _ = sample_hard_negatives(logits, rows, cols, torch.Generator().manual_seed(0))
    assert valid.all()
    freq = torch.bincount(index, minlength=8).float() / n
    allowed = cols != 2
    expected = torch.zeros(8)
    expected[allowed] = torch.softmax(row_logits[allowed], dim=0)
    assert freq[~allowed].sum() == 0
    assert (freq - expected).abs().max() < 0.015, (freq, expected)
    uniform = allowed.float() / allowed.sum()
    assert (uniform - expected).abs().max() > 0.1  # the test can tell softmax from uniform
