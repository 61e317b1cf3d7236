import math

import pytest
import torch

from cmd_plugin.objectives.cmd.noise import apply_patch_noise, draw_patch_noise, num_noised_patches
from cmd_plugin.objectives.sic import in_batch_accuracy, symmetric_infonce
from cmd_plugin.objectives.targets import multi_positive_targets


def _log_softmax_row(row, j):
    return row[j] - math.log(sum(math.exp(v) for v in row))


def test_multi_positive_loss_matches_hand_computation_with_duplicate_images():
    # items 0 and 1 are two captions of image 7; item 2 is image 9
    ids = torch.tensor([7, 7, 9])
    scores = [[0.9, 0.8, 0.1], [0.2, 0.7, 0.3], [0.0, 0.5, 0.6]]
    scale = 2.0
    logits = [[v * scale for v in row] for row in scores]
    cols = [[logits[i][j] for i in range(3)] for j in range(3)]
    # speech->image: rows 0, 1 have two positives (columns 0, 1) with target 1/2 each
    s2i = -(0.5 * _log_softmax_row(logits[0], 0) + 0.5 * _log_softmax_row(logits[0], 1))
    s2i += -(0.5 * _log_softmax_row(logits[1], 0) + 0.5 * _log_softmax_row(logits[1], 1))
    s2i += -_log_softmax_row(logits[2], 2)
    i2s = -(0.5 * _log_softmax_row(cols[0], 0) + 0.5 * _log_softmax_row(cols[0], 1))
    i2s += -(0.5 * _log_softmax_row(cols[1], 0) + 0.5 * _log_softmax_row(cols[1], 1))
    i2s += -_log_softmax_row(cols[2], 2)

    loss, got_s2i, got_i2s = symmetric_infonce(torch.tensor(scores), ids, ids, torch.tensor(scale))
    assert got_s2i.item() == pytest.approx(s2i, rel=1e-6)
    assert got_i2s.item() == pytest.approx(i2s, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * (s2i + i2s), rel=1e-6)


def test_targets_rows_sum_to_one_and_missing_positive_is_an_error():
    t = multi_positive_targets(torch.tensor([1, 1, 2, 3]), torch.tensor([1, 1, 2, 3]))
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert t[0, 0] == 0.5 and t[2, 2] == 1.0 and t[2, 0] == 0.0
    with pytest.raises(ValueError, match="no positive"):
        multi_positive_targets(torch.tensor([1, 5]), torch.tensor([1, 2]))


def test_in_batch_accuracy_counts_any_positive():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.0], [0.9, 0.0, 0.1]])
    ids = torch.tensor([4, 4, 5])
    assert in_batch_accuracy(scores, ids, ids) == 2


@pytest.mark.parametrize("ratio,num_patches", [(0.3, 256), (0.3, 16), (0.5, 10), (0.0, 16)])
def test_noise_replaces_exact_share_from_other_images_only(ratio, num_patches):
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    dim = 4
    # each item's patches carry a unique signature (item, position) so sources can be traced
    patches = torch.zeros(len(ids), num_patches, dim)
    patches[:, :, 0] = torch.arange(len(ids))[:, None].float()
    patches[:, :, 1] = torch.arange(num_patches)[None, :].float()
    gen = torch.Generator().manual_seed(3)
    positions, sources = draw_patch_noise(ids, num_patches, ratio, gen)
    noisy = apply_patch_noise(patches, positions, sources)
    k = num_noised_patches(num_patches, ratio)
    for b in range(len(ids)):
        changed = (noisy[b, :, 0] != b).nonzero()[:, 0]
        assert len(changed) == k
        src_items = noisy[b, changed, 0].long()
        assert bool((ids[src_items] != ids[b]).all()), "a patch came from the same image"
        # the replacing patch is the other item's patch at the same position
        assert torch.equal(noisy[b, changed, 1], changed.float())
    assert torch.equal(patches[:, :, 0], torch.arange(len(ids))[:, None].float().expand(-1, num_patches))


def test_noise_is_reproducible_under_a_seed_and_varies_with_it():
    ids = torch.arange(8)
    a = draw_patch_noise(ids, 64, 0.3, torch.Generator().manual_seed(11))
    b = draw_patch_noise(ids, 64, 0.3, torch.Generator().manual_seed(11))
    c = draw_patch_noise(ids, 64, 0.3, torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_noise_leaves_clean_when_no_other_image_exists():
    ids = torch.tensor([5, 5, 5])
    positions, sources = draw_patch_noise(ids, 16, 0.3, torch.Generator().manual_seed(0))
    assert bool((sources == -1).all())
    patches = torch.randn(3, 16, 2)
    assert torch.equal(apply_patch_noise(patches, positions, sources), patches)


def test_noise_ratio_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="ratio"):
        num_noised_patches(16, 1.5)
