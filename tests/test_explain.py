"""Explanations of a (query, image) pair: Grad-CAM of the matching head, patch cosines, fusion attention.

The maps must have the patch grid's shape and lie in [0, 1]; the step-by-step multimodal forward must be
the module's own; a matching head that can only see one patch must be explained by that patch alone;
and every checkpoint kind must give the maps it can, through SpeechImageEncoder.explain.
"""

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image
from test_search import make_checkpoint
from test_search_service import HEAD

from cmd_plugin.modules.multimodal import MatchingHead, MultimodalEncoder
from cmd_plugin.retrieval.explain import (
    Explanation,
    gradcam_map,
    multimodal_forward,
    normalise,
    patch_grid,
    patch_similarity,
)


def test_normalise_and_the_patch_grid():
    values = torch.tensor([-1.0, 0.5, 2.0, 1.0])
    assert normalise(values).tolist() == [0.0, 0.25, 1.0, 0.5]
    assert normalise(torch.tensor([-1.0, -2.0])).tolist() == [0.0, 0.0]  # nothing positive: zeros
    assert patch_grid(torch.arange(9.0)).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="8 patches do not form a square grid"):
        patch_grid(torch.arange(8.0))
    e = Explanation("patch_similarity", normalise(patch_grid(torch.tensor([0.1, 0.9, 0.3, 0.2]))), 0.5)
    assert e.peak() == (0, 1) and "cosine" in e.label and e.to_dict()["image_map"] == e.image_map.tolist()
    speech, patches = torch.randn(8), torch.randn(4, 8)
    expected = [float(torch.dot(speech, p) / (speech.norm() * p.norm())) for p in patches]
    assert patch_similarity(speech, patches).tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("pool", [1, 2])
def test_the_step_by_step_forward_is_the_encoders_own(pool):
    torch.manual_seed(0)
    encoder = MultimodalEncoder(16, 12, layers=2, heads=4, ffn_dim=32, dropout=0.0, patch_pool=pool).eval()
    speech, image = torch.randn(2, 5, 16), torch.randn(2, 1 + 16, 12)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        expected = encoder(speech, mask, image)
        for layer in (0, 1):
            fused, attention = multimodal_forward(encoder, speech, mask, image, layer)
            assert torch.allclose(fused, expected, atol=1e-5)
            assert attention.shape == (2, 4, 5, 1 + 16 // pool**2)
            assert torch.allclose(attention.sum(-1), torch.ones(2, 4, 5), atol=1e-5)


def test_a_matching_head_that_sees_one_patch_is_explained_by_that_patch():
    """Every image token but patch j is zero, and zero tokens give zero keys' values (no biases,
    LayerNorm of zero is its bias, zero): the match logit depends on the attention to patch j only,
    so the map is zero at every other patch and, when attending j raises the logit, peaks at j."""
    torch.manual_seed(1)
    encoder = MultimodalEncoder(16, 12, layers=1, heads=4, ffn_dim=32, dropout=0.0).eval()
    with torch.no_grad():
        encoder.image_norm.bias.zero_()
        encoder.image_proj.bias.zero_()
        encoder.layers.layers[0].multihead_attn.in_proj_bias.zero_()
    head = MatchingHead(16)
    j = 5
    tokens = torch.zeros(1, 1 + 9, 12)
    tokens[0, 1 + j] = torch.randn(12) * 3
    speech = torch.randn(1, 4, 16)
    weight = head.proj.weight.detach().clone()
    cams = []
    for sign in (1.0, -1.0):  # the logit's gradient changes sign with the head: one of them gains from j
        with torch.no_grad():
            head.proj.weight.copy_(sign * weight)
        _, cam, _ = gradcam_map(encoder, head, speech, None, tokens)
        assert cam.shape == (9,) and torch.all(torch.cat([cam[:j], cam[j + 1 :]]) == 0) and cam[j] >= 0
        cams.append(cam)
    best = max(cams, key=lambda c: float(c[j]))
    assert float(best[j]) > 0 and int(torch.argmax(best)) == j


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_encoders):
    root = tmp_path_factory.mktemp("explain")
    rng = np.random.default_rng(0)
    wav = root / "query.wav"
    n = 16000
    sf.write(wav, (0.1 * rng.standard_normal(n) + 0.3 * np.sin(np.arange(n) * 0.03)).astype("float32"), 16000)
    image = root / "image.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    cmd, _ = make_checkpoint(str(root / "cmd" / "checkpoint_best.pt"), tiny_encoders)
    c2f, _ = make_checkpoint(str(root / "c2f" / "checkpoint_best.pt"), tiny_encoders, seed=1, **HEAD)
    return {"wav": str(wav), "image": str(image), "cmd": cmd, "c2f": c2f}


