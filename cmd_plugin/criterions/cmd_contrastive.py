"""Criterion ``cmd_contrastive``: L = w_sic * L_sic + w_sim * L_sim + alpha * L_cmd over the global batch.

A thin loop: encode, gather the batch over the data-parallel workers (:class:`GlobalBatch`), add
the weighted objectives of :mod:`cmd_plugin.objectives` that are switched on, log. The objectives:

* SIC (always): :class:`~cmd_plugin.objectives.sic.SicObjective`, or, with a queue or momentum
  distillation, :class:`~cmd_plugin.objectives.c2f.queue_sic.QueueSicObjective`;
* CMD (``cmd_weight`` > 0): :class:`~cmd_plugin.objectives.cmd.objective.CmdObjective`;
* SIM (``sim_weight`` > 0): :class:`~cmd_plugin.objectives.c2f.sim.SimObjective`.

Losses are sums over the global batch and ``sample_size`` is the local batch size, so fairseq's
(sum of worker gradients) / (total sample size) is the gradient of the global mean loss. Logged
values are this worker's share of global sums, so that fairseq sums them across workers. At
validation the (global) embeddings are left in ``last_embeddings`` for the task's whole-split
retrieval.
"""

from dataclasses import dataclass, field
from typing import List

import torch

from ..quiet import import_fairseq

import_fairseq()  # before fairseq's modules: without its known-harmless import-time notes

from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from ..distributed import (
    data_parallel_group_and_size,
    gather_sequences_with_local_grad,
    gather_with_local_grad,
    replicated_param,
)
from ..modules.multimodal import image_tokens
from ..objectives.batch import GlobalBatch
from ..objectives.c2f.queue_sic import QueueSicObjective
from ..objectives.c2f.sim import SimObjective
from ..objectives.cmd.objective import CmdObjective
from ..objectives.targets import item_keys, split_code


@dataclass
class CmdContrastiveConfig(FairseqDataclass):
    cmd_weight: float = field(default=1.0, metadata={"help": "alpha: weight of the CMD loss (0 = contrastive only)"})
    patch_noise_ratio: float = field(
        default=0.3, metadata={"help": "share of each image's patches replaced by other images' patches"}
    )
    cmd_pairs: ChoiceEnum(["all", "paired"]) = field(
        default="all",
        metadata={
            "help": "all: reconstruct every image with every speech as query (B^2 fusions); "
            "paired: only with its own caption (B fusions, cheaper)"
        },
    )
    global_batch_negatives: bool = field(
        default=True, metadata={"help": "gather features from all data-parallel workers for negatives"}
    )
    noise_seed: int = field(
        default=II("common.seed"), metadata={"help": "seed of the patch noise and of the SIM hard-negative sampling"}
    )
    # ---- coarse-to-fine alignment (second paper) ----
    sic_weight: float = field(
        default=1.0,
        metadata={"help": "weight of L_sic (speech-image contrastive); SIC alone: cmd_weight=0, sim_weight=0"},
    )
    sim_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of L_sim (speech-image matching on hard negatives; needs "
            "model.multimodal_layers > 0); 0 = off. ALBEF weighs its ITM loss 1 (a choice)"
        },
    )
    sim_hard_start: int = field(
        default=0,
        metadata={
            "help": "SIM negatives are random (any other image/caption) before this update, then hard "
            "(0 = hard from the start, ALBEF)"
        },
    )
    sim_hard_ramp: int = field(
        default=0,
        metadata={
            "help": "after sim_hard_start, the share of hard SIM negatives rises linearly from 0 to 1 "
            "over this many updates (0 = all at once)"
        },
    )
    queue_start: int = field(
        default=0, metadata={"help": "the queue is scored and filled from this update on (0 = from the start, ALBEF)"}
    )
    distill_alpha: float = field(
        default=0.0,
        metadata={
            "help": "alpha_md: SIC targets = alpha_md * momentum softmax + (1 - alpha_md) * "
            "multi-positive targets (needs model.c2f_momentum)"
        },
    )
    distill_ramp_updates: int = field(
        default=-1,
        metadata={
            "help": "alpha_md rises linearly from 0 over this many optimizer updates (-1 = the "
            "first epoch, ALBEF; 0 = no ramp)"
        },
    )
    update_freq: List[int] = field(
        default=II("optimization.update_freq"),
        metadata={"help": "fairseq's update_freq (read, not set here): converts the first epoch's batches to updates"},
    )


