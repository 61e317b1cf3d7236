"""Tiny randomly initialised upstream encoders in the released file formats (tests, CPU demo).

Built with fairseq's and open_clip's own classes, so that tests and a CPU demo exercise exactly
the loading code used for hubert_large_ll60k.pt and open_clip ViT-L/14 weights. Used by the
tests' ``tiny_encoders`` fixture, ``examples/make_tiny_encoders.py`` (its CLI) and the benchmarks
(:func:`make_hubert_checkpoint`: random weights in the released HuBERT architectures).
"""

import os
import tempfile
from typing import Tuple

import torch

from cmd_plugin.files import atomic_write, atomic_write_json
from cmd_plugin.quiet import building_hubert, building_open_clip

TINY_HUBERT_LAYERS = 3
TINY_HUBERT_DIM = 64
TINY_CLIP_MODEL_NAME = "cmd-tiny-ViT-8"

# Same 320x downsampling as HuBERT (16 kHz -> 50 Hz frames), in two layers: 25 ms windows with a
# 10 ms hop, then pairs of windows. The first layer starts as a filterbank (see
# _filterbank_init), so that a tiny random model still hears what was said.
_TINY_CONV_LAYERS = "[(64, 400, 160)] + [(64, 2, 2)]"
_TINY_FILTERS = 32  # cosine + sine filter per band: 64 channels


def _atomic_torch_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# Released HuBERT model configs (fairseq examples/hubert/config/pretrain/*.yaml); the
# fields not named keep HubertConfig's defaults, which those configs also keep.
_HUBERT_RELEASE_CONFIGS = {
    "large": dict(
        model=dict(
            extractor_mode="layer_norm",
            encoder_layers=24,
            encoder_embed_dim=1024,
            encoder_ffn_embed_dim=4096,
            encoder_attention_heads=16,
            final_dim=768,
            layer_norm_first=True,
            conv_feature_layers="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
            conv_bias=False,
            encoder_layerdrop=0.0,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            feature_grad_mult=1.0,
            untie_final_proj=True,
        ),
        normalize=True,
        num_units=500,
    ),
    "base": dict(
        model=dict(
            extractor_mode="default",
            encoder_layers=12,
            encoder_embed_dim=768,
            encoder_ffn_embed_dim=3072,
            encoder_attention_heads=12,
            final_dim=256,
            layer_norm_first=False,
            conv_feature_layers="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
            conv_bias=False,
            encoder_layerdrop=0.05,
            dropout=0.1,
            attention_dropout=0.1,
            activation_dropout=0.0,
            dropout_input=0.1,
            dropout_features=0.1,
            feature_grad_mult=0.1,
            untie_final_proj=False,
        ),
        normalize=False,
        num_units=500,
    ),
}


