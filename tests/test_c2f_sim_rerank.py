"""SIM multimodal encoder + matching head, and test-time re-ranking of the SIC top-K."""

import pytest
import torch
import torch.nn.functional as F

from cmd_plugin.modules.multimodal import MatchingHead, MultimodalEncoder, image_tokens, match_score
from cmd_plugin.retrieval.recall import retrieval_recall
from cmd_plugin.retrieval.rerank import rerank, reranked_recall, sic_topk, sim_split_auc, top1_changes

D, E, N = 16, 12, 5  # speech width, joint (image) width, patches


def _encoder(layers=2, seed=0):
    torch.manual_seed(seed)
    return MultimodalEncoder(D, E, layers=layers, heads=2, ffn_dim=32, dropout=0.1).eval(), MatchingHead(D).eval()


def _speech(lengths, seed=0):
    """(B, 1+T, D) sequences, padding filled with junk, and the (B, 1+T) padding mask."""
    gen = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    x = torch.randn(len(lengths), 1 + longest, D, generator=gen)
    mask = torch.zeros(len(lengths), 1 + longest, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, 1 + n :] = True
        x[i, 1 + n :] = 1e3
    return x, mask


def _images(b, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, E, generator=gen), torch.randn(b, N, E, generator=gen)


# ---- multimodal encoder ----


