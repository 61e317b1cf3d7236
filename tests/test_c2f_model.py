"""Coarse-to-fine parts wired into the model and criterion (tiny real encoders): momentum once per
update, frozen upstreams never copied, resume restores EMA and queue exactly, the queue is filled
only by training forwards, SIM negatives are never captions of the same image."""

import pytest
import torch
from test_model import build_model, make_batch

from cmd_plugin.criterions.cmd_contrastive import CmdContrastiveConfig, CmdContrastiveCriterion
from cmd_plugin.objectives.c2f.losses import queue_sic_loss, sim_pairs
from cmd_plugin.objectives.sic import symmetric_infonce

C2F_MODEL = dict(
    cmd_fusion=False,
    c2f_momentum=True,
    momentum=0.9,
    queue_size=10,
    multimodal_layers=1,
    multimodal_heads=2,
    multimodal_ffn_dim=32,
    multimodal_dropout=0.0,
    speech_encoder_heads=2,
)
IDS = [0, 0, 1, 2, 3, 3]


def c2f_criterion(**overrides):
    cfg = dict(noise_seed=5, sim_weight=1.0, distill_alpha=0.4, distill_ramp_updates=0, cmd_weight=0.0)
    cfg.update(overrides)
    return CmdContrastiveCriterion(CmdContrastiveConfig(**cfg), task=None)


def _update(model, crit, optimizer, num_updates, seed):
    """What fairseq does for one update: set_num_updates, forward, backward, optimizer step."""
    model.train()
    model.set_num_updates(num_updates)
    crit.set_update_num(num_updates)
    loss, sample_size, log = crit(model, make_batch(IDS, seed=seed))
    optimizer.zero_grad()
    (loss / sample_size).backward()
    optimizer.step()
    return log


def _optimizer(model):
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def test_momentum_copies_only_the_trainable_speech_side_and_steps_once_per_update(tiny_encoders):
    model = build_model(tiny_encoders, **C2F_MODEL)
    state = model.state_dict()
    copied = {k.split(".")[2] for k in state if k.startswith("momentum_model.copies.")}
    assert copied == {"layer_weights", "cls_token", "speech_encoder", "speech_proj"}
    assert not any(k.startswith(("hubert.", "image_encoder.")) for k in state)  # frozen: neither saved nor copied
    assert not any(p.requires_grad for p in model.momentum_model.parameters())
    assert {"queue.speech", "queue.image_key", "queue.ptr"} <= set(state)

    online = model.speech_proj.weight
    with torch.no_grad():
        online.add_(1.0)
    before = model.momentum_model["speech_proj"].weight.clone()
    model.set_num_updates(0)  # no update done yet: nothing to average
    assert torch.equal(model.momentum_model["speech_proj"].weight, before)
    for _ in range(3):  # update_freq = 3: three forwards of update 1, one EMA step
        model.set_num_updates(1)
    expected = 0.9 * before + 0.1 * online.detach()
    assert torch.allclose(model.momentum_model["speech_proj"].weight, expected, atol=1e-6)
    model.set_num_updates(2)
    expected = 0.9 * expected + 0.1 * online.detach()
    assert torch.allclose(model.momentum_model["speech_proj"].weight, expected, atol=1e-6)
    assert int(model.momentum_model.last_update) == 2


def test_momentum_features_come_from_the_same_hubert_states(tiny_encoders):
    model = build_model(tiny_encoders, **C2F_MODEL).train()
    calls = []
    model.hubert.register_forward_hook(lambda *a: calls.append(1))
    batch = make_batch([0, 1, 2])["net_input"]
    out = model(**batch)
    assert len(calls) == 1  # HuBERT ran once for the online and momentum embeddings
    # the copies start equal to the online weights: equal embeddings, without gradient
    assert torch.allclose(out["speech_m"], out["speech"], atol=1e-5) and not out["speech_m"].requires_grad
    with torch.no_grad():
        model.momentum_model["speech_proj"].weight.mul_(-1.0)
    assert not torch.allclose(model(**batch)["speech_m"], out["speech"], atol=1e-3)
    assert "speech_m" not in model.eval()(**batch)  # inference never runs the momentum model


