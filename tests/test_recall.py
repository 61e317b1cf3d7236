"""Tests for cmd_plugin.retrieval.recall: blocked tie-pessimistic R@K against a brute-force full sort."""

import numpy as np
import pytest
import torch

from cmd_plugin.retrieval.recall import chance_recall, format_recall_rows, format_recall_table, retrieval_recall


def reference_ranks(scores: np.ndarray, image_ids: np.ndarray):
    """Brute force: fully sort every row/column, ties broken against the right answer.

    Returns (s2i_rank (Ns,), i2s_rank (Ni,) with -1 for images without caption).
    """
    num_speech, num_images = scores.shape
    s2i = np.empty(num_speech, dtype=np.int64)
    for u in range(num_speech):
        is_target = np.arange(num_images) == image_ids[u]
        # lexsort: last key is primary -> descending score, then the target after its ties.
        order = np.lexsort((is_target, -scores[u]))
        s2i[u] = int(np.nonzero(order == image_ids[u])[0][0])
    i2s = np.full(num_images, -1, dtype=np.int64)
    for j in range(num_images):
        is_caption = image_ids == j
        if not is_caption.any():
            continue
        order = np.lexsort((is_caption, -scores[:, j]))
        # Position of the first caption = number of non-captions ranked above the best caption.
        i2s[j] = int(np.nonzero(is_caption[order])[0][0])
    return s2i, i2s


def reference_recall(scores, image_ids, ks):
    s2i, i2s = reference_ranks(scores, image_ids)
    has_caption = i2s >= 0
    out = {}
    for k in ks:
        out[f"s2i_hits_r{k}"] = int((s2i < k).sum())
        out[f"i2s_hits_r{k}"] = int(((i2s < k) & has_caption).sum())
    return out


def random_problem(num_images, captions_per_image, dim, seed, levels=None):
    """Embeddings on a dyadic grid so every summation order gives the exact same scores.

    levels=None: fine grid (ties unlikely); small levels: heavy ties.
    """
    gen = torch.Generator().manual_seed(seed)
    half = 256 if levels is None else levels
    speech = torch.randint(-half, half + 1, (num_images * captions_per_image, dim), generator=gen)
    images = torch.randint(-half, half + 1, (num_images, dim), generator=gen)
    ids = torch.arange(num_images).repeat_interleave(captions_per_image)
    perm = torch.randperm(ids.numel(), generator=gen)  # spread captions across blocks
    return speech[perm].float() / half, images.float() / half, ids[perm]


def assert_matches_reference(speech, images, ids, ks, chunk_size):
    got = retrieval_recall(speech, images, ids, ks=ks, chunk_size=chunk_size)
    want = reference_recall((speech @ images.T).numpy(), ids.numpy(), ks)
    for key, value in want.items():
        assert got[key] == value, (key, chunk_size, got[key], value)
    return got


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 115, 4096])
def test_matches_full_sort_reference_for_any_chunk_size(chunk_size):
    speech, images, ids = random_problem(num_images=23, captions_per_image=5, dim=16, seed=0)
    assert_matches_reference(speech, images, ids, ks=(1, 5, 10), chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [3, 50, 1000])
def test_matches_full_sort_reference_with_heavy_ties(chunk_size):
    # Entries in {-1, 0, 1} and dim 4: scores take only 9 values, so most comparisons tie.
    speech, images, ids = random_problem(num_images=20, captions_per_image=5, dim=4, seed=1, levels=1)
    scores = speech @ images.T
    assert len(torch.unique(scores)) <= 9
    got = assert_matches_reference(speech, images, ids, ks=(1, 5, 10, 30), chunk_size=chunk_size)
    # Tie-optimistic ranking would score far higher; the pessimistic one stays low here.
    assert got["s2i_r1"] < 20.0


def test_k_larger_than_candidates_and_uneven_captions():
    gen = torch.Generator().manual_seed(2)
    speech, images, _ = random_problem(num_images=6, captions_per_image=3, dim=8, seed=2)
    ids = torch.randint(0, 4, (speech.shape[0],), generator=gen)  # images 4 and 5 have no caption
    ids[:4] = torch.arange(4)
    got = assert_matches_reference(speech, images, ids, ks=(1, 3, 6, 50), chunk_size=5)
    assert got["num_images_without_caption"] == 2
    assert got["num_i2s_queries"] == 4
    assert got["s2i_r6"] == 100.0 and got["i2s_r50"] == 100.0


