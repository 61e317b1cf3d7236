"""Checkpoints from the wild: what model.hubert_path accepts, and what no checkpoint load unpickles.

Crafted files in each layout users have (tests/checkpoint_layouts.py, fairseq's own classes):
a CTC fine-tuned HuBERT (its encoder is used), wav2vec 2.0 and data2vec (refused, saying what
they are), non-fairseq files (clear errors) and checkpoints that pickle classes outside the
explicit allow-list (refused with the class named, never unpickled).
"""

import os
import pathlib
import shutil

import pytest
import torch
from checkpoint_layouts import make_tiny_data2vec_audio, make_tiny_hubert_ctc, make_tiny_wav2vec2

from cmd_demo.tiny_encoders import TINY_HUBERT_LAYERS
from cmd_plugin.checkpoints import CheckpointError, load_checkpoint_state, safe_torch_load
from cmd_plugin.models.hubert_upstream import HubertUpstream


@pytest.fixture(scope="module")
def pretrained(tiny_encoders):
    return tiny_encoders["hubert_path"]


@pytest.fixture(scope="module")
def fine_tuned(pretrained, tmp_path_factory):
    return make_tiny_hubert_ctc(str(tmp_path_factory.mktemp("ctc") / "hubert_ctc.pt"), pretrained)


def _file_weights(path, prefix="w2v_encoder.w2v_model."):
    state = safe_torch_load(path)
    return {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}


def test_fine_tuned_hubert_gives_its_own_encoder(pretrained, fine_tuned, caplog):
    with caplog.at_level("WARNING"):
        upstream = HubertUpstream(fine_tuned)
    assert "fine-tuned with CTC on 'ltr' labels: using its encoder" in caplog.text
    assert upstream.normalize is True and upstream.sample_rate == 16000
    assert upstream.num_states == TINY_HUBERT_LAYERS + 1 and upstream.embed_dim == 64
    # every weight of the encoder is the file's fine-tuned one (none left at initialisation)
    weights = _file_weights(fine_tuned)
    own = upstream.model.state_dict()
    assert set(own) == set(weights) - {"label_embs_concat"} | ({"label_embs_concat"} & set(own))
    for key, value in own.items():
        assert torch.equal(value, weights[key]), key
    # the fine-tuned last layer changes the last state only
    wav = torch.randn(2, 12000, generator=torch.Generator().manual_seed(0))
    states, _ = upstream(wav)
    base, _ = HubertUpstream(pretrained)(wav)
    for k in range(TINY_HUBERT_LAYERS):
        torch.testing.assert_close(states[k], base[k])
    assert not torch.allclose(states[-1], base[-1], atol=1e-4)


def test_fine_tuned_hubert_naming_only_its_pretrained_file(pretrained, tmp_path):
    moved_pretrained = str(tmp_path / "pretrained" / "hubert.pt")
    os.makedirs(os.path.dirname(moved_pretrained))
    shutil.copy(pretrained, moved_pretrained)
    path = make_tiny_hubert_ctc(str(tmp_path / "ctc_w2v_path.pt"), moved_pretrained, keep_w2v_args=False)
    assert safe_torch_load(path)["cfg"]["model"]["w2v_args"] is None
    upstream = HubertUpstream(path)
    for key, value in upstream.model.state_dict().items():
        assert torch.equal(value, _file_weights(path)[key]), key
    os.remove(moved_pretrained)
    with pytest.raises(ValueError) as err:
        HubertUpstream(path)
    assert f"{path} is a CTC fine-tuned HuBERT (hubert_ctc)" in str(err.value)
    assert f"w2v_path='{moved_pretrained}', which is not here" in str(err.value)
    assert "give that pre-trained checkpoint as model.hubert_path" in str(err.value)


@pytest.mark.parametrize(
    "make,what,name",
    [
        (make_tiny_wav2vec2, "a wav2vec 2.0 pre-trained model", "wav2vec2"),
        (make_tiny_data2vec_audio, "a data2vec (audio) pre-trained model", "data2vec_audio"),
    ],
    ids=["wav2vec2", "data2vec"],
)
def test_wav2vec2_and_data2vec_checkpoints_are_refused_saying_what_they_are(make, what, name, tmp_path):
    path = make(str(tmp_path / f"{name}.pt"))
    with pytest.raises(ValueError) as err:
        HubertUpstream(path)
    message = str(err.value)
    assert message.startswith(f"{path} is {what} (cfg.model._name='{name}'), not a HuBERT checkpoint")
    assert "hubert_large_ll60k.pt" in message and "hubert_large_ll60k_finetune_ls960.pt" in message


def test_files_that_are_not_fairseq_checkpoints_are_clear_errors(tiny_encoders, pretrained, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes")
    truncated = tmp_path / "truncated.pt"
    data = pathlib.Path(pretrained).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    cases = {
        str(text): "is not a fairseq checkpoint: not a readable PyTorch file",
        str(truncated): "is not a fairseq checkpoint: not a readable PyTorch file",
        # open_clip weights: a plain state dict
        tiny_encoders["image_pretrained"]: "is not a fairseq checkpoint: it holds a OrderedDict with keys",
    }
    for path, expected in cases.items():
        with pytest.raises(CheckpointError) as err:
            HubertUpstream(path)
        assert str(err.value).startswith(path) and expected in str(err.value), str(err.value)


class _Touch:
    """Pickles as getattr(Path, "touch")(path): unpickling it would create the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


class _FairseqCall:
    """Pickles as a call of a fairseq function: trusted module, but not a checkpoint class."""

    def __reduce__(self):
        from fairseq.utils import get_activation_fn

        return get_activation_fn, ("relu",)


@pytest.mark.parametrize(
    "payload,named",
    [
        (lambda tmp: _Touch(str(tmp / "pwned")), "builtins.getattr"),
        (lambda tmp: _FairseqCall(), "fairseq.utils.get_activation_fn"),
        (lambda tmp: pathlib.PurePosixPath("/data"), "pathlib.PurePosixPath"),
    ],
    ids=["code", "fairseq_function", "path_object"],
)
def test_checkpoints_pickling_other_classes_are_refused_with_the_class_named(pretrained, tmp_path, payload, named):
    state = safe_torch_load(pretrained)
    state["extra_state"]["note"] = payload(tmp_path)
    path = str(tmp_path / "hubert_with_extra.pt")
    torch.save(state, path)
    for load in (HubertUpstream, load_checkpoint_state):
        with pytest.raises(CheckpointError) as err:
            load(path)
        assert str(err.value).startswith(f"{path}: refusing to load")
        assert f"it pickles {named}" in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_trainer_checkpoint_with_a_config_object_and_numpy_values_loads(pretrained, tmp_path):
    """Classes real fairseq checkpoints hold (DictConfig cfg, Namespace args, numpy scalars) pass."""
    import argparse

    import numpy as np
    from omegaconf import OmegaConf

    state = safe_torch_load(pretrained)
    state["cfg"] = OmegaConf.create(state["cfg"])
    state["extra_state"]["metrics"] = {"train": {"loss": np.float64(2.5), "hist": np.arange(3)}}
    state["extra_state"]["old_args"] = argparse.Namespace(arch="hubert")
    path = str(tmp_path / "hubert_objects.pt")
    torch.save(state, path)
    loaded = load_checkpoint_state(path)
    assert loaded["extra_state"]["metrics"]["train"]["loss"] == 2.5
    assert loaded["cfg"].model._name == "hubert"
    assert HubertUpstream(path).num_states == TINY_HUBERT_LAYERS + 1
