"""L_cmd, the Cross-Modal Denoising objective (the CMD paper's Eq. 6), on the (global) batch.

A share of every image's patches is replaced by other images' patches (:mod:`.noise`); the
fusion encoder Ω (:mod:`.fusion`, owned by the model as ``model.fusion``) reconstructs each image
feature F' with the speech S_cls as its query; F' is contrasted with the speech by the
multi-positive InfoNCE of :mod:`cmd_plugin.objectives.sic`. The noise of update u is drawn from
the seed (noise_seed, u), equal on every worker.

``pairs="all"`` scores speech i against image j reconstructed with query i (B x B fusions);
``"paired"`` reconstructs image j with its own caption only (B fusions).
Logs ``cmd_loss``, ``cmd_acc`` and the attention statistics of each caption's own image.
"""

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ...distributed import replicated_param
from ...modules.fusion import attention_statistics, diagonal_pairs
from ..batch import GlobalBatch, Objective, present, summed
from ..sic import in_batch_accuracy, symmetric_infonce
from .noise import apply_patch_noise, draw_patch_noise

__all__ = ["CmdObjective", "ATTENTION_STATS"]

ATTENTION_STATS = ("attn_entropy", "attn_max", "attn_cos_mean_pool")
PAIRS_CHOICES = ("all", "paired")


class CmdObjective(Objective):
    def __init__(self, noise_ratio: float, pairs: str = "all", noise_seed: int = 1):
        if not 0.0 <= noise_ratio <= 1.0:
            raise ValueError(f"criterion.patch_noise_ratio must be in [0, 1], got {noise_ratio}")
        if pairs not in PAIRS_CHOICES:
            raise ValueError(f"criterion.cmd_pairs must be one of {PAIRS_CHOICES}, got {pairs!r}")
        self.noise_ratio, self.all_pairs, self.noise_seed = noise_ratio, pairs == "all", noise_seed

    def check_model(self, model) -> None:
        if getattr(model, "fusion", None) is None:
            raise ValueError(
                "criterion.cmd_weight > 0 needs the fusion encoder: set model.cmd_fusion=true "
                "(method=cmd or method=c2f_cmd)"
            )

    def __call__(self, model, batch: GlobalBatch) -> Tuple[torch.Tensor, Dict[str, float]]:
        speech, patches, keys = batch.speech, batch.patches, batch.keys
        generator = torch.Generator().manual_seed(self.noise_seed * 1_000_003 + batch.update_num)
        identities = torch.unique(keys, dim=0, return_inverse=True)[1]
        positions, sources = draw_patch_noise(identities, patches.size(1), self.noise_ratio, generator)
        noisy = apply_patch_noise(patches, positions, sources)
        params = {name: replicated_param(p, batch.world) for name, p in model.fusion.named_parameters()}
        recon, attn = functional_call(
            model.fusion, params, (speech, noisy), {"all_pairs": self.all_pairs, "return_attention": True}
        )
        if self.all_pairs:  # (B, B, E): recon[i, j] = image j reconstructed with speech i as the query
            own_attn, own_recon = diagonal_pairs(attn, recon)
            recon = F.normalize(recon.float(), dim=-1)
            scores = torch.einsum("ie,ije->ij", speech.float(), recon)
        else:  # (B, E): image j reconstructed with its own caption
            own_attn, own_recon = attn, recon
            recon = F.normalize(recon.float(), dim=-1)
            scores = speech.float() @ recon.t()
        loss, _, _ = symmetric_infonce(scores, keys, keys, batch.logit_scale)
        with torch.no_grad():
            stats = attention_statistics(own_attn, own_recon, model.fusion.mean_pooled(noisy))
        logs = {"cmd_loss": loss.item(), "cmd_correct": in_batch_accuracy(scores, keys, keys)}
        logs.update({key: value.item() for key, value in stats.items()})
        return loss, logs

    @staticmethod
    def reduce_metrics(logs, total, log_scalar) -> None:
        for key in ("cmd_loss",) + ATTENTION_STATS:
            if present(logs, key):
                log_scalar(key, summed(logs, key) / total, total, 4)
        if present(logs, "cmd_correct"):
            log_scalar("cmd_acc", 100.0 * summed(logs, "cmd_correct") / total, total, 2)
