"""Frozen upstreams: fairseq HuBERT (all hidden states) and the open_clip image tower.

Tiny random encoders in the released formats stand in for HuBERT-Large and ViT-L/14.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from cmd_demo.tiny_encoders import TINY_HUBERT_LAYERS, make_tiny_clip, make_tiny_hubert
from cmd_plugin import compat
from cmd_plugin.models.clip_upstream import ClipImageUpstream
from cmd_plugin.models.hubert_upstream import HubertUpstream

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_encoders")


@pytest.fixture(scope="session")
def hubert_path(encoder_dir):
    return make_tiny_hubert(str(encoder_dir / "tiny_hubert.pt"), seed=0, normalize=True)


@pytest.fixture(scope="session")
def hubert_raw_path(encoder_dir):
    return make_tiny_hubert(str(encoder_dir / "tiny_hubert_raw.pt"), seed=1, normalize=False)


@pytest.fixture(scope="session")
def tiny_clip(encoder_dir):
    return make_tiny_clip(str(encoder_dir / "tiny_clip"), seed=0)


def _load_raw_checkpoint(path):
    from fairseq.data.dictionary import Dictionary

    with compat.safe_globals([Dictionary]):
        return torch.load(path, map_location="cpu")


def _padded_batch(lengths, seed=0):
    """Waveforms of different lengths, padded with non-zero junk to prove it is ignored."""
    gen = torch.Generator().manual_seed(seed)
    wavs = [0.3 * torch.randn(n, generator=gen) + 0.05 for n in lengths]
    total = max(lengths)
    source = torch.full((len(lengths), total), 7.0)
    padding_mask = torch.ones(len(lengths), total, dtype=torch.bool)
    for i, wav in enumerate(wavs):
        source[i, : len(wav)] = wav
        padding_mask[i, : len(wav)] = False
    return wavs, source, padding_mask


# ----------------------------------------------------------------------------- HuBERT


def test_tiny_hubert_checkpoint_has_release_layout(hubert_path, tmp_path, monkeypatch):
    from fairseq import checkpoint_utils
    from fairseq.data.dictionary import Dictionary
    from fairseq.models.hubert.hubert import HubertModel

    state = _load_raw_checkpoint(hubert_path)
    assert {"args", "cfg", "model", "task_state", "optimizer_history", "extra_state"} <= set(state)
    assert state["args"] is None
    cfg = state["cfg"]
    assert type(cfg) is dict and type(cfg["model"]) is dict and type(cfg["task"]) is dict
    assert cfg["model"]["_name"] == "hubert"
    assert cfg["model"]["extractor_mode"] == "layer_norm" and cfg["model"]["layer_norm_first"]
    assert cfg["task"]["_name"] == "hubert_pretraining"
    assert cfg["task"]["normalize"] is True and cfg["task"]["sample_rate"] == 16000
    assert cfg["model"]["label_rate"] == cfg["task"]["label_rate"] == 50.0  # interpolation resolved
    dictionaries = state["task_state"]["dictionaries"]
    assert len(dictionaries) == 1 and isinstance(dictionaries[0], Dictionary)
    # like the released checkpoints, the label directory named in cfg does not exist
    assert not os.path.exists(cfg["task"]["label_dir"])

    monkeypatch.chdir(tmp_path)
    with compat.safe_globals([Dictionary]):
        models, loaded_cfg, task = checkpoint_utils.load_model_ensemble_and_task([hubert_path])
    assert isinstance(models[0], HubertModel)
    assert len(models[0].encoder.layers) == TINY_HUBERT_LAYERS
    assert task.cfg.normalize is True


def test_hubert_upstream_attributes_and_eval_mode(hubert_path):
    upstream = HubertUpstream(hubert_path)
    assert upstream.normalize is True
    assert upstream.sample_rate == 16000
    assert upstream.num_states == TINY_HUBERT_LAYERS + 1
    assert upstream.embed_dim == 64
    assert not any(p.requires_grad for p in upstream.parameters())
    # the tiny checkpoint has no dropout: give it some (as fine-tuning configs do), so that only
    # eval mode can make two passes agree
    for module in upstream.model.modules():
        if isinstance(module, torch.nn.Dropout) or type(module).__name__ == "FairseqDropout":
            module.p = 0.5
    upstream.model.encoder.layerdrop = 0.5
    upstream.train()  # fairseq's trainer does this every step
    assert not upstream.model.training
    # 1 s of audio at 16 kHz -> 49 frames at 50 Hz
    wav = torch.randn(1, 16000)
    states, frame_mask = upstream(wav)
    assert states.shape == (upstream.num_states, 1, 49, 64)
    assert frame_mask is None
    # no dropout / layer-drop although train() was called
    again, _ = upstream(wav)
    assert torch.equal(again, states)


def _fairseq_reference_states(model, wav, layer_states):
    """HuBERT states of one unpadded utterance from fairseq's own calls (the definitions in
    HubertUpstream.forward), frames-first (L+1, T', D)."""
    num_layers = len(model.encoder.layers)
    layers = [model.extract_features(wav, mask=False, output_layer=k)[0][0] for k in range(1, num_layers + 1)]
    if layer_states == "cnn_and_layers":
        first = model(wav, mask=False, features_only=True)["features"][0]
        return [first] + layers
    # SUPERB / s3prl: the input of the first transformer layer (a hook, as s3prl takes it), the
    # layer outputs, and the encoder's output (extract_features without output_layer)
    seen = {}

    def keep_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["x"]

    hook = model.encoder.layers[0].register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        final = model.extract_features(wav, mask=False)[0][0]
    finally:
        hook.remove()
    # the encoder pads time to a multiple of required_seq_len_multiple before its layers
    return [seen["x"][: final.size(0), 0]] + layers[:-1] + [final]


@pytest.mark.parametrize("layer_states", ["superb", "cnn_and_layers"])
def test_hubert_states_equal_fairseq_calls_per_layer(hubert_path, layer_states):
    upstream = HubertUpstream(hubert_path, layer_states=layer_states)
    model = upstream.model
    assert model.encoder.layer_norm_first  # as HuBERT-Large: the final LayerNorm matters
    lengths = [16000, 10500, 4000]
    wavs, source, padding_mask = _padded_batch(lengths)

    states, frame_mask = upstream(source, padding_mask)
    assert frame_mask.shape == states.shape[1:3]
    assert not frame_mask[0].any() and frame_mask[1].any() and frame_mask[2].any()

    with torch.no_grad():
        for i, wav in enumerate(wavs):
            # what fairseq's audio dataset feeds HuBERT with normalize=True: the waveform layer-normed
            normed = F.layer_norm(wav, wav.shape)[None]
            n = int((~frame_mask[i]).sum())
            expected = _fairseq_reference_states(model, normed, layer_states)
            assert len(expected) == upstream.num_states == TINY_HUBERT_LAYERS + 1
            for k, state in enumerate(expected):
                assert state.size(0) == n, "frame count differs from the utterance alone"
                torch.testing.assert_close(states[k, i, :n], state, atol=ATOL, rtol=1e-4)

        # the unpadded utterance alone gives the same states as in the batch, with no mask
        alone, alone_mask = upstream(wavs[0][None])
        assert alone_mask is None
        torch.testing.assert_close(alone[:, 0], states[:, 0], atol=ATOL, rtol=1e-4)
    # the two definitions differ exactly at the first and the last state
    other = HubertUpstream(hubert_path, layer_states="cnn_and_layers" if layer_states == "superb" else "superb")
    other_states, _ = other(source, padding_mask)
    differs = [not torch.allclose(a, b, atol=1e-4) for a, b in zip(states, other_states)]
    assert differs == [True] + [False] * (TINY_HUBERT_LAYERS - 1) + [True]


def test_hubert_without_normalize_feeds_the_raw_waveform(hubert_raw_path):
    upstream = HubertUpstream(hubert_raw_path)
    assert upstream.normalize is False
    wavs, source, padding_mask = _padded_batch([12000, 16000], seed=3)
    source = source.masked_fill(padding_mask, 0.0)  # what a collater gives
    states, frame_mask = upstream(source, padding_mask)
    with torch.no_grad():
        for i, wav in enumerate(wavs):
            n = int((~frame_mask[i]).sum())
            for k, expected in enumerate(_fairseq_reference_states(upstream.model, wav[None], "superb")):
                torch.testing.assert_close(states[k, i, :n], expected, atol=ATOL, rtol=1e-4)


def test_hubert_upstream_rejects_bad_checkpoints(hubert_path, tmp_path):
    missing = str(tmp_path / "no_such_hubert.pt")
    with pytest.raises(FileNotFoundError, match="no_such_hubert.pt"):
        HubertUpstream(missing)

    state = _load_raw_checkpoint(hubert_path)
    wav2vec = dict(state, cfg=dict(state["cfg"], model=dict(state["cfg"]["model"], _name="wav2vec2")))
    path = str(tmp_path / "wav2vec.pt")
    torch.save(wav2vec, path)
    with pytest.raises(ValueError, match="wav2vec.pt.*not a HuBERT"):
        HubertUpstream(path)

    no_cfg = dict(state, cfg=None)
    path = str(tmp_path / "no_cfg.pt")
    torch.save(no_cfg, path)
    with pytest.raises(ValueError, match="no_cfg.pt"):
        HubertUpstream(path)

    plain = str(tmp_path / "plain_state_dict.pt")
    torch.save(state["model"], plain)
    with pytest.raises(ValueError, match="plain_state_dict.pt"):
        HubertUpstream(plain)

    eight_khz = dict(state, cfg=dict(state["cfg"], task=dict(state["cfg"]["task"], sample_rate=8000)))
    path = str(tmp_path / "eight_khz.pt")
    torch.save(eight_khz, path)
    with pytest.raises(ValueError, match="eight_khz.pt.*8000"):
        HubertUpstream(path)


# ----------------------------------------------------------------------------- CLIP


def _reference_clip(model_name, weights_path):
    import open_clip

    model = open_clip.create_model(model_name, pretrained=weights_path)
    return model.eval()


def test_clip_pooled_equals_open_clip_encode_image(tiny_clip):
    model_name, config_path, weights_path = tiny_clip
    upstream = ClipImageUpstream(model_name, pretrained=weights_path, model_config=config_path)
    assert upstream.embed_dim == 32 and upstream.num_patches == 64
    assert all(name.startswith("visual.") for name in upstream.state_dict())  # text tower dropped
    upstream.train()
    assert not upstream.visual.training

    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pooled, patches = upstream(images)
    reference = _reference_clip(model_name, weights_path)
    with torch.no_grad():
        torch.testing.assert_close(pooled, reference.encode_image(images), atol=ATOL, rtol=1e-4)
        reference.visual.output_tokens = True
        _, tokens = reference.visual(images)
        assert tokens.shape == (3, 64, 64)
        torch.testing.assert_close(patches, tokens @ reference.visual.proj, atol=ATOL, rtol=1e-4)
    assert patches.shape == (3, 64, 32)
    assert not torch.allclose(patches[:, 0], patches[:, 1])


def test_clip_value_path_patches_are_maskclips_dense_features(tiny_clip):
    """The value path written out as MaskCLIP does: the last block's input, ln_1, the value slice of the
    in-projection, the output projection, then ln_post and the joint-space projection (no residual, no
    MLP); the pooled embedding and the plain patches come from the same single run."""
    import torch.nn.functional as F

    model_name, config_path, weights_path = tiny_clip
    upstream = ClipImageUpstream(model_name, pretrained=weights_path, model_config=config_path)
    assert upstream.has_value_path
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    pooled, patches, dense = upstream.value_path_patches(images)
    plain_pooled, plain_patches = upstream(images)
    torch.testing.assert_close(pooled, plain_pooled)
    torch.testing.assert_close(patches, plain_patches)
    visual = upstream.visual
    blocks = visual.transformer.resblocks
    with torch.no_grad():
        x = visual._embeds(images)
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1]
        width = x.shape[-1]
        values = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * width :], last.attn.in_proj_bias[2 * width :])
        expected = visual.ln_post(last.attn.out_proj(values))[:, 1:] @ visual.proj
    assert dense.shape == (2, 64, 32)
    torch.testing.assert_close(dense, expected, atol=ATOL, rtol=1e-4)
    assert not torch.allclose(dense, patches, atol=1e-3)
    assert all(p.grad is None for p in upstream.parameters())