@building_hubert()  # builds fairseq's HuBERT: without its configuration dump and weight_norm deprecation
def _write_hubert_checkpoint(
    path: str,
    model_kwargs: dict,
    seed: int,
    normalize: bool,
    num_units: int,
    label_dir_prefix: str = "hubert_labels_",
    init_model=None,
) -> str:
    """Build a randomly initialised HubertModel with fairseq's own task and model classes from
    ``model_kwargs`` (HubertConfig fields) and save it in the layout of the released checkpoints:

    {"args": None, "cfg": plain dict of the full fairseq config, "model": state dict,
     "task_state": {"dictionaries": [Dictionary]}, "optimizer_history": [...], "extra_state": {...}}
    The task's data/label_dir point at a temporary directory that is deleted afterwards, as the
    released checkpoints point at the authors' cluster paths. ``init_model(model)``, if given,
    may set weights before saving.
    """
    from fairseq import tasks
    from fairseq.criterions.hubert_criterion import HubertCriterionConfig
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.models.hubert.hubert import HubertConfig
    from fairseq.optim.adam import FairseqAdamConfig
    from fairseq.optim.lr_scheduler.polynomial_decay_schedule import (
        PolynomialDecayLRScheduleConfig,
    )
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix=label_dir_prefix) as label_dir:
        with open(os.path.join(label_dir, "dict.km.txt"), "w") as f:
            for unit in range(num_units):
                f.write(f"{unit} 1\n")

        task_cfg = HubertPretrainingConfig(
            data=label_dir,
            labels=["km"],
            label_dir=label_dir,
            label_rate=50.0,
            sample_rate=16000,
            normalize=normalize,
            max_sample_size=250000,
            min_sample_size=32000,
            pad_audio=False,
            random_crop=True,
        )
        task_cfg._name = "hubert_pretraining"
        model_cfg = HubertConfig(**model_kwargs)
        model_cfg._name = "hubert"
        criterion_cfg = HubertCriterionConfig(pred_masked_weight=1.0, pred_nomask_weight=0.0)
        criterion_cfg._name = "hubert"
        optimizer_cfg = FairseqAdamConfig(adam_betas="(0.9,0.98)", adam_eps=1e-6, weight_decay=0.01)
        optimizer_cfg._name = "adam"
        lr_cfg = PolynomialDecayLRScheduleConfig(warmup_updates=32000)
        lr_cfg._name = "polynomial_decay"

        cfg = OmegaConf.structured(
            FairseqConfig(
                model=model_cfg,
                task=task_cfg,
                criterion=criterion_cfg,
                optimizer=optimizer_cfg,
                lr_scheduler=lr_cfg,
            )
        )
        task = tasks.setup_task(cfg.task)
        task.dictionaries  # the state factory reads dict.km.txt here
        model = task.build_model(cfg.model)
        if init_model is not None:
            init_model(model)

        state = {
            "args": None,
            "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            "model": model.state_dict(),
            "task_state": task.state_dict(),
            "optimizer_history": [
                {
                    "criterion_name": "HubertCriterion",
                    "optimizer_name": "FairseqAdam",
                    "lr_scheduler_state": {"best": None},
                    "num_updates": 0,
                }
            ],
            "extra_state": {"metrics": {}, "previous_training_time": 0.0},
        }
        del model
        _atomic_torch_save(state, path)
    return path


def _filterbank_init(model) -> None:
    """Start the tiny feature extractor as a spectral front-end instead of random filters.

    Layer 1 (kernel 400 = 25 ms, hop 10 ms): Hann-windowed cosine and sine filters at 32
    mel-spaced frequencies (80 Hz - 7.6 kHz); after its LayerNorm and GELU (a rectifier), layer 2
    adds the cosine and sine responses of each band over two hops, which approximates the band's
    magnitude; its other 32 channels stay random. A random raw-waveform CNN of this size carries
    almost no information about the words (a linear probe on its pooled output was at chance),
    and cannot learn it within a CPU demo's few hundred updates.
    """
    import math

    conv1 = model.feature_extractor.conv_layers[0][0]
    conv2 = model.feature_extractor.conv_layers[1][0]
    kernel = conv1.kernel_size[0]
    t = torch.arange(kernel, dtype=torch.float64) / 16000.0
    window = torch.hann_window(kernel, periodic=False, dtype=torch.float64)

    def mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mels = torch.linspace(mel(80.0), mel(7600.0), _TINY_FILTERS, dtype=torch.float64)
    freqs = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    with torch.no_grad():
        filters = []
        for f in freqs:
            for wave in (torch.cos(2 * math.pi * f * t), torch.sin(2 * math.pi * f * t)):
                w = window * wave
                filters.append(w / w.norm())
        conv1.weight.copy_(torch.stack(filters)[:, None, :].float())
        if conv1.bias is not None:
            conv1.bias.zero_()
        for band in range(_TINY_FILTERS):
            conv2.weight[band].zero_()
            conv2.weight[band, 2 * band : 2 * band + 2, :] = 1.0
        if conv2.bias is not None:
            conv2.bias[:_TINY_FILTERS].zero_()


