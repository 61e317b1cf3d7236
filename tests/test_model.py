"""The CMD model on tiny release-format encoders: frozen upstreams, checkpoints, global batch."""

import os

import torch

from cmd_plugin.criterions.cmd_contrastive import CmdContrastiveConfig, CmdContrastiveCriterion
from cmd_plugin.models.cmd_speech_image import CmdSpeechImageConfig, CmdSpeechImageModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model(enc, **overrides):
    cfg = CmdSpeechImageConfig(
        hubert_path=enc["hubert_path"],
        image_model=enc["image_model"],
        image_pretrained=enc["image_pretrained"],
        image_model_config=enc["image_model_config"],
        speech_encoder_dropout=0.0,
        **overrides,
    )
    return CmdSpeechImageModel.build_model(cfg)


def make_batch(image_ids, seed=0, image_size=64):
    gen = torch.Generator().manual_seed(seed)
    lengths = [8000 + 1600 * (i % 4) for i in range(len(image_ids))]
    source = torch.zeros(len(image_ids), max(lengths))
    padding_mask = torch.ones(len(image_ids), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        source[i, :n] = torch.randn(n, generator=gen)
        padding_mask[i, :n] = False
    unique, index = torch.unique(torch.tensor(image_ids), return_inverse=True)
    images = torch.randn(len(unique), 3, image_size, image_size, generator=gen)
    return {
        "id": torch.arange(len(image_ids)),
        "net_input": {"source": source, "padding_mask": padding_mask, "images": images, "image_index": index},
        "image_ids": torch.tensor(image_ids),
        "ntokens": int((~padding_mask).sum()),
        "split": "train",
    }


def criterion(**overrides):
    return CmdContrastiveCriterion(CmdContrastiveConfig(noise_seed=5, **overrides), task=None)


def test_parameter_groups_and_layer_weights(tiny_encoders):
    model = build_model(tiny_encoders)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith(("hubert.", "image_encoder.")) for n in trainable)
    assert model.layer_weights.numel() == model.hubert.num_states == 4  # CNN output + 3 layers
    assert torch.allclose(model.layer_weight_probs().sum(), torch.tensor(1.0))
    assert "fusion.fc.weight" in trainable and "logit_scale" in trainable


def test_weighted_sum_is_softmax_mixture_of_hubert_states(tiny_encoders):
    model = build_model(tiny_encoders).eval()
    with torch.no_grad():
        model.layer_weights.copy_(torch.tensor([0.0, -50.0, -50.0, 50.0]))
        batch = make_batch([0, 1])["net_input"]
        states, frame_mask = model.hubert(batch["source"], batch["padding_mask"])
        # with all weight on the last layer the mixture is that layer alone
        probs = model.layer_weight_probs()
        mixed = torch.einsum("l,lbtd->btd", probs, states)
        assert torch.allclose(mixed, states[-1], atol=1e-5)
        assert frame_mask.shape == states.shape[1:3]


def test_frozen_upstreams_unchanged_and_in_eval_after_training_steps(tiny_encoders):
    model = build_model(tiny_encoders)
    before = {k: v.clone() for k, v in model.hubert.state_dict().items()}
    before.update({"img." + k: v.clone() for k, v in model.image_encoder.state_dict().items()})
    trained_before = model.speech_proj.weight.clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    crit = criterion(cmd_weight=1.0)
    losses = []
    for step in range(5):
        model.train()
        crit.set_update_num(0)  # the same batch and noise: the objective itself must go down
        loss, sample_size, log = crit(model, make_batch([0, 0, 1, 2, 3, 3]))
        opt.zero_grad()
        (loss / sample_size).backward()
        opt.step()
        losses.append(log["loss"] / sample_size)
        assert not model.hubert.model.training and not model.image_encoder.visual.training
        assert model.speech_encoder.training
    after = {k: v for k, v in model.hubert.state_dict().items()}
    after.update({"img." + k: v for k, v in model.image_encoder.state_dict().items()})
    for k in before:
        assert torch.equal(before[k], after[k]), f"frozen weight {k} changed"
    assert all(p.grad is None for p in model.hubert.parameters())
    assert not torch.equal(trained_before, model.speech_proj.weight)
    assert losses[-1] < losses[0]
    assert {"cmd_loss", "sic_loss", "temperature", "s2i_correct"} <= set(log)


def test_checkpoint_state_excludes_frozen_upstreams_and_reloads(tiny_encoders):
    model = build_model(tiny_encoders)
    state = model.state_dict()
    assert not any(k.startswith(("hubert.", "image_encoder.")) for k in state)
    other = build_model(tiny_encoders)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    other.load_state_dict(model.state_dict(), strict=True)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    unfrozen = build_model(tiny_encoders, freeze_hubert=False)
    assert any(k.startswith("hubert.") for k in unfrozen.state_dict())


def test_paired_and_all_pairs_cmd_agree_on_the_diagonal(tiny_encoders):
    model = build_model(tiny_encoders).train()
    out = model(**make_batch([0, 1, 2])["net_input"])
    noisy = out["patches"]
    all_pairs = model.fusion(out["speech"], noisy, all_pairs=True)
    paired = model.fusion(out["speech"], noisy, all_pairs=False)
    assert all_pairs.shape == (3, 3, model.image_encoder.embed_dim)
    assert torch.allclose(all_pairs.diagonal(dim1=0, dim2=1).t(), paired, atol=1e-5)