def test_resume_restores_ema_and_queue_so_the_next_update_matches(tiny_encoders, tmp_path):
    torch.manual_seed(0)
    model, crit = build_model(tiny_encoders, **C2F_MODEL), c2f_criterion(distill_ramp_updates=4)
    optimizer = _optimizer(model)
    for u in range(3):
        _update(model, crit, optimizer, u, seed=u)
    assert len(model.queue) == 10 and int(model.queue.num_enqueued) == 18
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    reference = _update(model, crit, optimizer, 3, seed=3)

    torch.manual_seed(1)  # a fresh model: other initial weights, empty queue
    resumed = build_model(tiny_encoders, **C2F_MODEL)
    resumed.set_num_updates(3)  # fairseq calls it before loading the weights: must leave no trace
    state = torch.load(path)
    resumed.load_state_dict(state["model"])
    opt2 = _optimizer(resumed)
    opt2.load_state_dict(state["optimizer"])
    got = _update(resumed, c2f_criterion(distill_ramp_updates=4), opt2, 3, seed=3)
    for key in ("loss", "sic_loss", "sim_loss", "distill_alpha", "queue_negatives"):
        assert got[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-7), key
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        a, b = a.float(), b.float()
        if name.endswith("in_proj_bias"):
            # the key third's gradient is zero analytically (softmax ignores a per-row shift): both runs
            # see rounding noise there, which Adam normalises into steps of up to lr; left out
            dim = a.numel() // 3
            a, b = torch.cat([a[:dim], a[2 * dim :]]), torch.cat([b[:dim], b[2 * dim :]])
        assert torch.allclose(a, b, atol=1e-6), name

    # the check can fail: without the saved queue and EMA the same update differs
    torch.manual_seed(1)
    fresh = build_model(tiny_encoders, **C2F_MODEL)
    online_only = {k: v for k, v in state["model"].items() if not k.startswith(("queue.", "momentum_model."))}
    fresh.load_state_dict(online_only, strict=False)
    opt3 = _optimizer(fresh)
    opt3.load_state_dict(state["optimizer"])
    other = _update(fresh, c2f_criterion(distill_ramp_updates=4), opt3, 3, seed=3)
    assert abs(other["loss"] - reference["loss"]) > 1e-4


def test_queue_is_filled_by_training_forwards_only(tiny_encoders):
    model, crit = build_model(tiny_encoders, **C2F_MODEL), c2f_criterion()
    batch = make_batch(IDS)
    model.eval()
    with torch.no_grad():
        _, _, log = crit(model, batch)
    assert len(model.queue) == 0 and "queue_negatives" not in log  # validation: in-batch SIC, no queue
    model.train()
    crit.set_dummy_batch(True)  # what the task sets for fairseq's dummy batch
    crit(model, batch)
    assert len(model.queue) == 0
    crit.set_dummy_batch(False)
    crit(model, batch)
    assert len(model.queue) == 6
    _, _, log = crit(model, batch)  # the loss read the 6 entries before this batch was added
    assert log["queue_negatives"] == 6 * 6 and len(model.queue) == 10
    keys = model.queue.entries()[2]
    assert set(keys[:, 1].tolist()) == set(IDS)


def test_queue_sic_reduces_to_in_batch_sic_and_counts_queue_entries_of_the_image_as_positives():
    gen = torch.Generator().manual_seed(0)
    speech = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    keys = torch.tensor([[7, 0], [7, 0], [7, 1], [7, 2], [9, 0]])
    scale = torch.tensor(10.0)
    loss, s2i, i2s, _ = queue_sic_loss(speech, image, keys, scale)
    ref = symmetric_infonce(speech @ image.t(), keys, keys, scale)
    assert torch.allclose(loss, ref[0]) and torch.allclose(s2i, ref[1]) and torch.allclose(i2s, ref[2])
    # a queue entry of row 2's image (7, 1) raises row 2's target mass on it: the loss changes
    q_speech, q_image = speech[2:3] * 0.5, image[2:3]
    with_pos, _, _, logits = queue_sic_loss(speech, image, keys, scale, q_speech, q_image, torch.tensor([[7, 1]]))
    as_neg, _, _, _ = queue_sic_loss(speech, image, keys, scale, q_speech, q_image, torch.tensor([[8, 1]]))
    assert logits.shape == (5, 6) and not torch.allclose(with_pos, as_neg)
    with pytest.raises(ValueError, match="momentum"):
        queue_sic_loss(speech, image, keys, scale, alpha=0.4)


def test_sim_pairs_never_pair_a_speech_with_a_negative_of_its_own_image():
    keys = torch.tensor([[1, 0], [1, 0], [1, 0], [1, 1], [1, 1], [2, 0]])  # duplicates; (2, 0) another split
    logits = torch.randn(6, 6) * 50
    logits[:, :3] += 100  # the same-image columns are by far the most similar
    for seed in range(20):
        s, i, labels, _ = sim_pairs(logits, keys, torch.Generator().manual_seed(seed))
        negative = labels == 0
        assert (labels[:6] == 1).all() and negative.sum() == 12
        assert not (keys[s[negative]] == keys[i[negative]]).all(dim=1).any()
    # every item of one image: nothing to sample, the rows are skipped (never NaN, never a positive)
    s, i, labels, _ = sim_pairs(torch.randn(3, 3), torch.tensor([[1, 4]] * 3), torch.Generator().manual_seed(0))
    assert labels.tolist() == [1, 1, 1]


