"""L_sim, C2F's speech-image matching: the matching head classifies the batch's pairs and one negative
per speech and per image (:func:`.losses.sim_pairs`).

Negatives follow a curriculum (:func:`.hard_negatives.hard_negative_share`): random (any other
image / caption) before ``hard_start`` updates, then a share of hard negatives (mined from the SIC
similarities, ALBEF's) rising to 1 over ``hard_ramp`` updates. A randomly initialised multimodal
encoder cannot learn from hard negatives alone: its loss stays at the prior's entropy.
Negatives are drawn on the global batch from a generator seeded by (noise_seed, update), the same
on every worker. The multimodal encoder and matching head (:mod:`.multimodal`) are the model's
``multimodal`` and ``matching_head``.

Logged: ``sim_loss`` next to ``sim_prior`` (the entropy of the pairs' label share: the loss of a head
that ignores its input), ``sim_acc``, and the AUC of the match log-odds of positives against hard
(``sim_auc_hard``) and random (``sim_auc_random``) negatives. Validation draws both kinds for
every item; its loss uses the hard ones (as in training after the ramp).
"""

from typing import Dict, Tuple

import torch
from torch.func import functional_call

from ...distributed import replicated_param
from ...modules.multimodal import image_tokens
from ..batch import GlobalBatch, Objective, present, summed
from .hard_negatives import hard_negative_share
from .losses import binary_entropy, ranking_pairs, sim_loss, sim_pairs

__all__ = ["SimObjective"]


class SimObjective(Objective):
    def __init__(self, noise_seed: int = 1, hard_start: int = 0, hard_ramp: int = 0):
        hard_negative_share(0, hard_start, hard_ramp)  # checks the schedule
        self.noise_seed, self.hard_start, self.hard_ramp = noise_seed, hard_start, hard_ramp

    def check_model(self, model) -> None:
        if getattr(model, "multimodal", None) is None:
            raise ValueError("criterion.sim_weight > 0 needs the matching head: set model.multimodal_layers > 0")

    def hard_share(self, update_num: int) -> float:
        return hard_negative_share(update_num, self.hard_start, self.hard_ramp)

    def __call__(self, model, batch: GlobalBatch) -> Tuple[torch.Tensor, Dict[str, float]]:
        generator = torch.Generator().manual_seed((self.noise_seed * 1_000_003 + batch.update_num) * 2 + 1)
        shares = (self.hard_share(batch.update_num),) if batch.training else (1.0, 0.0)
        pairs = sim_pairs((batch.scores * batch.logit_scale).detach(), batch.keys, generator, shares)
        dev = batch.seq.device
        speech_index, image_index = pairs.speech_index.to(dev), pairs.image_index.to(dev)
        labels, hard = pairs.labels.to(dev), pairs.hard.to(dev)
        tokens = image_tokens(batch.image, batch.patches)
        mm_params = {n: replicated_param(p, batch.world) for n, p in model.multimodal.named_parameters()}
        head_params = {n: replicated_param(p, batch.world) for n, p in model.matching_head.named_parameters()}
        seq_mask = None if batch.seq_mask is None else batch.seq_mask[speech_index]
        fused = functional_call(model.multimodal, mm_params, (batch.seq[speech_index], seq_mask, tokens[image_index]))[
            :, 0
        ]
        logits = functional_call(model.matching_head, head_params, (fused,))
        trained = torch.ones_like(labels, dtype=torch.bool) if batch.training else (labels == 1) | hard
        loss, correct = sim_loss(logits[trained], labels[trained], batch.size)
        logs = {
            "sim_loss": loss.item(),
            "sim_correct": correct,
            "sim_pairs": int(trained.sum()),
            "sim_prior": binary_entropy(batch.size / max(1, int(trained.sum()))) * batch.size,
        }
        with torch.no_grad():
            odds = (logits[:, 1] - logits[:, 0]).float()
            positive = labels == 1
            for kind, negatives in (("hard", ~positive & hard), ("random", ~positive & ~hard)):
                above, compared = ranking_pairs(odds[positive], odds[negatives])
                if compared:
                    logs[f"sim_auc_{kind}_above"], logs[f"sim_auc_{kind}_pairs"] = above, compared
        return loss, logs

    @staticmethod
    def reduce_metrics(logs, total, log_scalar) -> None:
        if not present(logs, "sim_loss"):
            return
        log_scalar("sim_loss", summed(logs, "sim_loss") / total, total, 4)
        log_scalar("sim_prior", summed(logs, "sim_prior") / total, total, 4)
        pairs = summed(logs, "sim_pairs")
        if pairs > 0:  # share of the SIM pairs (positives and negatives) classified right
            log_scalar("sim_acc", 100.0 * summed(logs, "sim_correct") / pairs, pairs, 2)
        for kind in ("hard", "random"):
            compared = summed(logs, f"sim_auc_{kind}_pairs")
            if compared > 0:
                log_scalar(f"sim_auc_{kind}", summed(logs, f"sim_auc_{kind}_above") / compared, compared, 4)