def test_multimodal_encoder_shapes_padding_and_depth():
    encoder, head = _encoder(layers=3)
    assert len(encoder.layers.layers) == 3
    speech, mask = _speech([4, 7, 2])
    cls, patches = _images(3)
    tokens = image_tokens(cls, patches)
    assert tokens.shape == (3, 1 + N, E) and torch.equal(tokens[:, 0], cls)
    with torch.no_grad():
        fused = encoder(speech, mask, tokens)
        assert fused.shape == (3, 8, D)
        logits = head(fused[:, 0])
        assert logits.shape == (3, 2)
        # padded frames are ignored: each item alone, unpadded, gives the same fused CLS
        for i, n in enumerate([4, 7, 2]):
            alone = encoder.fused_cls(speech[i : i + 1, : 1 + n], None, tokens[i : i + 1])
            torch.testing.assert_close(alone[0], fused[i, 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 1 layer"):
        MultimodalEncoder(D, E, layers=0)
    with pytest.raises(ValueError, match="not divisible"):
        MultimodalEncoder(D, E, heads=3)


def test_fused_cls_depends_on_the_image_cls_and_on_every_patch():
    encoder, _ = _encoder()
    speech, mask = _speech([5, 5])
    cls, patches = _images(2)
    with torch.no_grad():
        base = encoder.fused_cls(speech, mask, image_tokens(cls, patches))
        other_cls = cls.clone()
        other_cls[0] += torch.linspace(-1, 1, E)  # not a constant shift: LayerNorm removes those
        assert not torch.allclose(encoder.fused_cls(speech, mask, image_tokens(other_cls, patches))[0], base[0])
        for p in range(N):
            changed = patches.clone()
            changed[1, p] += torch.linspace(-1, 1, E)
            out = encoder.fused_cls(speech, mask, image_tokens(cls, changed))
            assert not torch.allclose(out[1], base[1]), f"patch {p} is not attended"
            torch.testing.assert_close(out[0], base[0])  # items do not mix


def test_every_multimodal_weight_gets_gradient():
    encoder, head = _encoder()
    encoder.train()
    speech, mask = _speech([3, 6])
    cls, patches = _images(2)
    loss = F.cross_entropy(head(encoder.fused_cls(speech, mask, image_tokens(cls, patches))), torch.tensor([1, 0]))
    loss.backward()
    for name, p in list(encoder.named_parameters()) + list(head.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_match_score_kinds():
    logits = torch.tensor([[0.0, 2.0], [3.0, 2.5]])
    torch.testing.assert_close(match_score(logits), torch.tensor([2.0, 2.5]))
    torch.testing.assert_close(match_score(logits, "log_prob"), torch.log_softmax(logits, 1)[:, 1])
    with pytest.raises(ValueError, match="logit"):
        match_score(logits, "prob")


# ---- re-ranking ----

NUM_IMAGES, CAPTIONS = 9, 3


def _retrieval_set(seed=0):
    gen = torch.Generator().manual_seed(seed)
    image_ids = torch.arange(NUM_IMAGES).repeat_interleave(CAPTIONS)
    image_emb = F.normalize(torch.randn(NUM_IMAGES, 8, generator=gen), dim=-1)
    speech_emb = F.normalize(image_emb[image_ids] + 0.9 * torch.randn(len(image_ids), 8, generator=gen), dim=-1)
    sim = torch.randn(len(image_ids), NUM_IMAGES, generator=gen)  # stands in for SIM(u, j)
    return speech_emb, image_emb, image_ids, sim


class _Scorer:
    def __init__(self, table):
        self.table, self.calls, self.pairs = table, [], []

    def __call__(self, speech_index, image_index):
        self.calls.append(len(speech_index))
        self.pairs += list(zip(speech_index.tolist(), image_index.tolist()))
        return self.table[speech_index, image_index]


def _brute_force_recall(speech_emb, image_emb, image_ids, sim, k_candidates, weight, ks):
    """Per query: sort by SIC, keep K, re-sort by the new score with ties AGAINST the right
    answer, and find the first right answer."""
    sic = speech_emb @ image_emb.T
    s2i_hits, i2s_hits = {k: 0 for k in ks}, {k: 0 for k in ks}
    for u in range(len(image_ids)):
        order = sorted(range(NUM_IMAGES), key=lambda j: -float(sic[u, j]))[:k_candidates]
        score = {j: float(sim[u, j]) + weight * float(sic[u, j]) for j in order}
        ranked = sorted(order, key=lambda j: (-score[j], j == int(image_ids[u])))
        if int(image_ids[u]) in ranked:
            pos = ranked.index(int(image_ids[u]))
            for k in ks:
                s2i_hits[k] += pos < k
    for j in range(NUM_IMAGES):
        order = sorted(range(len(image_ids)), key=lambda u: -float(sic[u, j]))[:k_candidates]
        score = {u: float(sim[u, j]) + weight * float(sic[u, j]) for u in order}
        ranked = sorted(order, key=lambda u: (-score[u], int(image_ids[u]) == j))
        firsts = [pos for pos, u in enumerate(ranked) if int(image_ids[u]) == j]
        if firsts:
            for k in ks:
                i2s_hits[k] += firsts[0] < k
    return s2i_hits, i2s_hits


@pytest.mark.parametrize(
    "k, weight, ties",
    [
        (4, 0.0, False),
        (7, 0.0, False),
        (4, 1.0, False),
        (7, 1.0, False),
        (7, 14.3, False),
        (4, 0.0, True),
        (7, 0.0, True),
    ],
)
def test_reranked_recall_matches_a_brute_force_reference(k, weight, ties):
    speech_emb, image_emb, image_ids, sim = _retrieval_set()
    if ties:  # SIM scores in {0, 1, 2}: ties must never favour the right answer
        sim = (sim.abs() * 1.5).floor().clamp(max=2)
    ks = (1, 2, k)
    result = rerank(speech_emb, image_emb, _Scorer(sim), k, sic_weight=weight, pair_batch=5)
    got = reranked_recall(result, image_ids, ks)
    s2i_hits, i2s_hits = _brute_force_recall(speech_emb, image_emb, image_ids, sim, k, weight, ks)
    for kk in ks:
        assert got[f"s2i_hits_r{kk}"] == s2i_hits[kk], kk
        assert got[f"i2s_hits_r{kk}"] == i2s_hits[kk], kk
    # the re-ranking changed something, so the comparison above is not SIC against SIC
    plain = retrieval_recall(speech_emb, image_emb, image_ids, ks=ks)
    assert any(got[f"s2i_hits_r{kk}"] != plain[f"s2i_hits_r{kk}"] for kk in ks[:2]) or any(
        got[f"i2s_hits_r{kk}"] != plain[f"i2s_hits_r{kk}"] for kk in ks[:2]
    )


def _rescored_by_sic_equals_sic_recall(speech_emb, image_emb, image_ids, k, ks):
    """Re-rank with SIC itself as the score: the re-ranked recall must equal SIC recall."""
    result = rerank(speech_emb, image_emb, _Scorer(speech_emb @ image_emb.T), k)
    got = reranked_recall(result, image_ids, ks)
    for key, value in retrieval_recall(speech_emb, image_emb, image_ids, ks=ks).items():
        assert got[key] == value, key
    return result


def test_rescoring_by_sic_itself_reproduces_sic_recall():
    speech_emb, image_emb, image_ids, _ = _retrieval_set(seed=3)
    result = _rescored_by_sic_equals_sic_recall(speech_emb, image_emb, image_ids, 5, (1, 3, 5))
    with pytest.raises(ValueError, match="k <= K = 5"):
        reranked_recall(result, image_ids, (1, 10))


def test_k_is_checked_per_direction_with_fewer_images_than_k():
    """4 images, 12 utterances, K = 10: speech -> image lists every image (any k defined), image ->
    speech lists 10 of 12 (k <= 10 defined); both equal SIC recall when SIC itself re-scores."""
    gen = torch.Generator().manual_seed(5)
    image_ids = torch.arange(4).repeat_interleave(3)
    image_emb = F.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    speech_emb = F.normalize(image_emb[image_ids] + 1.5 * torch.randn(12, 8, generator=gen), dim=-1)
    result = _rescored_by_sic_equals_sic_recall(speech_emb, image_emb, image_ids, 10, (1, 5, 10))
    with pytest.raises(ValueError, match="image -> speech recall is defined for k <= K = 10"):
        reranked_recall(result, image_ids, (1, 11))


def test_each_distinct_pair_is_scored_once_in_batches_sorted_by_utterance():
    speech_emb, image_emb, image_ids, sim = _retrieval_set()
    scorer = _Scorer(sim)
    result = rerank(speech_emb, image_emb, scorer, 4, pair_batch=7)
    assert max(scorer.calls) <= 7
    assert len(scorer.pairs) == len(set(scorer.pairs)) == result.num_pairs
    assert scorer.pairs == sorted(scorer.pairs)
    _, s2i_index, _, i2s_index = sic_topk(speech_emb, image_emb, 4)
    wanted = {(u, int(j)) for u in range(len(image_ids)) for j in s2i_index[u]}
    wanted |= {(int(u), j) for j in range(NUM_IMAGES) for u in i2s_index[j]}
    assert set(scorer.pairs) == wanted


def test_sim_head_on_top_k_with_k_all_equals_full_sim_scoring():
    """K = all candidates: re-ranking scores equal the multimodal encoder + head run on every
    (utterance, image) pair at once, in both directions."""
    speech_emb, image_emb, image_ids, _ = _retrieval_set()
    encoder, head = _encoder(layers=2, seed=4)
    num_speech = len(image_ids)
    lengths = [3 + (u % 4) for u in range(num_speech)]
    sequences, masks = _speech(lengths, seed=5)
    cls, patches = _images(NUM_IMAGES, seed=6)
    tokens = image_tokens(cls, patches)

    def pair_score(speech_index, image_index):
        return match_score(head(encoder.fused_cls(sequences[speech_index], masks[speech_index], tokens[image_index])))

    with torch.no_grad():
        every_u = torch.arange(num_speech).repeat_interleave(NUM_IMAGES)
        every_j = torch.arange(NUM_IMAGES).repeat(num_speech)
        full = pair_score(every_u, every_j).view(num_speech, NUM_IMAGES)
    for weight in (0.0, 1.0, 14.3):
        result = rerank(speech_emb, image_emb, pair_score, num_speech, sic_weight=weight, pair_batch=16)
        s2i, i2s = result.dense()
        expected = full + weight * (speech_emb @ image_emb.T)
        torch.testing.assert_close(s2i, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(i2s, expected.T, atol=1e-5, rtol=1e-5)


def test_sim_learns_to_tell_pairs_from_negatives_on_a_synthetic_task():
    """The mechanism SIM relies on: a speech frame somewhere in the sequence carries a class, one
    patch somewhere in the image carries a class, and "match" means the classes agree. Neither
    the speech CLS nor the image CLS carries it, so only cross-attention from the speech
    sequence to the patches can solve it. A few hundred steps of a 2-layer encoder + head must (the
    recipes' depth; a single layer, where the CLS must find its code and query the patches in one
    pass, reached 73 % after 1,000 steps, measured with this task). The trajectory depends on the
    thread count (summation order): after 400 steps one thread gave 88 %, two 92 %; 700 steps and
    8 scored batches leave both well clear of the bar."""
    classes, length, bsz = 6, 6, 48
    gen = torch.Generator().manual_seed(0)
    speech_codes, image_codes = torch.randn(classes, D, generator=gen), torch.randn(classes, E, generator=gen)

    def batch():
        speech_cls = torch.randint(classes, (bsz,), generator=gen)
        match = torch.rand(bsz, generator=gen) < 0.5
        other = (speech_cls + torch.randint(1, classes, (bsz,), generator=gen)) % classes
        image_cls = torch.where(match, speech_cls, other)
        speech = 0.3 * torch.randn(bsz, 1 + length, D, generator=gen)
        patches = 0.3 * torch.randn(bsz, N, E, generator=gen)
        rows = torch.arange(bsz)
        speech[rows, 1 + torch.randint(length, (bsz,), generator=gen)] += 2 * speech_codes[speech_cls]
        patches[rows, torch.randint(N, (bsz,), generator=gen)] += 2 * image_codes[image_cls]
        tokens = image_tokens(0.3 * torch.randn(bsz, E, generator=gen), patches)
        return speech, tokens, match.long()

    torch.manual_seed(0)
    encoder = MultimodalEncoder(D, E, layers=2, heads=2, ffn_dim=32, dropout=0.0)
    head = MatchingHead(D)
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(head.parameters()), lr=3e-3)

    def accuracy():
        with torch.no_grad():
            speech, tokens, labels = batch()
            return float((head(encoder.fused_cls(speech, None, tokens)).argmax(1) == labels).float().mean())

    before = accuracy()
    for _ in range(700):
        speech, tokens, labels = batch()
        loss = F.cross_entropy(head(encoder.fused_cls(speech, None, tokens)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = sum(accuracy() for _ in range(8)) / 8
    assert before < 0.7 and after > 0.9, (before, after)


def test_patch_grid_pooling_is_block_averaging_and_keeps_the_cls():
    from cmd_plugin.modules.multimodal import pool_patch_grid

    tokens = torch.randn(2, 1 + 16, 3)
    pooled = pool_patch_grid(tokens, 2)
    grid = tokens[:, 1:].reshape(2, 4, 4, 3).permute(0, 3, 1, 2)
    reference = F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(2, 4, 3)
    assert torch.equal(pooled[:, 0], tokens[:, 0]) and torch.allclose(pooled[:, 1:], reference, atol=1e-6)
    with pytest.raises(ValueError, match="square grid"):
        pool_patch_grid(torch.randn(1, 1 + 12, 3), 2)


def test_speech_summary_ignores_padding_and_scores_pairs_as_per_pair_summaries_would():
    from cmd_plugin.modules.multimodal import MatchingHead, MultimodalEncoder

    torch.manual_seed(0)
    enc = MultimodalEncoder(16, 8, layers=1, heads=2, ffn_dim=32, dropout=0.0, speech_tokens=4, patch_pool=2).eval()
    head = MatchingHead(16)
    seq = torch.randn(1, 1 + 6, 16)
    padded = torch.cat([seq, 50 * torch.randn(1, 3, 16)], dim=1)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[:, 7:] = True
    with torch.no_grad():
        short, _ = enc.summary(seq, None)
        long, long_mask = enc.summary(padded, mask)
        assert short.shape == (1, 5, 16) and long_mask is None
        assert torch.allclose(short, long, atol=1e-5)
        # summarised once and indexed per pair == summarised for every pair
        images = torch.randn(3, 1 + 16, 8)
        once = head(enc.fused_cls(short.expand(3, -1, -1), None, images))
        per_pair = torch.cat(
            [head(enc.fused_cls(enc.summary(seq, None)[0], None, images[i : i + 1])) for i in range(3)]
        )
    assert torch.allclose(once, per_pair, atol=1e-5)


def test_top1_changes_account_for_the_change_in_r1_and_vanish_when_sic_rescores_itself():
    speech_emb, image_emb, image_ids, sim = _retrieval_set()
    result = rerank(speech_emb, image_emb, _Scorer(sim), 5)
    ch = top1_changes(result, image_ids)
    plain = retrieval_recall(speech_emb, image_emb, image_ids, ks=(1,))
    got = reranked_recall(result, image_ids, (1,))
    for d in ("s2i", "i2s"):  # random SIM scores: no ties, so first answers and R@1 hits agree
        assert ch[f"{d}_kept_right"] + ch[f"{d}_broken"] == plain[f"{d}_hits_r1"]
        assert ch[f"{d}_kept_right"] + ch[f"{d}_fixed"] == got[f"{d}_hits_r1"]
    assert ch["s2i_fixed"] + ch["s2i_broken"] > 0  # random scores do move first answers
    assert sum(ch[f"s2i_{k}"] for k in ("fixed", "broken", "kept_right", "kept_wrong")) == len(image_ids)
    same = top1_changes(rerank(speech_emb, image_emb, _Scorer(speech_emb @ image_emb.T), 5), image_ids)
    assert same["s2i_fixed"] == same["s2i_broken"] == same["i2s_fixed"] == same["i2s_broken"] == 0


def test_split_auc_of_the_head_and_of_sic_on_the_same_pairs():
    speech_emb, image_emb, image_ids, _ = _retrieval_set(seed=2)
    sic = speech_emb @ image_emb.T
    # the SIC cosine as the "head": both AUCs are the same numbers
    out = sim_split_auc(speech_emb, image_emb, image_ids, _Scorer(sic), torch.Generator().manual_seed(0))
    assert out["auc_hard"] == pytest.approx(out["sic_auc_hard"]) and out["auc_random"] == pytest.approx(
        out["sic_auc_random"]
    )
    assert out["sic_auc_hard"] < out["sic_auc_random"] < 1.0  # hardest negatives are harder than random ones
    # a head that knows every pair: AUC 1 against either kind, whatever SIC says
    oracle = (image_ids[:, None] == torch.arange(NUM_IMAGES)[None, :]).float()
    out = sim_split_auc(speech_emb, image_emb, image_ids, _Scorer(oracle), torch.Generator().manual_seed(0))
    assert out["auc_hard"] == out["auc_random"] == 1.0 and out["sic_auc_hard"] < 1.0


def test_score_kinds_weigh_the_sic_cosine_by_nothing_one_or_the_inverse_temperature():
    from cmd_plugin.retrieval.rerank import RERANK_SCORES, sic_weight

    assert [sic_weight(s, 20.0) for s in RERANK_SCORES] == [0.0, 1.0, 20.0]
    with pytest.raises(ValueError, match="one of"):
        sic_weight("sic")