def test_missing_parts_and_bad_weights_are_named(tiny_encoders):
    model = build_model(tiny_encoders)
    with pytest.raises(ValueError, match="multimodal_layers"):
        c2f_criterion(distill_alpha=0.0)(model, make_batch([0, 1]))
    with pytest.raises(ValueError, match="c2f_momentum"):
        c2f_criterion(sim_weight=0.0)(model, make_batch([0, 1]))
    with pytest.raises(ValueError, match="at least one > 0"):
        c2f_criterion(sic_weight=0.0, sim_weight=0.0)
    crit = c2f_criterion(distill_ramp_updates=-1, update_freq=[2])
    with pytest.raises(ValueError, match="first epoch"):
        crit.sic.alpha(2)
    crit.set_epoch_batches(7)  # 7 batches per epoch at update_freq 2: a ramp of 4 updates
    assert crit.sic.alpha(2) == pytest.approx(0.4 * 2 / 4)


def test_inference_drops_the_training_state_and_embeds_the_same(tiny_encoders):
    model = build_model(tiny_encoders, **C2F_MODEL).eval()
    batch = make_batch([0, 1, 2])["net_input"]
    with torch.no_grad():
        before = model.encode_speech(batch["source"], batch["padding_mask"])
        model.remove_pretraining_modules(keep_matching=True)
        after = model.encode_speech(batch["source"], batch["padding_mask"])
    assert model.momentum_model is None and model.queue is None and model.fusion is None
    assert model.matching_head is not None  # kept for re-ranking
    assert torch.equal(before, after)
    assert not any(k.startswith(("momentum_model.", "queue.", "fusion.")) for k in model.state_dict())
    model.remove_pretraining_modules()
    assert model.multimodal is None and model.matching_head is None
    assert not any(k.startswith(("multimodal.", "matching_head.")) for k in model.state_dict())


def test_task_refuses_a_queue_larger_than_the_training_split(tiny_encoders, tmp_path):
    from omegaconf import OmegaConf
    from test_train_cli import make_corpus

    from cmd_plugin.models.cmd_speech_image import CmdSpeechImageConfig
    from cmd_plugin.tasks.speech_image import SpeechImageConfig, SpeechImageTask

    data = make_corpus(tmp_path, {"train": (4, 2)})  # 8 training captions
    task = SpeechImageTask.setup_task(
        SpeechImageConfig(
            data=data, image_model=tiny_encoders["image_model"], image_model_config=tiny_encoders["image_model_config"]
        )
    )
    cfg = CmdSpeechImageConfig(
        hubert_path=tiny_encoders["hubert_path"],
        image_model=tiny_encoders["image_model"],
        image_pretrained=tiny_encoders["image_pretrained"],
        image_model_config=tiny_encoders["image_model_config"],
        queue_size=9,
        speech_encoder_heads=2,
    )
    cfg._name = "cmd_speech_image"
    task.build_model(OmegaConf.structured(cfg))
    with pytest.raises(ValueError, match=r"queue size 9 is larger than the 8 captions of training split 'train'"):
        task.load_dataset("train")


def test_frame_pooling_averages_real_frames_only_and_keeps_the_cls():
    from cmd_plugin.models.cmd_speech_image import pool_frames

    seq = torch.arange(2 * 6 * 1, dtype=torch.float32).view(2, 6, 1)  # CLS + 5 frames
    mask = torch.tensor([[False] * 6, [False, False, False, False, True, True]])  # item 1: 3 real frames
    pooled, pooled_mask = pool_frames(seq, mask, 2)
    assert pooled.shape == (2, 4, 1)
    assert pooled[0, :, 0].tolist() == [0.0, 1.5, 3.5, 5.0]  # CLS, (1,2), (3,4), (5)
    assert pooled[1, :3, 0].tolist() == [6.0, 7.5, 9.0]  # the (9, pad) window averages 9 alone
    assert pooled_mask.tolist() == [[False] * 4, [False, False, False, True]]


def test_non_finite_embeddings_never_enter_the_queue(tiny_encoders):
    model, crit = (
        build_model(tiny_encoders, **{**C2F_MODEL, "multimodal_layers": 0}),
        c2f_criterion(sim_weight=0.0, distill_alpha=0.0),
    )
    batch = make_batch([0, 1, 2])
    batch["net_input"]["source"][1] = float("nan")  # a broken utterance
    model.train()
    crit(model, batch)
    speech, _, keys = model.queue.entries()
    assert len(model.queue) == 2 and torch.isfinite(speech).all()
    assert sorted(keys[:, 1].tolist()) == [0, 2]