def test_paired_image_tied_at_top_with_another_gives_r1_zero():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 identical
    speech = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    ids = torch.tensor([0, 1])
    got = retrieval_recall(speech, images, ids, ks=(1, 2))
    assert got["s2i_r1"] == 0.0
    assert got["s2i_r2"] == 100.0
    # Image 0's only caption ties with utterance 1 (a non-caption) at the top: not a hit at 1.
    assert got["i2s_r1"] == 0.0
    assert got["i2s_r2"] == 100.0


def test_other_captions_of_the_same_image_are_not_competitors():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Three captions of image 0 with identical scores, one caption of image 1 far below.
    speech = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([0, 0, 0, 1])
    got = retrieval_recall(speech, images, ids, ks=(1,), chunk_size=2)
    assert got["i2s_r1"] == 100.0
    assert got["s2i_r1"] == 100.0


# Scores of 6 utterances (rows) against 3 images (columns), captions = utterances (0,1), (2,3), (4,5).
HAND_SCORES = [
    [0.9, 0.1, 0.75],  # img 0: rank 0
    [0.2, 0.8, 0.3],  # img 0: 0.8 and 0.3 above -> rank 2
    [0.4, 0.4, 0.1],  # img 1: tied with img 0 -> rank 1
    [0.0, 0.8, 0.8],  # img 1: tied with img 2 -> rank 1
    [0.3, 0.3, 0.7],  # img 2: rank 0
    [0.6, 0.0, 0.2],  # img 2: 0.6 above -> rank 1
]
# Image -> speech: img 0 best caption 0.9, nothing above -> rank 0;
# img 1 best caption 0.8 (utt 3), non-caption utt 1 ties at 0.8 -> rank 1;
# img 2 best caption 0.7 (utt 4), non-captions utt 0 (0.75) and utt 3 (0.8) above -> rank 2.


@pytest.mark.parametrize("chunk_size", [1, 4, 6])
def test_hand_built_example_gives_literal_values(chunk_size):
    speech = torch.tensor(HAND_SCORES)
    images = torch.eye(3)  # scores = speech @ I = HAND_SCORES
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    got = retrieval_recall(speech, images, ids, ks=(1, 2, 3), chunk_size=chunk_size)
    assert got["s2i_hits_r1"] == 2 and got["s2i_hits_r2"] == 5 and got["s2i_hits_r3"] == 6
    assert got["i2s_hits_r1"] == 1 and got["i2s_hits_r2"] == 2 and got["i2s_hits_r3"] == 3
    assert got["s2i_r1"] == pytest.approx(100 * 2 / 6)
    assert got["s2i_r2"] == pytest.approx(100 * 5 / 6)
    assert got["i2s_r1"] == pytest.approx(100 * 1 / 3)
    assert got["i2s_r2"] == pytest.approx(100 * 2 / 3)
    assert got["mean_r2"] == pytest.approx(75.0)
    assert got["mean_r3"] == pytest.approx(100.0)
    assert got["num_s2i_queries"] == 6 and got["num_i2s_queries"] == 3


def test_float64_and_integer_id_dtypes_accepted():
    speech = torch.tensor(HAND_SCORES, dtype=torch.float64)
    got = retrieval_recall(
        speech, torch.eye(3, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2], dtype=torch.int32), ks=(1,)
    )
    assert got["s2i_hits_r1"] == 2 and got["i2s_hits_r1"] == 1


@pytest.mark.parametrize(
    "speech_shape, image_shape, ids, error, match",
    [
        ((4, 3), (2, 5), [0, 0, 1, 1], ValueError, "same embedding dim"),
        ((4, 3), (2, 3), [0, 0, 1], ValueError, "one per utterance"),
        ((4, 3), (2, 3), [0, 0, 1, 2], ValueError, "index image_emb rows"),
        ((4, 3), (2, 3), [0, -1, 1, 1], ValueError, "index image_emb rows"),
        ((4,), (2, 3), [0, 0, 1, 1], ValueError, "2-D"),
    ],
)
def test_invalid_inputs_raise_clear_errors(speech_shape, image_shape, ids, error, match):
    with pytest.raises(error, match=match):
        retrieval_recall(torch.randn(speech_shape), torch.randn(image_shape), torch.tensor(ids))


