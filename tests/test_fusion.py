"""The fusion encoder's attention: variants, statistics, and the mechanism CMD relies on (the speech
query steers the pooling onto the patch that carries what it asks for)."""

import math

import pytest
import torch
import torch.nn.functional as F

from cmd_plugin.modules.fusion import FUSION_ATTENTION_CHOICES, FusionEncoder, attention_statistics, diagonal_pairs
from cmd_plugin.objectives.cmd.noise import apply_patch_noise, draw_patch_noise
from cmd_plugin.objectives.sic import symmetric_infonce


@pytest.mark.parametrize("variant", FUSION_ATTENTION_CHOICES)
def test_paired_fusion_equals_the_diagonal_of_all_pairs(variant):
    torch.manual_seed(0)
    fusion = FusionEncoder(16, attention=variant)
    queries, patches = torch.randn(5, 16), torch.randn(5, 7, 16)
    all_out, all_attn = fusion(queries, patches, all_pairs=True, return_attention=True)
    own_out, own_attn = fusion(queries, patches, all_pairs=False, return_attention=True)
    assert all_out.shape == (5, 5, 16) and all_attn.shape == (5, 5, 7)
    diag_attn, diag_out = diagonal_pairs(all_attn, all_out)
    torch.testing.assert_close(diag_attn, own_attn)
    torch.testing.assert_close(diag_out, own_out)
    torch.testing.assert_close(own_attn.sum(-1), torch.ones(5))


def test_variant_parameter_counts():
    dim = 768
    counts = {v: sum(p.numel() for p in FusionEncoder(dim, attention=v).parameters()) for v in FUSION_ATTENTION_CHOICES}
    base = dim * dim + dim + 2 * dim  # FC + LayerNorm (the paper's Table 1)
    assert counts == {
        "literal": base,
        "cosine": base + 1,
        "qkv": base + 3 * dim * dim + 2 * dim,
        "uniform": base + dim * dim + dim,
    }  # qkv's value projection, no query/key
    with pytest.raises(ValueError, match="fusion attention must be one of"):
        FusionEncoder(dim, attention="dot")


def test_literal_pooling_is_near_uniform_at_vit_l_sizes_and_cosine_is_not():
    """The defect the cosine variant fixes: a unit-norm query over patches of ViT-like norms."""
    torch.manual_seed(0)
    dim, n = 768, 256
    patches = torch.randn(1, n, dim)  # norm ≈ 27.7
    query = F.normalize(patches[0, 3] + 0.1 * torch.randn(dim), dim=0)[None]  # points at patch 3
    for variant, uniform in (("literal", True), ("cosine", False)):
        _, attn = FusionEncoder(dim, attention=variant)(query, patches, all_pairs=False, return_attention=True)
        stats = attention_statistics(attn, torch.ones(1, dim), torch.ones(1, dim))
        if uniform:
            assert float(attn.max()) < 3.0 / n and float(stats["attn_entropy"]) > 0.99
        else:
            assert int(attn.argmax()) == 3 and float(attn.detach().max()) > 0.5


def test_attention_statistics_of_uniform_and_one_hot_attention():
    n = 8
    uniform = torch.full((2, n), 1.0 / n)
    one_hot = F.one_hot(torch.tensor([1, 4]), n).float()
    recon = torch.randn(2, 5)
    u = attention_statistics(uniform, recon, recon)
    o = attention_statistics(one_hot, recon, -recon)
    assert float(u["attn_entropy"]) == pytest.approx(2.0) and float(u["attn_max"]) == pytest.approx(2.0 / n)
    assert float(o["attn_entropy"]) == pytest.approx(0.0, abs=1e-6) and float(o["attn_max"]) == pytest.approx(2.0)
    assert float(u["attn_cos_mean_pool"]) == pytest.approx(2.0) and float(o["attn_cos_mean_pool"]) == pytest.approx(
        -2.0
    )


