"""Two gloo workers on halves of a global batch == one process on the whole batch."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_model import build_model, criterion, make_batch

IMAGE_IDS = [0, 0, 1, 2, 2, 3]
SPLIT = 4  # rank 0 gets 4 utterances, rank 1 gets 2: uneven local batches


def _slice(batch, rows):
    rows = torch.tensor(rows)
    net = batch["net_input"]
    image_ids = batch["image_ids"][rows]
    unique, index = torch.unique(net["image_index"][rows], return_inverse=True)
    return {
        "id": batch["id"][rows],
        "net_input": {
            "source": net["source"][rows],
            "padding_mask": net["padding_mask"][rows],
            "images": net["images"][unique],
            "image_index": index,
        },
        "image_ids": image_ids,
        "ntokens": int((~net["padding_mask"][rows]).sum()),
        "split": "train",
    }


def _loss_and_grads(model, crit, sample):
    model.train()
    crit.set_update_num(7)
    loss, sample_size, log = crit(model, sample)
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return log, sample_size, grads


def _worker(rank, port, encoders, cmd_pairs, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_model(encoders)
    batch = make_batch(IMAGE_IDS)
    rows = list(range(SPLIT)) if rank == 0 else list(range(SPLIT, len(IMAGE_IDS)))
    log, sample_size, grads = _loss_and_grads(model, criterion(cmd_pairs=cmd_pairs), _slice(batch, rows))
    # what fairseq's trainer does: sum gradients and sample sizes over workers, then divide
    total = torch.tensor(float(sample_size))
    dist.all_reduce(total)
    loss = torch.tensor(log["loss"])
    dist.all_reduce(loss)
    for g in grads.values():
        dist.all_reduce(g)
        g.div_(total)
    if rank == 0:
        torch.save({"loss": loss / total, "grads": grads}, out_path)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(tiny_encoders, tmp_path, cmd_pairs):
    out = str(tmp_path / f"ddp_{cmd_pairs}.pt")
    mp.spawn(_worker, args=(_free_port(), tiny_encoders, cmd_pairs, out), nprocs=2, join=True)
    ddp = torch.load(out)
    torch.manual_seed(0)
    model = build_model(tiny_encoders)
    log, sample_size, grads = _loss_and_grads(model, criterion(cmd_pairs=cmd_pairs), make_batch(IMAGE_IDS))
    assert torch.allclose(ddp["loss"], torch.tensor(log["loss"] / sample_size), rtol=1e-5)
    assert set(ddp["grads"]) == set(grads)
    # errors relative to each tensor's largest gradient, floored at 1e-3 of the largest of all (as the
    # coarse-to-fine check below). Bound 5e-4: with the upstream frozen, layer_weights' gradient is a
    # sum over every frame and state of products with the frozen states (cancelling terms), and float32
    # summation in another order (two workers, one thread each) left 1.06e-4 and 1.38e-4 of its largest
    # entry in two runs at 1e-4; a missing gather or a wrong scale errs by O(1)
    floor = 1e-3 * max(float(g.abs().max()) for g in grads.values()) / sample_size
    for name, g in grads.items():
        ref = g / sample_size
        err = (ddp["grads"][name] - ref).abs().max() / ref.abs().max().clamp(min=floor)
        assert err < 5e-4, f"{name}: max error {err:.2e} of the largest gradient"
    # the fusion encoder and temperature received gradient: the check covers them
    assert grads["fusion.fc.weight"].abs().sum() > 0 and grads["logit_scale"].abs() > 0


def test_two_workers_match_one_process_all_pairs(tiny_encoders, tmp_path):
    _check(tiny_encoders, tmp_path, "all")


def test_two_workers_match_one_process_paired(tiny_encoders, tmp_path):
    _check(tiny_encoders, tmp_path, "paired")


def _validation_worker(rank, port, encoders, out_path):
    """Rank 0 validates a valid batch; rank 1 runs a training batch with the same image ids, as a
    worker does with fairseq's dummy batch when its shard of the valid split is exhausted."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_model(encoders).eval()
    batch = make_batch(IMAGE_IDS)
    rows = list(range(SPLIT)) if rank == 0 else list(range(SPLIT, len(IMAGE_IDS)))
    sample = _slice(batch, rows)
    sample["image_ids"] = torch.tensor([0, 0, 1, 1]) if rank == 0 else torch.tensor([0, 1])
    sample["split"] = "valid" if rank == 0 else "train"
    crit = criterion()
    with torch.no_grad():
        _, _, log = crit(model, sample)
    loss = torch.tensor(log["loss"])
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss, "embeddings": crit.last_embeddings}, out_path)
    dist.destroy_process_group()


