"""Criterion ``cmd_contrastive``: L = L_sic + alpha * L_cmd over the global batch.

* L_sic: symmetric multi-positive InfoNCE between S_cls and I_cls (paper Eq. 3-5).
* L_cmd: patches of every image are noised (a share replaced by other images' patches), the
  fusion encoder reconstructs F' with speech as the query, and F' is contrasted with speech
  (Eq. 6). ``cmd_pairs=all`` scores every speech i against image j's reconstruction made with
  query i (B x B reconstructions); ``paired`` reconstructs image j with its own caption only.

Losses are sums over the global batch; ``sample_size`` is the local batch size, so fairseq's
(sum of worker gradients) / (total sample size) is the gradient of the global mean loss.
Logged values are this worker's share, so that fairseq sums them across workers (fast stat
sync, on CPU gloo too). At validation the (global) embeddings are left in ``last_embeddings``
for the task's whole-split retrieval.
"""

import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II
from torch.func import functional_call

from ..distributed import data_parallel_group_and_size, gather_with_local_grad, replicated_param
from ..losses import in_batch_accuracy, symmetric_infonce
from ..models.fusion import attention_statistics, diagonal_pairs
from ..noise import apply_patch_noise, draw_patch_noise


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
GLOBAL_SUMS = ("cmd_loss", "cmd_correct") + ATTENTION_STATS


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
    noise_seed: int = field(default=II("common.seed"), metadata={"help": "seed of the patch noise"})


@register_criterion("cmd_contrastive", dataclass=CmdContrastiveConfig)
class CmdContrastiveCriterion(FairseqCriterion):
    def __init__(self, cfg: CmdContrastiveConfig, task):
        super().__init__(task)
        self.cfg = cfg
        self.update_num = 0
        self.last_embeddings = None

    def set_update_num(self, update_num: int) -> None:
        """The noise of update u is drawn from seed (noise_seed, u): equal on every worker."""
        self.update_num = update_num

    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        speech, image, patches = out["speech"], out["image"], out["patches"]
        image_ids = sample["image_ids"].to(speech.device)
        local_bsz = speech.size(0)

        sample_ids = sample["id"].to(speech.device)
        # which split each item is from: under uneven shards a worker may run fairseq's dummy batch
        split_codes = torch.full_like(sample_ids, split_code(sample["split"]))
        group, world = data_parallel_group_and_size()
        gathered = None
        # validation scores the whole split whatever the negatives: items are gathered from every
        # worker for the task's retrieval even when the loss uses local negatives only
        if world > 1 and (self.cfg.global_batch_negatives or not model.training):
            gathered = [gather_with_local_grad(t, group) for t in (speech, image, image_ids, sample_ids, split_codes)]
        if self.cfg.global_batch_negatives and gathered is not None:
            speech, image, image_ids, sample_ids, split_codes = gathered
            if self.cfg.cmd_weight > 0:
                patches = gather_with_local_grad(patches, group)
        else:
            world = 1  # the loss sees this worker's batch only
        global_bsz = speech.size(0)
        identities = item_identities(split_codes, image_ids)

        logit_scale = replicated_param(model.clamped_logit_scale(), world)
        scores = speech.float() @ image.float().t()
        sic, sic_s2i, sic_i2s = symmetric_infonce(scores, identities, identities, logit_scale)
        loss = sic
        logging_output = {}
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
        return loss, local_bsz, logging_output

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
