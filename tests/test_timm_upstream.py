"""Image upstream on open_clip towers built on timm trunks (BLIP-2's EVA-CLIP ViT-g/14 is
open_clip's ``EVA01-g-14``: a timm ``Eva`` trunk, token pooling, the trunk's head as projection).

Tiny random models written as local open_clip JSON configs stand in for it: timm's ``test_vit``
(a 6-layer, 64-wide VisionTransformer) configured like EVA01-g-14, timm's ``test_vit2`` with
average pooling, a register token and open_clip's own linear projection, and
``eva02_tiny_patch14_224`` (timm's Eva class, EVA01-g-14's, at 224 px).
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cmd_plugin.data.image_cache import ImageFeatureCache, encoder_identity, write_image_cache
from cmd_plugin.models.clip_upstream import ClipImageUpstream, register_model_config

TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
# the vision_cfg keys of open_clip's EVA01-g-14.json, with a tiny trunk
EVA_LIKE = {
    "image_size": 64,
    "timm_model_name": "test_vit",
    "timm_model_pretrained": False,
    "timm_pool": "token",
    "timm_proj": None,
}
AVG_POOL = {
    "image_size": 64,
    "timm_model_name": "test_vit2",
    "timm_model_pretrained": False,
    "timm_pool": "avg",
    "timm_proj": "linear",
}
EVA02_TINY = {
    "image_size": 224,
    "timm_model_name": "eva02_tiny_patch14_224",
    "timm_model_pretrained": False,
    "timm_pool": "token",
    "timm_proj": None,
}


def _write_model(directory, name, vision_cfg, seed=0):
    """open_clip JSON config + weights (a saved state dict) of a random timm-based CLIP."""
    import open_clip

    os.makedirs(directory, exist_ok=True)
    config_path = os.path.join(directory, f"{name}.json")
    with open(config_path, "w") as f:
        json.dump({"embed_dim": 32, "vision_cfg": vision_cfg, "text_cfg": TEXT_CFG, "custom_text": True}, f)
    register_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    weights = os.path.join(directory, f"{name}.bin")
    torch.save(model.state_dict(), weights)
    return name, config_path, weights


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("timm_clip"))
    return {
        "eva_like": _write_model(root, "cmd-test-timm-eva-like", EVA_LIKE),
        "avg_pool": _write_model(root, "cmd-test-timm-avg", AVG_POOL, seed=1),
    }


def _reference(name, weights):
    import open_clip

    return open_clip.create_model(name, pretrained=weights).eval()


def _images(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["eva_like", "avg_pool"])
def test_timm_tower_pooled_equals_encode_image_and_stays_frozen(models, kind):
    name, config, weights = models[kind]
    upstream = ClipImageUpstream(name, pretrained=weights, model_config=config)
    assert upstream.tower == "timm" and upstream.embed_dim == 32 and upstream.num_patches == 16
    assert all(k.startswith("visual.") for k in upstream.state_dict())
    assert not any(p.requires_grad for p in upstream.parameters())
    upstream.train()
    assert not upstream.visual.training

    images = _images(3, 64)
    pooled, patches = upstream(images)
    assert pooled.shape == (3, 32) and patches.shape == (3, 16, 32)
    assert not pooled.requires_grad and not patches.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(pooled, _reference(name, weights).encode_image(images), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(patches[:, 0], patches[:, 1])
    # another weights file gives other outputs: the weights were loaded, not re-initialised
    other = _write_model(
        os.path.dirname(config), f"{name}-other", dict(EVA_LIKE if kind == "eva_like" else AVG_POOL), seed=5
    )
    assert not torch.allclose(ClipImageUpstream(other[0], other[2], other[1])(images)[0], pooled)


def test_patches_go_through_the_map_that_projects_the_pooled_token(models):
    """Token pooling (EVA01-g-14's): the CLS token mapped like the patches IS the pooled
    embedding, and each patch is the trunk's final token of its position, mapped alike."""
    name, config, weights = models["eva_like"]
    upstream = ClipImageUpstream(name, pretrained=weights, model_config=config)
    trunk = upstream.visual.trunk
    images = _images(2, 64, seed=1)
    pooled, patches = upstream(images)
    with torch.no_grad():
        tokens = trunk.forward_features(images)
        assert tokens.shape == (2, 1 + 16, 64)
        head = trunk.head  # Linear(64 -> 32), bias included: the joint-space projection
        assert isinstance(head, torch.nn.Linear) and head.out_features == 32
        torch.testing.assert_close(head(tokens[:, 0]), pooled, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(head(tokens[:, 1:]), patches, atol=1e-5, rtol=1e-4)
        # the register/CLS prefix is never a patch: with average pooling (test_vit2 has one
        # register token and no CLS) the patches are the 16 spatial tokens only
        name2, config2, weights2 = models["avg_pool"]
        avg = ClipImageUpstream(name2, pretrained=weights2, model_config=config2)
        trunk2 = avg.visual.trunk
        assert trunk2.num_prefix_tokens == 1
        tokens2 = trunk2.forward_features(images)
        expected = avg.visual.head(trunk2.fc_norm(tokens2[:, 1:]))
        torch.testing.assert_close(avg(images)[1], expected, atol=1e-5, rtol=1e-4)


def test_eva_trunk_at_224_px(tmp_path):
    """timm's Eva class (EVA01-g-14's trunk) at its own size: 16 x 16 patches of 14 px."""
    name, config, weights = _write_model(str(tmp_path), "cmd-test-eva02-tiny", EVA02_TINY)
    upstream = ClipImageUpstream(name, pretrained=weights, model_config=config)
    assert type(upstream.visual.trunk).__name__ == "Eva"
    assert upstream.num_patches == 256 and upstream.embed_dim == 32
    images = _images(2, 224)
    pooled, patches = upstream(images)
    assert patches.shape == (2, 256, 32)
    with torch.no_grad():
        torch.testing.assert_close(pooled, _reference(name, weights).encode_image(images), atol=1e-5, rtol=1e-4)
        tokens = upstream.visual.trunk.forward_features(images)
        torch.testing.assert_close(upstream.visual.trunk.head(tokens[:, 0]), pooled, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["eva_like", "avg_pool", "eva02"])
def test_timm_value_path_is_each_token_through_the_last_attention_alone(models, kind, tmp_path):
    """A token that attends to itself only: the last block's attention run on a one-token sequence,
    token by token (whatever the attention's inner layout: timm's fused qkv, Eva's separate biases and
    rotary embedding), then the trunk's norm and the same token-wise map as the plain patches."""
    if kind == "eva02":
        name, config, weights = _write_model(str(tmp_path), "cmd-test-eva02-tiny-vp", EVA02_TINY)
    else:
        name, config, weights = models[kind]
    upstream = ClipImageUpstream(name, pretrained=weights, model_config=config)
    assert upstream.has_value_path
    images = _images(2, upstream.image_size[0], seed=3)
    pooled, patches, dense = upstream.value_path_patches(images)
    plain_pooled, plain_patches = upstream(images)
    torch.testing.assert_close(pooled, plain_pooled)
    torch.testing.assert_close(patches, plain_patches)
    trunk = upstream.visual.trunk
    last = trunk.blocks[-1]
    seen = []
    handle = last.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        trunk.forward_features(images)
        handle.remove()
        x = last.norm1(seen[-1])
        alone = torch.cat([last.attn(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1)
        expected = upstream._timm_patches_to_joint(trunk.norm(alone))
    assert dense.shape == patches.shape
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(dense, patches, atol=1e-4)


def test_unsupported_timm_towers_are_refused_with_the_reason(tmp_path):
    attn_pool = {
        "image_size": 64,
        "timm_model_name": "test_vit3",
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": None,
    }
    name, config, _ = _write_model(str(tmp_path), "cmd-test-timm-map", attn_pool)
    with pytest.raises(ValueError, match="pools its tokens by attention"):
        ClipImageUpstream(name, model_config=config)
    wrong_size = dict(EVA02_TINY, image_size=112)
    name, config, _ = _write_model(str(tmp_path), "cmd-test-eva02-112", wrong_size)
    with pytest.raises(ValueError, match="built for 224x224 px.*image_size is 112x112"):
        ClipImageUpstream(name, model_config=config)


def test_timm_tower_outputs_are_cacheable(models, tmp_path):
    name, config, weights = models["eva_like"]
    upstream = ClipImageUpstream(name, pretrained=weights, model_config=config)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = str(tmp_path / f"img_{i}.png")
        Image.fromarray(rng.integers(0, 256, (50 + 9 * i, 70, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    identity = encoder_identity(name, weights, config)
    assert identity["model_config"]["vision_cfg"]["timm_model_name"] == "test_vit"
    meta = write_image_cache(str(tmp_path / "cache"), paths, upstream, identity, batch_size=2, progress=False)
    assert meta["num_patches"] == 16 and meta["embed_dim"] == 32
    cache = ImageFeatureCache(str(tmp_path / "cache"))
    cache.check_identity(identity)
    cls, patches = cache.lookup(paths)
    with torch.no_grad():
        pixels = []
        for p in paths:
            with Image.open(p) as im:
                pixels.append(upstream.preprocess(im.convert("RGB")))
        pooled, expected = upstream(torch.stack(pixels))
    for got, want in ((cls, pooled), (patches, expected)):
        assert (got - want).abs().max() <= 2e-3 * want.abs().max()