def _train_on_one_informative_patch(variant, steps=400, seed=0):
    """Synthetic CMD: every image has N patches of clutter (shared across classes) and exactly one
    patch, at a random position, that shows its class; a learnable query per class stands in for
    the speech encoder. L_cmd (all pairs, 30 % patch noise) is the only loss.
    Returns the mean attention weight on the informative patch, before and after training."""
    gen = torch.Generator().manual_seed(seed)
    dim, num_patches, num_classes, batch = 64, 16, 8, 16
    clutter_bank = torch.randn(64, dim, generator=gen)  # norm ≈ 8 = √E: |literal logit| ≤ 1
    class_patch = torch.randn(num_classes, dim, generator=gen)

    def make_batch(g):
        classes = torch.randperm(num_classes, generator=g)[: batch // 2].repeat(2)  # 2 captions per image
        patches = clutter_bank[torch.randint(0, 64, (batch, num_patches), generator=g)]
        where = torch.randint(0, num_patches, (batch,), generator=g)
        patches[torch.arange(batch), where] = class_patch[classes]
        return classes, patches, where

    torch.manual_seed(seed)
    fusion = FusionEncoder(dim, attention=variant)
    queries = torch.nn.Parameter(torch.randn(num_classes, dim) * 0.1)
    logit_scale = torch.tensor(1 / 0.07)
    opt = torch.optim.Adam(list(fusion.parameters()) + [queries], lr=1e-2)

    def informative_mass(g):
        with torch.no_grad():
            classes, patches, where = make_batch(g)
            _, attn = fusion(F.normalize(queries[classes], dim=-1), patches, all_pairs=False, return_attention=True)
            return float(attn[torch.arange(batch), where].mean())

    before = informative_mass(torch.Generator().manual_seed(99))
    for step in range(steps):
        classes, patches, _ = make_batch(gen)
        positions, sources = draw_patch_noise(classes, num_patches, 0.3, gen)
        noisy = apply_patch_noise(patches, positions, sources)
        speech = F.normalize(queries[classes], dim=-1)
        recon = F.normalize(fusion(speech, noisy, all_pairs=True), dim=-1)
        scores = torch.einsum("ie,ije->ij", speech, recon)
        loss, _, _ = symmetric_infonce(scores, classes, classes, logit_scale)
        opt.zero_grad()
        (loss / batch).backward()
        opt.step()
    return before, informative_mass(torch.Generator().manual_seed(99))


@pytest.mark.parametrize("variant", ["cosine", "qkv"])
def test_cmd_drives_the_attention_onto_the_patch_the_query_asks_for(variant):
    before, after = _train_on_one_informative_patch(variant)
    assert before < 0.2  # 1/16 = 0.0625 is uniform
    assert after > 0.5, f"{variant}: mean attention on the informative patch {before:.3f} -> {after:.3f}"


def test_uniform_control_pools_every_patch_alike_whatever_the_query():
    torch.manual_seed(0)
    fusion = FusionEncoder(16, attention="uniform")
    patches = torch.randn(3, 7, 16)
    out, attn = fusion(torch.randn(3, 16), patches, all_pairs=True, return_attention=True)
    torch.testing.assert_close(attn, torch.full((3, 3, 7), 1 / 7))
    torch.testing.assert_close(out[0], out[2])  # the query changes nothing
    torch.testing.assert_close(out[0], fusion.mean_pooled(patches))
    before, after = _train_on_one_informative_patch("uniform")
    assert math.isclose(before, 1 / 16, abs_tol=1e-6) and math.isclose(after, 1 / 16, abs_tol=1e-6)


def test_literal_fusion_cannot_learn_to_attend():
    """The paper's Eq. 1 read literally (unit-norm S_cls, no projections, 1/sqrt(E)): logits are
    bounded by |patch| / sqrt(E), so the same training leaves the pooling near-uniform."""
    before, after = _train_on_one_informative_patch("literal")
    assert after < 0.2, f"literal: {before:.3f} -> {after:.3f}"
    assert math.isclose(before, 1 / 16, abs_tol=0.05)