def test_clip_weights_round_trip_and_preprocess(tiny_clip):
    from PIL import Image

    model_name, config_path, weights_path = tiny_clip
    first = ClipImageUpstream(model_name, pretrained=weights_path, model_config=config_path)
    second = ClipImageUpstream(model_name, pretrained=weights_path, model_config=config_path)
    torch.manual_seed(123)
    random_init = ClipImageUpstream(model_name, pretrained="", model_config=config_path)

    image = Image.new("RGB", (80, 50), color=(200, 30, 90))
    pixels = first.preprocess(image)
    assert pixels.shape == (3, 64, 64)
    images = torch.stack([pixels, torch.randn(3, 64, 64)])
    for a, b in zip(first(images), second(images)):
        assert torch.equal(a, b)
    assert not torch.allclose(first(images)[0], random_init(images)[0])


def test_clip_missing_weights_file_is_an_error_naming_it(tiny_clip, tmp_path):
    model_name, config_path, _ = tiny_clip
    missing = str(tmp_path / "no_such_open_clip_model.bin")
    with pytest.raises(FileNotFoundError, match="no_such_open_clip_model.bin"):
        ClipImageUpstream(model_name, pretrained=missing, model_config=config_path)
    # a pretrained *tag* would make open_clip download: refused as a missing file too
    with pytest.raises(FileNotFoundError, match="openai"):
        ClipImageUpstream("ViT-B-32-quickgelu", pretrained="openai")


