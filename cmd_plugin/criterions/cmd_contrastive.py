"""Criterion ``cmd_contrastive``: L = w_sic * L_sic + alpha * L_cmd + w_sim * L_sim over the global batch.

* L_sic: symmetric multi-positive InfoNCE between S_cls and I_cls (paper Eq. 3-5).
* L_cmd: patches of every image are noised (a share replaced by other images' patches), the
  fusion encoder reconstructs F' with speech as the query, and F' is contrasted with speech
  (Eq. 6). ``cmd_pairs=all`` scores every speech i against image j's reconstruction made with
  query i (B x B reconstructions); ``paired`` reconstructs image j with its own caption only.

Coarse-to-fine alignment (the second paper; :mod:`cmd_plugin.objectives.c2f.losses`), active when the model
has the parts: with a queue (``model.queue_size``) L_sic scores the batch against [batch; queue]
and the queue is filled from the global batch AFTER the loss (training forwards only, never
validation; a fairseq dummy batch and non-finite embeddings add nothing); with ``distill_alpha`` > 0 the SIC targets are
mixed with the momentum model's (ramped from 0); with ``sim_weight`` > 0, L_sim is the matching
head's cross-entropy on the batch's pairs plus one hard negative per speech and per image,
sampled on the global batch from a generator seeded by (noise_seed, update) on every worker.
With none of them L_sic is computed exactly as before.

Losses are sums over the global batch; ``sample_size`` is the local batch size, so fairseq's
(sum of worker gradients) / (total sample size) is the gradient of the global mean loss.
Logged values are this worker's share, so that fairseq sums them across workers (fast stat
sync, on CPU gloo too). At validation the (global) embeddings are left in ``last_embeddings``
for the task's whole-split retrieval.
"""

import math
import zlib
from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F

from ..quiet import import_fairseq

import_fairseq()  # before fairseq's modules: without its known-harmless import-time notes

from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II
from torch.func import functional_call

from ..objectives.c2f.losses import queue_sic_loss, sim_loss, sim_pairs
from ..objectives.c2f.distillation import distillation_weight
from ..distributed import (
    data_parallel_group_and_size,
    gather_sequences_with_local_grad,
    gather_with_local_grad,
    replicated_param,
)
from ..objectives.sic import in_batch_accuracy, symmetric_infonce
from ..objectives.c2f.multimodal import image_tokens
from ..objectives.c2f.queue import enqueue_global_batch
from ..objectives.cmd.fusion import attention_statistics, diagonal_pairs
from ..objectives.cmd.noise import apply_patch_noise, draw_patch_noise


def split_code(split: str) -> int:
    """A split name as an integer that can travel in a tensor collective."""
    return zlib.crc32(split.encode("utf-8"))