@register_criterion("cmd_contrastive", dataclass=CmdContrastiveConfig)
class CmdContrastiveCriterion(FairseqCriterion):
    def __init__(self, cfg: CmdContrastiveConfig, task):
        super().__init__(task)
        self.cfg = cfg
        self.update_num = 0
        self.last_embeddings = None
        self.keep_sequences = False  # validation keeps speech sequences and image tokens (re-ranked recall)
        weights = (cfg.sic_weight, cfg.cmd_weight, cfg.sim_weight)
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(
                f"criterion loss weights sic_weight/cmd_weight/sim_weight = {weights}: each must be >= 0 "
                "and at least one > 0"
            )
        self.sic = QueueSicObjective(
            cfg.distill_alpha, cfg.distill_ramp_updates, lambda: cfg.update_freq, queue_start=cfg.queue_start
        )
        # (weight, objective) in the order their terms are added
        self.objectives = [(cfg.sic_weight, self.sic)]
        if cfg.sim_weight > 0:
            self.objectives.append(
                (cfg.sim_weight, SimObjective(cfg.noise_seed, cfg.sim_hard_start, cfg.sim_hard_ramp))
            )
        if cfg.cmd_weight > 0:
            self.objectives.append((cfg.cmd_weight, CmdObjective(cfg.patch_noise_ratio, cfg.cmd_pairs, cfg.noise_seed)))
        self._checked = None

    # ---- what the task tells the criterion ----
    def set_update_num(self, update_num: int) -> None:
        """Optimizer updates done: the noise and negatives of update u are drawn from seed (noise_seed, u)."""
        self.update_num = update_num

    def set_epoch_batches(self, num_batches: int) -> None:
        """Training batches of one epoch on this worker (the distillation ramp's first epoch)."""
        self.sic.epoch_batches = num_batches

    def set_dummy_batch(self, dummy: bool) -> None:
        """fairseq's dummy batch (a repeated batch, no gradient) must not enter the queue."""
        self.sic.enqueue_enabled = not dummy

    def check_model(self, model) -> None:
        """Each objective's parts exist, and no part is built that no objective trains."""
        if self._checked is model:
            return
        for _, objective in self.objectives:
            objective.check_model(model)
        if getattr(model, "fusion", None) is not None and self.cfg.cmd_weight == 0:
            raise ValueError(
                "model.cmd_fusion=true builds the CMD fusion encoder but criterion.cmd_weight=0 never "
                "trains it: set model.cmd_fusion=false (method=sic or method=c2f do)"
            )
        if getattr(model, "multimodal", None) is not None and self.cfg.sim_weight == 0:
            raise ValueError(
                "model.multimodal_layers > 0 builds the SIM encoder but criterion.sim_weight=0 never "
                "trains it: set model.multimodal_layers=0"
            )
        self._checked = model

    def forward(self, model, sample, reduce=True):
        self.check_model(model)
        out = model(**sample["net_input"])
        batch, local_items, gathered = self._global_batch(model, sample, out)
        loss, logging_output = 0.0, {}
        for weight, objective in self.objectives:
            term, logs = objective(model, batch)
            loss = loss + (term if weight == 1.0 else weight * term)
            logging_output.update(logs)
        # every worker computed the global sums: log this worker's share so that fairseq's
        # sum over workers gives the global sums once
        share = batch.local_size / batch.size
        logging_output = {key: value * share for key, value in logging_output.items()}
        logging_output.update(
            {
                "loss": loss.item() * share,
                "temperature": 1.0 / batch.logit_scale.item() * batch.local_size,
                "ntokens": sample["ntokens"],
                # padded samples, or padded frames when the upstream's states are cached
                "padded_samples": int(
                    sample["net_input"].get("padding_mask", sample["net_input"].get("speech_frame_mask")).sum()
                ),
                "nsentences": batch.local_size,
                "sample_size": batch.local_size,
            }
        )
        self.last_embeddings = None
        if not model.training:
            self.last_embeddings = self._validation_embeddings(batch, gathered)
        else:
            self.sic.enqueue(model, batch, local_items)
        return loss, batch.local_size, logging_output

    def _global_batch(self, model, sample, out):
        """The forward's outputs as a :class:`GlobalBatch` (gathered over workers when the loss uses
        global negatives), this worker's queue items, and the gathered tensors kept for validation."""
        speech, image, patches = out["speech"], out["image"], out["patches"]
        image_ids = sample["image_ids"].to(speech.device)
        sample_ids = sample["id"].to(speech.device)
        local_size = speech.size(0)
        # which split each item is from: under uneven shards a worker may run fairseq's dummy batch
        split_codes = torch.full_like(sample_ids, split_code(sample["split"]))
        group, dp_world = data_parallel_group_and_size()
        speech_m = out.get("speech_m")
        local_items = (speech if speech_m is None else speech_m, image, item_keys(split_codes, image_ids))
        seq, seq_mask = out.get("speech_seq"), out.get("speech_mask")
        use_sim = self.cfg.sim_weight > 0
        keep_seq = use_sim or (self.keep_sequences and not model.training)
        world, gathered, seq_is_global = dp_world, None, True
        # validation scores the whole split whatever the negatives: items are gathered from every
        # worker for the task's retrieval even when the loss uses local negatives only
        if dp_world > 1 and (self.cfg.global_batch_negatives or not model.training):
            gathered = [gather_with_local_grad(t, group) for t in (speech, image, image_ids, sample_ids, split_codes)]
        if self.cfg.global_batch_negatives and gathered is not None:
            speech, image, image_ids, sample_ids, split_codes = gathered
            if self.cfg.cmd_weight > 0 or keep_seq:
                patches = gather_with_local_grad(patches, group)
            if keep_seq:
                seq, seq_mask = gather_sequences_with_local_grad(seq, seq_mask, group)
            if speech_m is not None:
                speech_m = gather_with_local_grad(speech_m, group)
        else:
            world = 1  # the loss sees this worker's batch only
            seq_is_global = gathered is None  # a single process: the local batch is the global one
        if gathered is None:
            gathered = (speech, image, image_ids, sample_ids, split_codes)
        batch = GlobalBatch(
            speech=speech,
            image=image,
            patches=patches,
            keys=item_keys(split_codes, image_ids),
            logit_scale=replicated_param(model.clamped_logit_scale(), world),
            world=world,
            local_size=local_size,
            training=model.training,
            update_num=self.update_num,
            seq=seq,
            seq_mask=seq_mask,
            speech_m=speech_m,
            group=group,
            dp_world=dp_world,
            seq_is_global=seq_is_global,
        )
        return batch, local_items, gathered

    def _validation_embeddings(self, batch: GlobalBatch, gathered):
        """The whole batch's embeddings for the task's whole-split recall (CPU, fp16)."""
        names = ("speech", "image", "image_ids", "ids", "split_codes")
        emb = {name: t.detach().cpu() for name, t in zip(names, gathered)}
        for name in ("speech", "image"):
            emb[name] = emb[name].half()
        if self.keep_sequences:
            seq, seq_mask, patches, image = batch.seq, batch.seq_mask, batch.patches, batch.image
            if not batch.seq_is_global:  # the loss used local negatives: gather for the split's recall
                seq, seq_mask = gather_sequences_with_local_grad(seq, seq_mask, batch.group)
                patches = gather_with_local_grad(patches, batch.group)
                image = gathered[1]
            lengths = (seq.size(1) - seq_mask.sum(dim=1)) if seq_mask is not None else None
            emb["speech_seq"] = [
                seq[i, : (int(lengths[i]) if lengths is not None else seq.size(1))].detach().half().cpu()
                for i in range(seq.size(0))
            ]
            emb["image_tokens"] = image_tokens(image.float(), patches.float()).detach().half().cpu()
        return emb

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        total = sum(log.get("sample_size", 0) for log in logging_outputs)
        if total == 0:
            return

        def log_scalar(key, value, weight, precision):
            metrics.log_scalar(key, value, weight, round=precision)

        log_scalar("loss", sum(log.get("loss", 0) for log in logging_outputs) / total, total, 4)
        for objective in (QueueSicObjective, SimObjective, CmdObjective):
            objective.reduce_metrics(logging_outputs, total, log_scalar)
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