# ----------------------------------------------------------------------------- CLI


def test_make_tiny_encoders_cli_writes_both_encoders(tmp_path, monkeypatch, capsys):
    import importlib.util

    # in-process: a subprocess would pay ~20 s of fairseq/open_clip imports again
    spec = importlib.util.spec_from_file_location(
        "make_tiny_encoders", os.path.join(REPO_ROOT, "examples", "make_tiny_encoders.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.chdir(tmp_path)
    cli.main(["--out-dir", "encoders", "--seed", "2"])
    out_dir = tmp_path / "encoders"
    printed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines() if "=" in line)
    assert printed["hubert_checkpoint"] == str(out_dir / "tiny_hubert.pt")
    upstream = HubertUpstream(printed["hubert_checkpoint"])
    assert upstream.normalize is True
    assert printed["clip_pretrained"].startswith(str(out_dir / "tiny_clip"))
    clip = ClipImageUpstream(
        printed["clip_model_name"],
        pretrained=printed["clip_pretrained"],
        model_config=printed["clip_model_config"],
    )
    assert clip.num_patches == 64


def test_tiny_hubert_feature_extractor_starts_as_a_filterbank(hubert_path):
    """A pure tone drives the band of its frequency: the tiny model hears spectral content."""
    import math

    upstream = HubertUpstream(hubert_path)
    extractor = upstream.model.feature_extractor
    t = torch.arange(16000) / 16000.0
    peaks = []
    with torch.no_grad():
        for freq in (300.0, 1000.0, 3000.0):
            tone = torch.sin(2 * math.pi * freq * t)[None]
            bands = extractor(tone)[0, :32].mean(dim=-1)  # (32 bands,) averaged over frames
            peaks.append(int(bands.argmax()))
    assert peaks[0] < peaks[1] < peaks[2], peaks