def test_invalid_dtypes_values_and_arguments_raise():
    speech, images, ids = torch.randn(4, 3), torch.randn(2, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(TypeError, match="integer"):
        retrieval_recall(speech, images, ids.float())
    with pytest.raises(TypeError, match="share a dtype"):
        retrieval_recall(speech.double(), images, ids)
    bad = speech.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(bad, images, ids)
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall(speech, images, ids, ks=(0, 1))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_recall(speech, images, ids, chunk_size=0)


def test_random_scores_recall_is_close_to_chance():
    num_images, captions = 200, 5
    gen = torch.Generator().manual_seed(3)
    speech = torch.nn.functional.normalize(torch.randn(num_images * captions, 64, generator=gen), dim=1)
    images = torch.nn.functional.normalize(torch.randn(num_images, 64, generator=gen), dim=1)
    ids = torch.arange(num_images).repeat_interleave(captions)
    got = retrieval_recall(speech, images, ids, ks=(10, 50), chunk_size=300)
    chance = chance_recall(num_images, captions, ks=(10, 50))
    assert got["s2i_r50"] == pytest.approx(chance["s2i_r50"], abs=4.0)
    assert got["i2s_r50"] == pytest.approx(chance["i2s_r50"], abs=10.0)


def test_chance_recall_literal_values():
    got = chance_recall(num_images=2, captions_per_image=1, ks=(1, 2))
    assert got["s2i_r1"] == pytest.approx(50.0) and got["i2s_r1"] == pytest.approx(50.0)
    assert got["s2i_r2"] == pytest.approx(100.0) and got["i2s_r2"] == pytest.approx(100.0)
    # 3 images x 2 captions, K=2: 1 - (4/6)(3/5) = 0.6.
    got = chance_recall(num_images=3, captions_per_image=2, ks=(2,))
    assert got["i2s_r2"] == pytest.approx(60.0)
    assert got["s2i_r2"] == pytest.approx(200.0 / 3)
    assert got["mean_r2"] == pytest.approx((60.0 + 200.0 / 3) / 2)
    # SpokenCOCO test size at K=1: 1/5000 and 5/25000.
    got = chance_recall(5000, 5, ks=(1,))
    assert got["s2i_r1"] == pytest.approx(0.02) and got["i2s_r1"] == pytest.approx(0.02)


def test_format_table_shows_one_decimal_per_column():
    results = {
        "s2i_r1": 33.333,
        "s2i_r5": 83.349,
        "s2i_r10": 100.0,
        "i2s_r1": 12.05,
        "i2s_r5": 66.666,
        "i2s_r10": 7.0,
        "mean_r1": 22.69,
        "mean_r5": 75.0,
        "mean_r10": 53.5,
    }
    table = format_recall_table(results, "HuBERT+CLIP")
    for text in ("Speech→Image", "Image→Speech", "Mean", "R@1", "R@5", "R@10"):
        assert text in table
    row = [line for line in table.splitlines() if line.startswith("HuBERT+CLIP")][0]
    numbers = row.replace("|", " ").split()[1:]
    assert numbers == ["33.3", "83.3", "100.0", "12.1", "66.7", "7.0", "22.7", "75.0", "53.5"]


def test_format_rows_puts_chance_under_the_same_header_and_names_missing_keys():
    table = format_recall_rows([("model", chance_recall(10, 5)), ("chance", chance_recall(1000, 5))])
    lines = table.splitlines()
    assert lines[-2].startswith("model") and lines[-1].startswith("chance")
    assert "10.0" in lines[-2] and "0.1" in lines[-1]
    with pytest.raises(KeyError, match="i2s_r1"):
        format_recall_table({"s2i_r1": 1.0}, "x", ks=(1,))
