"""Momentum model (coarse-to-fine): EMA of the trainable parts only, once per update, saved and
restored with the model so that a resumed run continues exactly as an uninterrupted one."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cmd_plugin.modules.momentum import MomentumCopies, drop_momentum_state
from cmd_plugin.modules.queue import EmbeddingQueue

DECAY = 0.9


class Owner(nn.Module):
    """A stand-in for the speech-image model: a frozen upstream, trainable parts (a bare
    parameter, a layer with dropout, a projection), their momentum copies and a queue."""

    def __init__(self, seed=0, dropout=True):
        super().__init__()
        torch.manual_seed(seed)
        self.upstream = nn.Linear(6, 8).requires_grad_(False)
        self.cls_token = nn.Parameter(torch.randn(8))
        self.encoder = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.LayerNorm(8))
        self.proj = nn.Linear(8, 4)
        self.momentum = MomentumCopies(
            {"cls_token": self.cls_token, "encoder": self.encoder, "proj": self.proj}, dropout=dropout
        )
        self.queue = EmbeddingQueue(5, 4, 4)

    def embed(self, x, parts):
        return F.normalize(parts["proj"](parts["encoder"](self.upstream(x) + parts["cls_token"])), dim=-1)

    def online(self, x):
        return self.embed(x, {"cls_token": self.cls_token, "encoder": self.encoder, "proj": self.proj})

    def momentum_features(self, x):
        with torch.no_grad():
            return self.embed(x, {name: self.momentum[name] for name in self.momentum.names()})


def _train_step(model, optimizer, num_updates, gen):
    """One update: online loss against [momentum batch; queue], enqueue, optimizer step, EMA."""
    torch.manual_seed(1000 + num_updates)  # fairseq seeds dropout per update (set_torch_seed)
    x = torch.randn(3, 6, generator=gen)
    keys = torch.stack([torch.zeros(3, dtype=torch.long), torch.randint(0, 4, (3,), generator=gen)], dim=1)
    online = model.online(x)
    momentum = model.momentum_features(x)
    queued, _, _ = model.queue.entries()
    logits = online @ torch.cat([momentum, queued]).T / 0.1
    loss = F.cross_entropy(logits, torch.arange(3))
    model.queue.enqueue(momentum, momentum, keys)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.momentum.step(num_updates, DECAY)  # what set_num_updates does


def _state(model, optimizer):
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_ema_update_arithmetic_on_parameters_and_buffers():
    model = Owner()
    model.encoder[2].register_buffer("stat", torch.tensor([1.0, 2.0]))
    model.momentum = MomentumCopies({"cls_token": model.cls_token, "encoder": model.encoder, "proj": model.proj})
    before = {k: v.clone() for k, v in model.momentum.state_dict().items()}
    with torch.no_grad():
        for p in _trainable(model):
            p.add_(torch.randn_like(p))
        model.encoder[2].stat.fill_(5.0)
    online = {
        "cls_token": model.cls_token,
        **{f"encoder.{k}": v for k, v in model.encoder.state_dict().items()},
        **{f"proj.{k}": v for k, v in model.proj.state_dict().items()},
    }
    model.momentum.update(DECAY)
    after = model.momentum.state_dict()
    checked = 0
    for key, value in online.items():
        name, _, sub = key.partition(".")
        stored = f"copies.{name}.{sub}" if sub else f"copies.{name}.value"
        expected = DECAY * before[stored] + (1 - DECAY) * value
        torch.testing.assert_close(after[stored], expected, rtol=0, atol=1e-6)
        assert not torch.allclose(after[stored], before[stored])
        checked += 1
    assert checked == 1 + 5 + 2  # cls token, encoder weight/bias/LN weight/LN bias/stat, proj weight/bias
    torch.testing.assert_close(after["copies.encoder.2.stat"], torch.tensor([1.4, 2.3]))
    # decay 1 keeps the copy, decay 0 copies the online weights
    model.momentum.update(1.0)
    assert all(torch.equal(after[k], v) for k, v in model.momentum.state_dict().items())
    model.momentum.update(0.0)
    assert torch.equal(model.momentum["proj"].weight, model.proj.weight)


def test_frozen_upstream_is_shared_never_copied_and_copies_are_not_trained():
    model = Owner()
    keys = list(model.momentum.state_dict())
    assert not any("upstream" in k for k in keys)
    assert not any(p.requires_grad for p in model.momentum.parameters())
    trainable = {id(p) for p in _trainable(model)}
    assert trainable == {id(model.cls_token)} | {id(p) for m in (model.encoder, model.proj) for p in m.parameters()}
    with pytest.raises(ValueError, match="frozen upstreams are shared"):
        MomentumCopies({"upstream": model.upstream})
    with pytest.raises(ValueError, match="frozen"):
        MomentumCopies({"frozen_param": nn.Parameter(torch.ones(2), requires_grad=False)})
    # inference exports drop the copies
    exported = drop_momentum_state(model.state_dict(), "momentum")
    assert not any(k.startswith("momentum.") for k in exported) and "proj.weight" in exported


def test_step_applies_once_per_update_and_is_a_noop_when_reloaded():
    model = Owner()
    with torch.no_grad():
        model.proj.weight.add_(1.0)
    assert model.momentum.step(1, DECAY)
    once = model.momentum["proj"].weight.clone()
    # update_freq > 1: several forwards, one update; a checkpoint reload repeats the count
    assert not model.momentum.step(1, DECAY)
    assert not model.momentum.step(0, DECAY)
    assert torch.equal(model.momentum["proj"].weight, once)
    assert model.momentum.step(2, DECAY)
    assert not torch.equal(model.momentum["proj"].weight, once)


def test_dropout_flag_keeps_copies_in_eval_mode():
    follows = Owner(dropout=True).train()
    assert follows.momentum["encoder"].training
    fixed = Owner(dropout=False).train()
    assert not fixed.momentum["encoder"].training and fixed.encoder.training


def test_resume_restores_momentum_and_queue_so_the_next_updates_match(tmp_path):
    def make():
        model = Owner(seed=0)
        return model, torch.optim.SGD(_trainable(model), lr=0.5, momentum=0.9)

    gen = torch.Generator().manual_seed(1)
    model, optimizer = make()
    states = []
    for n in range(1, 7):
        _train_step(model, optimizer, n, gen)
        states.append(_state(model, optimizer))

    # interrupted after 3 updates: saved, rebuilt from scratch (other random init), loaded
    gen = torch.Generator().manual_seed(1)
    model, optimizer = make()
    for n in range(1, 4):
        _train_step(model, optimizer, n, gen)
    path = tmp_path / "checkpoint.pt"
    torch.save(_state(model, optimizer), path)
    resumed = Owner(seed=123)
    resumed_opt = torch.optim.SGD(_trainable(resumed), lr=0.5, momentum=0.9)
    saved = torch.load(path)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    assert not resumed.momentum.step(3, DECAY)  # fairseq's set_num_updates on load
    for n in range(4, 7):
        _train_step(resumed, resumed_opt, n, gen)
        expected = states[n - 1]["model"]
        got = resumed.state_dict()
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"update {n}: {key} differs from the uninterrupted run"
    assert len(resumed.queue) == 5 and int(resumed.momentum.last_update) == 6


def test_copies_stay_fp32_when_the_owner_is_cast_to_half_precision():
    for cast in (nn.Module.half, nn.Module.bfloat16):
        model = cast(Owner())
        assert model.proj.weight.dtype != torch.float32
        assert all(t.dtype == torch.float32 for t in model.momentum.parameters())
        assert model.momentum.last_update.dtype == torch.long
        # an EMA step of 0.5 % of a small difference: kept in fp32, lost in half precision
        with torch.no_grad():
            model.proj.weight.add_(0.01)
        before = model.momentum["proj"].weight.clone()
        model.momentum.update(0.995)
        moved = model.momentum["proj"].weight - before
        torch.testing.assert_close(moved, 0.005 * (model.proj.weight.float() - before), rtol=0, atol=1e-6)
        assert (moved != 0).all()

        low = Owner()
        low.momentum = MomentumCopies({"proj": low.proj}, keep_fp32=False)
        cast(low)
        assert low.momentum["proj"].weight.dtype == low.proj.weight.dtype
        with torch.no_grad():
            low.proj.weight.add_(0.01)
        before = low.momentum["proj"].weight.clone()
        low.momentum.update(0.995)
        # most weights did not move at all: the reason copies are kept in fp32
        assert (low.momentum["proj"].weight == before).float().mean() > 0.5