def make_tiny_hubert(path: str, seed: int = 0, normalize: bool = True) -> str:
    """Write a tiny HuBERT checkpoint in the layout of hubert_large_ll60k.pt; returns path.

    Large's layout (layer_norm extractor, layer_norm_first) with 3 layers of width 64, 2 heads and
    no dropout or layer-drop (their random masks cost more than the tiny matmuls on a CPU), and a
    two-layer feature extractor that starts as a filterbank (``_filterbank_init``).
    """
    model_kwargs = dict(
        extractor_mode="layer_norm",
        encoder_layers=TINY_HUBERT_LAYERS,
        encoder_embed_dim=TINY_HUBERT_DIM,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=2,
        final_dim=32,
        layer_norm_first=True,
        conv_feature_layers=_TINY_CONV_LAYERS,
        conv_bias=True,
        conv_pos=16,
        conv_pos_groups=4,
        encoder_layerdrop=0.0,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feature_grad_mult=1.0,
        untie_final_proj=True,
    )
    return _write_hubert_checkpoint(
        path,
        model_kwargs,
        seed=seed,
        normalize=normalize,
        num_units=20,
        label_dir_prefix="tiny_hubert_labels_",
        init_model=_filterbank_init,
    )


def make_hubert_checkpoint(path: str, size: str = "large", seed: int = 0) -> str:
    """Write a RANDOM-weight HuBERT checkpoint with the released architecture; returns path.

    size="large": hubert_large_ll60k.pt's config (24 layers, 1024 wide, FFN 4096, 16 heads,
    final_dim 768, layer_norm extractor, layer_norm_first, task normalize=True), ~317M weights,
    a ~1.3 GB file. size="base": hubert_base_ls960.pt's (12 layers, 768, default extractor,
    normalize=False). For memory and speed measurements of the real architecture; never for
    anything that needs trained weights.
    """
    if size not in _HUBERT_RELEASE_CONFIGS:
        raise ValueError(f"size must be one of {sorted(_HUBERT_RELEASE_CONFIGS)}, got {size!r}")
    spec = _HUBERT_RELEASE_CONFIGS[size]
    return _write_hubert_checkpoint(
        path, dict(spec["model"]), seed=seed, normalize=spec["normalize"], num_units=spec["num_units"]
    )


def tiny_clip_config() -> dict:
    """open_clip model config of a tiny CLIP: 64 px images, 8 px patches -> 64 patch tokens, a
    32-dim joint space, and a one-layer text tower on open_clip's default tokenizer. (With 16 px
    patches, 16 tokens, the pre-trained tiny CLIP's own written-caption -> image mean R@1 on the demo's
    test split was 48.0; with 8 px patches 55.4, after the same 500 steps.)"""
    return {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": 64,
            "patch_size": 8,
            "width": 64,
            "layers": 2,
            "head_width": 32,
            "mlp_ratio": 2.0,
        },
        # open_clip's own BPE tokenizer (49,408 tokens), so that the tiny CLIP can be pre-trained on
        # written captions (examples/pretrain_tiny_clip.py) the way the real one was.
        "text_cfg": {
            "context_length": 48,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 1,
        },
    }


def make_tiny_clip(out_dir: str, seed: int = 0) -> Tuple[str, str, str]:
    """Write a tiny open_clip model config JSON and its weights (torch.save of the state dict).

    Returns (model_name, model_config_path, weights_path) such that
    ClipImageUpstream(model_name, pretrained=weights_path, model_config=model_config_path) loads it.
    """
    import open_clip

    from cmd_plugin.models.clip_upstream import register_model_config

    os.makedirs(out_dir, exist_ok=True)
    config_path = os.path.join(os.path.abspath(out_dir), f"{TINY_CLIP_MODEL_NAME}.json")
    atomic_write_json(config_path, tiny_clip_config(), indent=2)
    register_model_config(config_path)

    torch.manual_seed(seed)
    with building_open_clip(random_weights_wanted=True):  # random weights are what this writes
        model = open_clip.create_model(TINY_CLIP_MODEL_NAME, pretrained=None)
    weights_path = os.path.join(os.path.abspath(out_dir), "open_clip_pytorch_model.bin")
    _atomic_torch_save(model.state_dict(), weights_path)
    return TINY_CLIP_MODEL_NAME, config_path, weights_path
