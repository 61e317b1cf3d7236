"""L_sim, C2F's speech-image matching: the matching head classifies the batch's pairs and one hard
negative per speech and per image, mined from the SIC similarities (:func:`.losses.sim_pairs`).

The multimodal encoder and matching head (:mod:`.multimodal`) are the model's ``multimodal`` and
``matching_head``. Negatives are drawn on the global batch from a generator seeded by
(noise_seed, update), the same on every worker. Logs ``sim_loss`` and ``sim_acc`` (share of
pairs classified right).
"""

from typing import Dict, Tuple

import torch
from torch.func import functional_call

from ...distributed import replicated_param
from ..batch import GlobalBatch, Objective, present, summed
from .losses import sim_loss, sim_pairs
from .multimodal import image_tokens

__all__ = ["SimObjective"]


class SimObjective(Objective):
    def __init__(self, noise_seed: int = 1):
        self.noise_seed = noise_seed

    def check_model(self, model) -> None:
        if getattr(model, "multimodal", None) is None:
            raise ValueError("criterion.sim_weight > 0 needs the matching head: set model.multimodal_layers > 0")

    def __call__(self, model, batch: GlobalBatch) -> Tuple[torch.Tensor, Dict[str, float]]:
        generator = torch.Generator().manual_seed((self.noise_seed * 1_000_003 + batch.update_num) * 2 + 1)
        speech_index, image_index, labels = sim_pairs((batch.scores * batch.logit_scale).detach(), batch.keys,
                                                      generator)
        dev = batch.seq.device
        speech_index, image_index, labels = speech_index.to(dev), image_index.to(dev), labels.to(dev)
        tokens = image_tokens(batch.image, batch.patches)
        mm_params = {n: replicated_param(p, batch.world) for n, p in model.multimodal.named_parameters()}
        head_params = {n: replicated_param(p, batch.world) for n, p in model.matching_head.named_parameters()}
        seq_mask = None if batch.seq_mask is None else batch.seq_mask[speech_index]
        fused = functional_call(model.multimodal, mm_params,
                                (batch.seq[speech_index], seq_mask, tokens[image_index]))[:, 0]
        logits = functional_call(model.matching_head, head_params, (fused,))
        loss, correct = sim_loss(logits, labels, batch.size)
        return loss, {"sim_loss": loss.item(), "sim_correct": correct, "sim_pairs": int(labels.numel())}

    @staticmethod
    def reduce_metrics(logs, total, log_scalar) -> None:
        if not present(logs, "sim_loss"):
            return
        log_scalar("sim_loss", summed(logs, "sim_loss") / total, total, 4)
        pairs = summed(logs, "sim_pairs")
        if pairs > 0:  # share of the SIM pairs (positives and hard negatives) classified right
            log_scalar("sim_acc", 100.0 * summed(logs, "sim_correct") / pairs, pairs, 2)
