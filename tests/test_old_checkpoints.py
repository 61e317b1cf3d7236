"""Checkpoints written by earlier versions still load: tests/data/checkpoint_main_484aea9.pt was written
by main at 484aea9 (before the objectives/ layout) with every part switched on, by
tests/data/make_checkpoint_main_484aea9.py; it holds the outputs that version computed."""

import os

import pytest
import torch
from test_model import make_batch

from cmd_plugin.models.cmd_speech_image import CmdSpeechImageConfig, CmdSpeechImageModel

OLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "checkpoint_main_484aea9.pt")


def _model(state, encoders, **overrides):
    cfg = dict(state["cfg"]["model"])
    cfg.pop("_name", None)
    cfg.update({k: encoders[k] for k in ("hubert_path", "image_pretrained", "image_model_config", "image_model")})
    cfg.update(overrides)
    return CmdSpeechImageModel.build_model(CmdSpeechImageConfig(**cfg))


@pytest.fixture(scope="module")
def old_state():
    return torch.load(OLD, map_location="cpu", weights_only=False)


def test_a_checkpoint_of_main_484aea9_loads_and_computes_what_it_computed(old_state, tiny_encoders):
    model = _model(old_state, tiny_encoders)
    model.load_state_dict(old_state["model"], strict=True)
    model.eval()
    batch = make_batch([0, 1, 2], seed=7)["net_input"]
    expected = old_state["expected"]
    with torch.no_grad():
        out = model(**batch)
        tokens = torch.cat([out["image"][:, None], out["patches"]], dim=1)
        logits = model.match_logits(out["speech_seq"], out["speech_mask"], tokens)
        recon = model.fusion(out["speech"], out["patches"], all_pairs=False)
    assert torch.allclose(out["speech"], expected["speech"], atol=1e-5)
    assert torch.allclose(out["image"], expected["image"], atol=1e-5)
    assert torch.allclose(logits, expected["match_logits"], atol=1e-4)
    assert torch.allclose(recon, expected["fusion"], atol=1e-5)
    assert len(model.queue) == 8  # two training batches of four captions


def test_parts_switched_off_are_dropped_from_an_old_checkpoint(old_state, tiny_encoders):
    model = _model(old_state, tiny_encoders, cmd_fusion=False, c2f_momentum=False, queue_size=0, multimodal_layers=0)
    model.load_state_dict(dict(old_state["model"]), strict=True)  # fusion, SIM, queue, momentum keys dropped
    assert model.fusion is None and model.multimodal is None and model.queue is None
    with torch.no_grad():
        speech = model.eval().encode_speech(
            **{k: make_batch([0, 1, 2], seed=7)["net_input"][k] for k in ("source", "padding_mask")}
        )
    assert torch.allclose(speech, old_state["expected"]["speech"], atol=1e-5)


def test_c2f_starts_from_a_sic_checkpoint_with_fresh_c2f_parts(tiny_encoders):
    """The two-stage recipe (checkpoint.restore_file): a C2F model loads a SIC model's weights; its SIM
    encoder, head and queue are new, and its momentum copies equal the loaded online weights."""
    from test_model import build_model

    sic = build_model(tiny_encoders, cmd_fusion=False, speech_encoder_heads=2, speech_encoder_ffn_dim=64)
    with torch.no_grad():
        sic.speech_proj.weight.add_(1.0)  # differs from any fresh initialisation
    c2f = build_model(
        tiny_encoders,
        cmd_fusion=False,
        speech_encoder_heads=2,
        speech_encoder_ffn_dim=64,
        c2f_momentum=True,
        queue_size=4,
        multimodal_layers=1,
        multimodal_heads=2,
        multimodal_ffn_dim=32,
    )
    head_before = c2f.matching_head.proj.weight.clone()
    c2f.load_state_dict(sic.state_dict(), strict=True)
    assert torch.equal(c2f.speech_proj.weight, sic.speech_proj.weight)
    assert torch.equal(c2f.momentum_model["speech_proj"].weight, sic.speech_proj.weight)
    assert torch.equal(c2f.matching_head.proj.weight, head_before) and len(c2f.queue) == 0
    with pytest.raises(RuntimeError, match="speech_proj"):  # a missing core part is still an error
        c2f.load_state_dict({k: v for k, v in sic.state_dict().items() if not k.startswith("speech_proj.")})