def item_identities(split_codes: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """(B,) split codes and (B,) image ids -> (B,) identities equal exactly when both are.

    Image ids are only unique within a split; a worker running fairseq's dummy batch (a training
    batch) at validation must not make a train image a positive of a valid image.
    """
    pairs = torch.stack([split_codes.long(), image_ids.long()], dim=1)
    return torch.unique(pairs, dim=0, return_inverse=True)[1]


# values computed on the global batch by every worker: logged as this worker's share
ATTENTION_STATS = ("attn_entropy", "attn_max", "attn_cos_mean_pool")
GLOBAL_SUMS = ("cmd_loss", "cmd_correct", "sim_loss", "sim_correct", "sim_pairs") + ATTENTION_STATS


@dataclass
class CmdContrastiveConfig(FairseqDataclass):
    cmd_weight: float = field(default=1.0, metadata={"help": "alpha: weight of the CMD loss (0 = contrastive only)"})
    patch_noise_ratio: float = field(
        default=0.3, metadata={"help": "share of each image's patches replaced by other images' patches"}
    )
    cmd_pairs: ChoiceEnum(["all", "paired"]) = field(
        default="all",
        metadata={"help": "all: reconstruct every image with every speech as query (B^2 fusions); "
                  "paired: only with its own caption (B fusions, cheaper)"},
    )
    global_batch_negatives: bool = field(
        default=True, metadata={"help": "gather features from all data-parallel workers for negatives"}
    )
    noise_seed: int = field(
        default=II("common.seed"), metadata={"help": "seed of the patch noise and of the SIM hard-negative sampling"})
    # ---- coarse-to-fine alignment (second paper) ----
    sic_weight: float = field(
        default=1.0, metadata={"help": "weight of L_sic (speech-image contrastive); SIC alone: cmd_weight=0, "
                               "sim_weight=0"})
    sim_weight: float = field(
        default=0.0, metadata={"help": "weight of L_sim (speech-image matching on hard negatives; needs "
                               "model.multimodal_layers > 0); 0 = off. ALBEF weighs its ITM loss 1 (a choice)"})
    distill_alpha: float = field(
        default=0.0, metadata={"help": "alpha_md: SIC targets = alpha_md * softmax(momentum logits) + (1 - alpha_md) * "
                               "multi-positive targets (needs model.c2f_momentum); 0 = no distillation. ALBEF: 0.4 "
                               "(a choice: the paper gives no value)"})
    distill_ramp_updates: int = field(
        default=-1, metadata={"help": "alpha_md rises linearly from 0 over this many optimizer updates; -1 = over "
                              "the first epoch (ALBEF; its updates counted from the training iterator and "
                              "update_freq), 0 = no ramp"})
    update_freq: List[int] = field(
        default=II("optimization.update_freq"),
        metadata={"help": "fairseq's update_freq (read, not set here): converts the first epoch's batches to updates"})


@register_criterion("cmd_contrastive", dataclass=CmdContrastiveConfig)
class CmdContrastiveCriterion(FairseqCriterion):
    def __init__(self, cfg: CmdContrastiveConfig, task):
        super().__init__(task)
        self.cfg = cfg
        self.update_num = 0
        self.last_embeddings = None
        # set by the task: whether this training forward may fill the queue (False for fairseq's
        # dummy batches), batches per epoch of this worker (for the distillation ramp), and
        # whether validation keeps the speech sequences and image tokens (re-ranked recall)
        self.enqueue_enabled = True
        self.epoch_batches = None
        self.keep_sequences = False
        weights = (cfg.sic_weight, cfg.cmd_weight, cfg.sim_weight)
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"criterion loss weights sic_weight/cmd_weight/sim_weight = {weights}: each must be >= 0 "
                             "and at least one > 0")
        if not 0.0 <= cfg.distill_alpha <= 1.0:
            raise ValueError(f"criterion.distill_alpha must be in [0, 1], got {cfg.distill_alpha}")
        if cfg.distill_ramp_updates < -1:
            raise ValueError(f"criterion.distill_ramp_updates must be -1 (first epoch), 0 or positive, "
                             f"got {cfg.distill_ramp_updates}")

    def set_update_num(self, update_num: int) -> None:
        """The noise of update u is drawn from seed (noise_seed, u): equal on every worker."""
        self.update_num = update_num

    def set_epoch_batches(self, num_batches: int) -> None:
        """Number of training batches of one epoch on this worker (the task reads it from the iterator)."""
        self.epoch_batches = num_batches

    def distill_ramp(self) -> int:
        """Updates over which alpha_md ramps (distill_ramp_updates; -1 = the first epoch's updates)."""
        if self.cfg.distill_ramp_updates >= 0:
            return self.cfg.distill_ramp_updates
        if not self.epoch_batches:
            raise ValueError("criterion.distill_ramp_updates=-1 ramps over the first epoch, whose length is not known "
                             "here (no training iterator from task speech_image): give a number of updates")
        freq = self.cfg.update_freq
        freq = int(freq[0]) if isinstance(freq, (list, tuple)) or hasattr(freq, "__getitem__") else int(freq)
        return max(1, math.ceil(self.epoch_batches / max(1, freq)))

    def current_distill_alpha(self) -> float:
        if self.cfg.distill_alpha == 0:
            return 0.0
        return distillation_weight(self.update_num, self.cfg.distill_alpha, self.distill_ramp())

    def _check_model(self, model) -> None:
        if self.cfg.sim_weight > 0 and getattr(model, "multimodal", None) is None:
            raise ValueError("criterion.sim_weight > 0 needs the matching head: set model.multimodal_layers > 0")
        if self.cfg.distill_alpha > 0 and getattr(model, "momentum_model", None) is None:
            raise ValueError("criterion.distill_alpha > 0 needs the momentum model: set model.c2f_momentum=true")

    def forward(self, model, sample, reduce=True):
        self._check_model(model)
        out = model(**sample["net_input"])
        speech, image, patches = out["speech"], out["image"], out["patches"]
        image_ids = sample["image_ids"].to(speech.device)
        local_bsz = speech.size(0)

        sample_ids = sample["id"].to(speech.device)
        # which split each item is from: under uneven shards a worker may run fairseq's dummy batch
        split_codes = torch.full_like(sample_ids, split_code(sample["split"]))
        group, world = data_parallel_group_and_size()
        dp_world = world
        queue = getattr(model, "queue", None) if model.training else None
        speech_m = out.get("speech_m")
        # this worker's items, for the queue (filled from the global batch after the loss)
        local_queue_items = (speech if speech_m is None else speech_m, image,
                             torch.stack([split_codes, image_ids], dim=1))
        use_sim = self.cfg.sim_weight > 0
        seq, seq_mask = out.get("speech_seq"), out.get("speech_mask")
        keep_seq = use_sim or (self.keep_sequences and not model.training)
        gathered = None
        # validation scores the whole split whatever the negatives: items are gathered from every
        # worker for the task's retrieval even when the loss uses local negatives only
        if world > 1 and (self.cfg.global_batch_negatives or not model.training):
            gathered = [gather_with_local_grad(t, group) for t in (speech, image, image_ids, sample_ids, split_codes)]
        seq_is_global = gathered is None  # a single process: the local batch is the global one
        if self.cfg.global_batch_negatives and gathered is not None:
            speech, image, image_ids, sample_ids, split_codes = gathered
            if self.cfg.cmd_weight > 0 or keep_seq:
                patches = gather_with_local_grad(patches, group)
            if keep_seq:
                seq, seq_mask = gather_sequences_with_local_grad(seq, seq_mask, group)
                seq_is_global = True
            if speech_m is not None:
                speech_m = gather_with_local_grad(speech_m, group)
        else:
            world = 1  # the loss sees this worker's batch only
        global_bsz = speech.size(0)
        identities = item_identities(split_codes, image_ids)
        keys = torch.stack([split_codes, image_ids], dim=1).long()

        logit_scale = replicated_param(model.clamped_logit_scale(), world)
        scores = speech.float() @ image.float().t()
        alpha = self.current_distill_alpha() if model.training else 0.0
        logging_output = {}
        if queue is None and alpha == 0:  # the CMD paper's in-batch SIC
            sic, sic_s2i, sic_i2s = symmetric_infonce(scores, identities, identities, logit_scale)
        else:
            entries = queue.entries() if queue is not None else (None, None, None)
            sic, sic_s2i, sic_i2s, _ = queue_sic_loss(
                speech, image, keys, logit_scale, *entries, speech_m=speech_m, alpha=alpha
            )
            logging_output["distill_alpha"] = alpha * local_bsz
            if queue is not None:
                logging_output["queue_negatives"] = entries[0].size(0) * local_bsz
        loss = sic if self.cfg.sic_weight == 1.0 else self.cfg.sic_weight * sic
        if use_sim:
            sim, correct, num_pairs = self._sim_loss(model, scores * logit_scale, keys, seq, seq_mask, image, patches,
                                                     world)
            loss = loss + self.cfg.sim_weight * sim
            logging_output.update({"sim_loss": sim.item(), "sim_correct": correct, "sim_pairs": num_pairs})
        if self.cfg.cmd_weight > 0:
            cmd, cmd_scores, stats = self._cmd_loss(model, speech, patches, identities, logit_scale, world)
            loss = loss + self.cfg.cmd_weight * cmd
            logging_output["cmd_loss"] = cmd.item()
            logging_output["cmd_correct"] = in_batch_accuracy(cmd_scores, identities, identities)
            logging_output.update({key: value.item() for key, value in stats.items()})

        # every worker computed the global sums: log this worker's share so that fairseq's
        # sum over workers gives the global sums once
        share = local_bsz / global_bsz
        for key in GLOBAL_SUMS:
            if key in logging_output:
                logging_output[key] *= share
        logging_output.update(
            {
                "loss": loss.item() * share,
                "sic_loss": sic.item() * share,
                "sic_s2i_loss": sic_s2i.item() * share,
                "sic_i2s_loss": sic_i2s.item() * share,
                "s2i_correct": in_batch_accuracy(scores, identities, identities) * share,
                "i2s_correct": in_batch_accuracy(scores.t(), identities, identities) * share,
                "temperature": 1.0 / logit_scale.item() * local_bsz,
                "ntokens": sample["ntokens"],
                "padded_samples": int(sample["net_input"]["padding_mask"].sum()),
                "nsentences": local_bsz,
                "sample_size": local_bsz,
            }
        )
        self.last_embeddings = None
        if not model.training:
            # validation retrieval runs on the whole split: the task collects these
            if gathered is None:
                gathered = (speech, image, image_ids, sample_ids, split_codes)
            names = ("speech", "image", "image_ids", "ids", "split_codes")
            self.last_embeddings = {name: t.detach().cpu() for name, t in zip(names, gathered)}
            for name in ("speech", "image"):
                self.last_embeddings[name] = self.last_embeddings[name].half()
            if self.keep_sequences:
                if not seq_is_global:  # the loss used local negatives: gather for the split's recall
                    seq, seq_mask = gather_sequences_with_local_grad(seq, seq_mask, group)
                    patches = gather_with_local_grad(patches, group)
                    image = gathered[1]
                lengths = (seq.size(1) - seq_mask.sum(dim=1)) if seq_mask is not None else None
                self.last_embeddings["speech_seq"] = [
                    seq[i, : (int(lengths[i]) if lengths is not None else seq.size(1))].detach().half().cpu()
                    for i in range(seq.size(0))
                ]
                self.last_embeddings["image_tokens"] = image_tokens(image.float(), patches.float()).detach().half().cpu()
        elif queue is not None:
            # after the loss read the queue: this batch is never its own queue negative. Every
            # worker takes part in the gather; a dummy batch contributes no rows
            items = local_queue_items if self.enqueue_enabled else tuple(t[:0] for t in local_queue_items)
            # a non-finite item (a bad utterance; the task reports the batch) would poison every later loss
            finite = torch.isfinite(items[0]).all(dim=1) & torch.isfinite(items[1]).all(dim=1)
            if not bool(finite.all()):
                items = tuple(t[finite] for t in items)
            enqueue_global_batch(queue, *items, group=group, world_size=dp_world)
        return loss, local_bsz, logging_output

    def _sim_loss(self, model, sic_logits, keys, seq, seq_mask, image, patches, world):
        """L_sim on the (global) batch: B positives + one hard negative per speech and per image,
        drawn with the generator of (noise_seed, update) -> (loss sum, correct pairs, pairs)."""
        generator = torch.Generator().manual_seed((self.cfg.noise_seed * 1_000_003 + self.update_num) * 2 + 1)
        speech_index, image_index, labels = sim_pairs(sic_logits.detach(), keys, generator)
        dev = seq.device
        speech_index, image_index, labels = speech_index.to(dev), image_index.to(dev), labels.to(dev)
        tokens = image_tokens(image, patches)
        mm_params = {n: replicated_param(p, world) for n, p in model.multimodal.named_parameters()}
        head_params = {n: replicated_param(p, world) for n, p in model.matching_head.named_parameters()}
        fused = functional_call(
            model.multimodal, mm_params,
            (seq[speech_index], None if seq_mask is None else seq_mask[speech_index], tokens[image_index]),
        )[:, 0]
        logits = functional_call(model.matching_head, head_params, (fused,))
        loss, correct = sim_loss(logits, labels, keys.size(0))
        return loss, correct, int(labels.numel())

    def _cmd_loss(self, model, speech, patches, identities, logit_scale, world):
        """L_cmd (paper Eq. 6) on the (global) batch, with the fusion attention's statistics."""
        generator = torch.Generator().manual_seed(self.cfg.noise_seed * 1_000_003 + self.update_num)
        positions, sources = draw_patch_noise(identities, patches.size(1), self.cfg.patch_noise_ratio, generator)
        noisy = apply_patch_noise(patches, positions, sources)
        params = {name: replicated_param(p, world) for name, p in model.fusion.named_parameters()}
        all_pairs = self.cfg.cmd_pairs == "all"
        recon, attn = functional_call(model.fusion, params, (speech, noisy),
                                      {"all_pairs": all_pairs, "return_attention": True})
        if all_pairs:  # (B, B, E): recon[i, j] = image j reconstructed with speech i as the query
            own_attn, own_recon = diagonal_pairs(attn, recon)
            recon = F.normalize(recon.float(), dim=-1)
            cmd_scores = torch.einsum("ie,ije->ij", speech.float(), recon)
        else:  # (B, E): image j reconstructed with its own caption
            own_attn, own_recon = attn, recon
            recon = F.normalize(recon.float(), dim=-1)
            cmd_scores = speech.float() @ recon.t()
        cmd, _, _ = symmetric_infonce(cmd_scores, identities, identities, logit_scale)
        with torch.no_grad():
            stats = attention_statistics(own_attn, own_recon, model.fusion.mean_pooled(noisy))
        return cmd, cmd_scores, stats

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        total = sum(log.get("sample_size", 0) for log in logging_outputs)
        if total == 0:
            return
        for key in ("loss", "sic_loss", "sic_s2i_loss", "sic_i2s_loss", "cmd_loss") + ATTENTION_STATS:
            if any(key in log for log in logging_outputs):
                metrics.log_scalar(key, sum(log.get(key, 0) for log in logging_outputs) / total, total, round=4)
        for key in ("s2i_correct", "i2s_correct", "cmd_correct"):
            if any(key in log for log in logging_outputs):
                acc = 100.0 * sum(log.get(key, 0) for log in logging_outputs) / total
                metrics.log_scalar(key.replace("correct", "acc"), acc, total, round=2)
        if any("sim_loss" in log for log in logging_outputs):
            metrics.log_scalar("sim_loss", sum(log.get("sim_loss", 0) for log in logging_outputs) / total, total,
                               round=4)
            pairs = sum(log.get("sim_pairs", 0) for log in logging_outputs)
            if pairs > 0:  # share of the SIM pairs (positives and hard negatives) classified right
                acc = 100.0 * sum(log.get("sim_correct", 0) for log in logging_outputs) / pairs
                metrics.log_scalar("sim_acc", acc, pairs, round=2)
        for key in ("distill_alpha", "queue_negatives"):  # logged x local batch size: summable
            if any(key in log for log in logging_outputs):
                metrics.log_scalar(key, sum(log.get(key, 0) for log in logging_outputs) / total, 0, round=4)
        padded = sum(log.get("padded_samples", 0) for log in logging_outputs)
        real = sum(log.get("ntokens", 0) for log in logging_outputs)
        if padded + real > 0:
            # share of the audio batch that is padding: what length-ordered batching saves
            metrics.log_scalar("pad_pct", 100.0 * padded / (padded + real), padded + real, round=2)
        # logged as temperature x local batch size: summable over workers
        temperature = sum(log.get("temperature", 0) for log in logging_outputs) / total
        metrics.log_scalar("temperature", temperature, 0, round=4)
        metrics.log_scalar("nsentences", sum(log.get("nsentences", 0) for log in logging_outputs), round=0)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
