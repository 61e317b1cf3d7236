"""Tiny speech checkpoints in the layouts users download, built with fairseq's own classes.

* :func:`make_tiny_hubert_ctc` -- a HuBERT fine-tuned with CTC (fairseq ``hubert_ctc``, the
  layout of hubert_large_ll60k_finetune_ls960.pt): the model is built by fairseq's
  ``HubertCtc`` from a pre-trained tiny HuBERT (``w2v_path``), so ``cfg.model.w2v_args`` holds the
  pre-training config exactly as fairseq stores it; ``keep_w2v_args=False`` writes the variant
  that only names ``w2v_path``.
* :func:`make_tiny_wav2vec2` / :func:`make_tiny_data2vec_audio` -- pre-trained wav2vec 2.0 and
  data2vec (audio) models on fairseq's ``audio_pretraining`` task.

All are saved like fairseq's trainer saves (``args``, plain-dict ``cfg``, ``model``,
``task_state``, ``optimizer_history``, ``extra_state``).
"""

import contextlib
import os
import tempfile

import torch
from omegaconf import OmegaConf

from cmd_demo.tiny_encoders import _TINY_CONV_LAYERS, _atomic_torch_save

_TINY_TRANSFORMER = dict(
    encoder_layers=2,
    encoder_embed_dim=64,
    encoder_ffn_embed_dim=128,
    encoder_attention_heads=2,
    conv_feature_layers=_TINY_CONV_LAYERS,
    conv_pos=16,
    conv_pos_groups=4,
    final_dim=32,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    encoder_layerdrop=0.0,
)


def _trainer_state(cfg, model, task, criterion_name: str) -> dict:
    return {
        "args": None,
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "task_state": task.state_dict(),
        "optimizer_history": [
            {
                "criterion_name": criterion_name,
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": None},
                "num_updates": 10,
            }
        ],
        "extra_state": {"metrics": {}, "previous_training_time": 1.0},
    }


def make_tiny_hubert_ctc(
    path: str, pretrained_path: str, normalize: bool = True, keep_w2v_args: bool = True, seed: int = 0
) -> str:
    from fairseq import tasks
    from fairseq.data.dictionary import Dictionary
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.models.hubert.hubert_asr import HubertCtc, HubertCtcConfig
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
    from omegaconf import open_dict

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="tiny_ctc_labels_") as label_dir:
        with open(os.path.join(label_dir, "dict.ltr.txt"), "w") as f:
            f.writelines(f"{c} 1\n" for c in "|ETAONISRHDLUMCWFGYPBVKXJQZ'")
        task_cfg = HubertPretrainingConfig(
            data=label_dir,
            label_dir=label_dir,
            labels=["ltr"],
            fine_tuning=True,
            normalize=normalize,
            sample_rate=16000,
            single_target=True,
        )
        task_cfg._name = "hubert_pretraining"
        model_cfg = HubertCtcConfig(
            w2v_path=pretrained_path,
            apply_mask=True,
            mask_prob=0.5,
            layerdrop=0.0,
            feature_grad_mult=0.0,
            final_dropout=0.0,
        )
        model_cfg._name = "hubert_ctc"
        cfg = OmegaConf.structured(FairseqConfig(model=model_cfg, task=task_cfg))
        task = tasks.setup_task(cfg.task)
        task.target_dictionary  # reads dict.ltr.txt while it exists
        # HubertEncoder reads cfg.autoregressive, which HubertCtcConfig lacks (fairseq issue
        # #4916): build through HubertCtc.build_model with the key added, and leave it out of
        # the file as released files do. fairseq reads the pre-trained file (w2v_path) here.
        with open_dict(cfg.model):
            cfg.model.autoregressive = False
        allow = getattr(torch.serialization, "safe_globals", None)  # torch 2.4: fairseq loads unrestricted
        with allow([Dictionary]) if allow else contextlib.nullcontext():
            model = HubertCtc.build_model(cfg.model, task)
        with torch.no_grad():  # "fine-tuned": the encoder differs from the pre-trained one
            for p in model.w2v_encoder.w2v_model.encoder.layers[-1].parameters():
                p.add_(0.05 * torch.randn_like(p))
        state = _trainer_state(cfg, model, task, "CtcCriterion")
    del state["cfg"]["model"]["autoregressive"]
    if not keep_w2v_args:
        state["cfg"]["model"]["w2v_args"] = None
    _atomic_torch_save(state, path)
    return path


def _audio_pretraining(model_cfg, model_name: str, seed: int):
    from fairseq import tasks
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.tasks.audio_pretraining import AudioPretrainingConfig

    torch.manual_seed(seed)
    task_cfg = AudioPretrainingConfig(data="/checkpoint/authors/librispeech", normalize=True, sample_rate=16000)
    task_cfg._name = "audio_pretraining"
    model_cfg._name = model_name
    cfg = OmegaConf.structured(FairseqConfig(model=model_cfg, task=task_cfg))
    task = tasks.setup_task(cfg.task)
    return cfg, task, task.build_model(cfg.model)


def make_tiny_wav2vec2(path: str, seed: int = 0) -> str:
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config

    cfg, task, model = _audio_pretraining(
        Wav2Vec2Config(
            extractor_mode="layer_norm",
            layer_norm_first=True,
            latent_vars=16,
            latent_groups=2,
            latent_dim=16,
            **_TINY_TRANSFORMER,
        ),
        "wav2vec2",
        seed,
    )
    _atomic_torch_save(_trainer_state(cfg, model, task, "Wav2vecCriterion"), path)
    return path


def make_tiny_data2vec_audio(path: str, seed: int = 0) -> str:
    from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioConfig

    cfg, task, model = _audio_pretraining(
        Data2VecAudioConfig(
            extractor_mode="layer_norm",
            layer_norm_first=True,
            average_top_k_layers=2,
            max_update=100,
            ema_anneal_end_step=100,
            **_TINY_TRANSFORMER,
        ),
        "data2vec_audio",
        seed,
    )
    _atomic_torch_save(_trainer_state(cfg, model, task, "ModelCriterion"), path)
    return path