def _check(e, grid=8):
    assert e.image_map.shape == (grid, grid)
    assert float(e.image_map.min()) >= 0 and float(e.image_map.max()) == pytest.approx(1.0)
    if e.speech_saliency is not None:
        assert float(e.speech_saliency.min()) >= 0 and float(e.speech_saliency.max()) == pytest.approx(1.0)
        assert e.frame_seconds == pytest.approx(0.02)


def test_every_checkpoint_kind_gives_the_maps_it_can(pair):
    from cmd_plugin.inference import InferenceError, SpeechImageEncoder

    c2f = SpeechImageEncoder.from_checkpoint(pair["c2f"], keep_matching=True)
    maps = c2f.explain(pair["wav"], pair["image"])
    assert [e.kind for e in maps] == ["dense_similarity", "matching_gradcam", "patch_similarity"]
    for e in maps:
        _check(e)
    # the Grad-CAM's score is the pair's match logit, as the re-ranking computes it
    from cmd_plugin.search.service import embed_images_with_tokens

    with torch.no_grad():
        out = c2f.model.encode_speech_sequence(c2f.load_audio(pair["wav"])[None])
        _, tokens = embed_images_with_tokens(c2f, c2f.transform(Image.open(pair["image"]).convert("RGB"))[None])
        logit = c2f.model.match_logits(out["speech_seq"], out["speech_mask"], tokens)[0, 1]
    assert maps[1].score == pytest.approx(float(logit), abs=1e-4)
    # ... and the cosine maps' score is the pair's cosine
    emb = c2f.embed_audio([pair["wav"]])[0]
    img = c2f.embed_images([pair["image"]])[0]
    assert maps[0].score == pytest.approx(float(emb @ img), abs=1e-4) and maps[2].score == maps[0].score
    # the value-path map is the speech embedding's cosine with the tower's value-path patch tokens, a map
    # other than the plain patches' (the last block's attention mixes those with the whole image)
    pixels = c2f.transform(Image.open(pair["image"]).convert("RGB"))[None]
    _, plain_patches, dense = c2f.model.image_encoder.value_path_patches(pixels)
    expected = F.cosine_similarity(dense[0], emb[None], dim=-1).reshape(8, 8)
    assert torch.allclose(maps[0].raw, expected, atol=1e-4)
    assert not torch.allclose(dense, plain_patches, atol=1e-3)
    # speech saliency: one value per HuBERT frame (1 s: (16000 - 400) // 160 + 1 = 98, then // 2 -> 49)
    assert all(e.speech_saliency.shape == (49,) for e in maps)

    cmd = SpeechImageEncoder.from_checkpoint(pair["cmd"], keep_fusion=True)
    maps = cmd.explain(pair["wav"], pair["image"])
    assert [e.kind for e in maps] == ["dense_similarity", "patch_similarity", "fusion_attention"]
    for e in maps:
        _check(e)
    assert "coarser" in maps[2].label
    plain = SpeechImageEncoder.from_checkpoint(pair["cmd"])
    assert [e.kind for e in plain.explain(pair["wav"], pair["image"])] == ["dense_similarity", "patch_similarity"]
    # one query against several images (its states computed once): the first map only, and an
    # unreadable image kept as its error when asked
    many = c2f.explain_images(pair["wav"], [pair["image"], "/nonexistent.png"], keep_errors=True, first_only=True)
    assert [e.kind for e in many[0]] == ["dense_similarity"] and isinstance(many[1], InferenceError)
    assert torch.equal(many[0][0].image_map, c2f.explain(pair["wav"], pair["image"])[0].image_map)
    with pytest.raises(InferenceError, match="nonexistent"):
        c2f.explain_images(pair["wav"], ["/nonexistent.png"])
    # no weight of the model got a gradient, and it is back in eval mode
    assert all(p.grad is None for p in c2f.model.parameters()) and not c2f.model.training
    # a clip over the model's limit: the windows embed_audio uses, maps averaged, saliencies in turn
    rng = np.random.default_rng(1)
    long_clip = (0.1 * rng.standard_normal(16000 * 5).astype("float32"), 16000)
    windows = c2f.windows(c2f.load_audio(long_clip), "long")
    assert len(windows) >= 2
    maps = c2f.explain(long_clip, pair["image"])
    per_window = [c2f.explain((w.numpy(), 16000), pair["image"]) for w in windows]
    for kind in range(2):
        mean = torch.stack([w[kind].raw for w in per_window]).mean(0)
        assert torch.allclose(maps[kind].raw, mean, atol=1e-5) and _check(maps[kind]) is None
        assert maps[kind].score == pytest.approx(sum(w[kind].score for w in per_window) / len(windows), abs=1e-5)
        assert maps[kind].speech_saliency.shape[0] == sum(w[kind].speech_saliency.shape[0] for w in per_window)
    with pytest.raises(InferenceError, match="silent"):
        plain.explain((np.zeros(16000, dtype="float32"), 16000), pair["image"])