def test_validation_positives_are_by_split_and_image(tiny_encoders, tmp_path):
    out = str(tmp_path / "valid.pt")
    mp.spawn(_validation_worker, args=(_free_port(), tiny_encoders, out), nprocs=2, join=True)
    ddp = torch.load(out)
    torch.manual_seed(0)
    model = build_model(tiny_encoders).eval()
    batch = make_batch(IMAGE_IDS)
    with torch.no_grad():
        # one process on the same six items, the train items' images made distinct from the valid ones
        distinct = dict(batch, image_ids=torch.tensor([0, 0, 1, 1, 100, 101]))
        _, _, ref = criterion()(model, distinct)
        merged = dict(batch, image_ids=torch.tensor([0, 0, 1, 1, 0, 1]))
        _, _, wrong = criterion()(model, merged)
    assert abs(float(ddp["loss"]) - ref["loss"]) < 1e-4 * abs(ref["loss"])
    assert abs(ref["loss"] - wrong["loss"]) > 1e-3  # the check can tell the two apart
    # the validation embeddings of every item are handed to the task with their split
    emb = ddp["embeddings"]
    assert emb["speech"].shape[0] == 6 and emb["split_codes"].unique().numel() == 2


# ---- coarse-to-fine: queue, distillation and SIM on 2 workers == one process ----

C2F_MODEL = dict(
    c2f_momentum=True,
    queue_size=8,
    multimodal_layers=1,
    multimodal_heads=2,
    multimodal_ffn_dim=32,
    multimodal_dropout=0.0,
    speech_encoder_heads=2,
)


def _c2f_setup(encoders):
    """A C2F model whose momentum copies differ from the online weights and whose queue holds 5
    entries (two of them of batch images), identical in every process."""
    from cmd_plugin.criterions.cmd_contrastive import CmdContrastiveConfig, CmdContrastiveCriterion
    from cmd_plugin.objectives.targets import split_code

    torch.manual_seed(0)
    model = build_model(encoders, **C2F_MODEL)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.momentum_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        emb = torch.nn.functional.normalize(torch.randn(5, model.image_encoder.embed_dim, generator=gen), dim=-1)
        keys = torch.tensor([[split_code("train"), i] for i in (0, 2, 40, 41, 42)])
        model.queue.enqueue(emb, emb.flip(0), keys)
    crit = CmdContrastiveCriterion(
        CmdContrastiveConfig(noise_seed=5, sim_weight=1.0, distill_alpha=0.4, distill_ramp_updates=0, cmd_weight=1.0),
        task=None,
    )
    return model, crit


def _c2f_worker(rank, port, encoders, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, crit = _c2f_setup(encoders)
    batch = make_batch(IMAGE_IDS)
    rows = list(range(SPLIT)) if rank == 0 else list(range(SPLIT, len(IMAGE_IDS)))
    log, sample_size, grads = _loss_and_grads(model, crit, _slice(batch, rows))
    total = torch.tensor(float(sample_size))
    dist.all_reduce(total)
    sums = {k: torch.tensor(float(log[k])) for k in ("loss", "sim_loss", "sim_correct", "sim_pairs")}
    for value in list(sums.values()) + list(grads.values()):
        dist.all_reduce(value)
    for g in grads.values():
        g.div_(total)
    torch.save({"sums": sums, "total": total, "grads": grads, "queue": model.queue.state_dict()}, f"{out_path}.{rank}")
    dist.destroy_process_group()


def test_two_workers_match_one_process_with_queue_distillation_and_sim(tiny_encoders, tmp_path):
    out = str(tmp_path / "ddp_c2f.pt")
    mp.spawn(_c2f_worker, args=(_free_port(), tiny_encoders, out), nprocs=2, join=True)
    model, crit = _c2f_setup(tiny_encoders)
    log, sample_size, grads = _loss_and_grads(model, crit, make_batch(IMAGE_IDS))
    ddp = torch.load(f"{out}.0")
    assert float(ddp["total"]) == sample_size == 6
    for key in ("loss", "sim_loss"):
        assert float(ddp["sums"][key]) == pytest.approx(log[key], rel=1e-5), key
    # the same hard negatives were drawn: as many pairs, classified the same
    for key in ("sim_correct", "sim_pairs"):
        assert float(ddp["sums"][key]) == pytest.approx(log[key], abs=1e-4), key
    assert log["sim_pairs"] == 18
    # errors relative to each tensor's largest gradient, floored at 1e-3 of the largest of all: the key part of
    # nn.MultiheadAttention's in_proj_bias has an analytically zero gradient (softmax ignores a per-row shift)
    floor = 1e-3 * max(float(g.abs().max()) for g in grads.values()) / sample_size
    for name, g in grads.items():
        ref = g / sample_size
        err = (ddp["grads"][name] - ref).abs().max() / ref.abs().max().clamp(min=floor)
        assert err < 1e-4, f"{name}: max error {err:.2e} of the largest gradient"
    assert grads["multimodal.image_proj.weight"].abs().sum() > 0 and grads["matching_head.proj.weight"].abs().sum() > 0
    # both workers hold the queue one process holds after enqueueing the global batch
    expected = model.queue.state_dict()
    assert int(expected["num_enqueued"]) == 11
    for rank in (0, 1):
        state = torch.load(f"{out}.{rank}")["queue"]
        for key, value in expected.items():
            if value.is_floating_point():
                assert torch.allclose(state[key], value, atol=1e-5), f"rank {rank}: queue {key} differs"
            else:
                assert torch.equal(state[key], value), f"rank {rank}: queue {key} differs"
