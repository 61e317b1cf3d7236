"""Task ``speech_image``: spoken captions paired with images, scored by retrieval.

Reads splits written in the format of ``manifests/README.md``. Validation collects the
embeddings of the WHOLE split (the criterion gathers them from every worker) and logs
recall: ``s2i_r{1,5,10}``, ``i2s_r{1,5,10}`` and ``mean_r{1,5,10}`` (x100), so that
``checkpoint.best_checkpoint_metric=mean_r1`` can select checkpoints.

With ``valid_rerank_k`` > 0 (a coarse-to-fine model with a matching head), validation also logs the
whole split's recall after re-ranking each query's SIC top-K by the matching head:
``rerank_{s2i,i2s,mean}_r{1,5,10}``.

With ``image_feature_cache`` set (``examples/cache_image_features.py``), batches carry the frozen
image encoder's cached outputs (``image_cls``, ``image_patches``) instead of pixels.

Reliability: loading a split checks that every listed file exists (``check_files``); a training
batch with a non-finite loss is reported with its files and contributes no gradient, and
``nonfinite_patience`` such batches in a row stop the run (``cmd_plugin/nonfinite.py``);
fairseq's copies of checkpoints (``checkpoint_last.pt`` ...) are made atomic
(``cmd_plugin/checkpoints.py``), so a job killed while saving resumes from the previous one.
"""

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from ..quiet import import_fairseq

import_fairseq()  # before fairseq's modules: without its known-harmless import-time notes

from fairseq import metrics
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING
from open_clip.transform import PreprocessCfg, image_transform_v2

from ..checkpoints import make_checkpoint_copies_atomic
from ..criterions.cmd_contrastive import CmdContrastiveCriterion
from ..data.image_cache import CachedImages, ImageCacheError, ImageFeatureCache, encoder_identity
from ..data.manifest import ManifestError, check_files_exist, read_manifest
from ..data.speech_cache import SpeechCacheError, SpeechStateCache, upstream_identity
from ..data.speech_image_dataset import PixelImages, SpeechImageDataset
from ..encoder_identity import open_clip_preprocess
from ..modules.queue import check_queue_size
from ..nonfinite import NonFiniteGuard, zero_loss
from ..objectives.targets import split_code
from ..retrieval.recall import retrieval_recall
from ..retrieval.rerank import (
    DEFAULT_RERANK_SCORE,
    RERANK_SCORES,
    SequencePairScorer,
    rerank,
    reranked_recall,
    sic_weight,
)

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
RECALL_KEYS = [f"{d}_r{k}" for d in ("s2i", "i2s", "mean") for k in RECALL_KS]
RERANK_KEYS = ["rerank_" + key for key in RECALL_KEYS]
RERANK_SCORE_CHOICES = RERANK_SCORES


@dataclass
class SpeechImageConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "manifest directory ({split}.tsv, {split}.img, ...)"})
    image_model: str = field(
        default=II("model.image_model"), metadata={"help": "open_clip model whose eval transform preprocesses images"}
    )
    image_model_config: str = field(
        default=II("model.image_model_config"), metadata={"help": "open_clip model JSON for a custom image_model"}
    )
    image_pretrained: str = field(
        default=II("model.image_pretrained"),
        metadata={"help": "weights file of image_model; checked against image_feature_cache's checksum"},
    )
    image_feature_cache: str = field(
        default="",
        metadata={
            "help": "directory from examples/cache_image_features.py: batches carry its cached image features "
            "('' = encode pixels)"
        },
    )
    speech_feature_cache: str = field(
        default="",
        metadata={
            "help": "directory from examples/cache_speech_features.py: training and validation read each "
            "utterance's frozen HuBERT states from it instead of running the upstream ('' = encode waveforms; "
            "needs model.freeze_hubert=true; scoring always encodes waveforms)"
        },
    )
    sample_rate: int = field(default=16000, metadata={"help": "audio sample rate; files must match it"})
    min_sample_size: int = field(default=1600, metadata={"help": "drop utterances shorter than this (samples)"})
    max_sample_size: int = field(
        default=480000, metadata={"help": "drop utterances longer than this (samples); captions are never cropped"}
    )
    num_length_buckets: int = field(
        default=0,
        metadata={"help": "0: batch by exact length order; N>0: shuffle within N length quantiles each epoch"},
    )
    valid_rerank_k: int = field(
        default=0,
        metadata={
            "help": "C2F: also log valid recall after re-ranking each query's SIC top-K with the matching head "
            "(0 = off; >= 10)"
        },
    )
    valid_rerank_score: ChoiceEnum(RERANK_SCORE_CHOICES) = field(
        default=DEFAULT_RERANK_SCORE,
        metadata={
            "help": "re-ranking score: sim+sic_logit = match logit + SIC logit, cosine / temperature (chosen "
            "on the demo's valid split), sim+sic = match logit + SIC cosine (BLIP), sim = the match logit "
            "alone (ALBEF)"
        },
    )
    check_files: bool = field(
        default=True,
        metadata={
            "help": "when a split is loaded, check that every listed wav (and image, unless cached) exists "
            "and stop with the missing ones named, before any training or scoring"
        },
    )
    nonfinite_patience: int = field(
        default=5,
        metadata={
            "help": "training batches with a non-finite loss tolerated in a row (each is reported with its "
            "files and contributes no gradient); one more stops the run"
        },
    )


def image_transform(model_name: str, model_config: str = ""):
    """open_clip's eval transform for ``model_name``, as ``create_model_and_transforms`` builds it
    for a local weights file, without building the model (:func:`open_clip_preprocess`)."""
    if model_config.startswith("${"):  # the dataclass's interpolation, built without hydra: not set
        model_config = ""
    preprocess = open_clip_preprocess(model_name, model_config)  # names model.image_model_config when unknown
    return image_transform_v2(PreprocessCfg(**preprocess), is_train=False)


@register_task("speech_image", dataclass=SpeechImageConfig)
class SpeechImageTask(FairseqTask):
    cfg: SpeechImageConfig

    def __init__(self, cfg: SpeechImageConfig):
        super().__init__(cfg)
        self._transform = None
        self._image_cache: Optional[ImageFeatureCache] = None
        self._speech_identity: Optional[dict] = None  # the model's upstream, once built (speech_feature_cache)
        self._valid_embeddings: Dict[str, Dict[int, tuple]] = {}
        self._valid_recall: Dict[str, Dict[str, float]] = {}
        self._valid_model = None
        self._queue_size = 0
        self._train_batches = None
        self.nonfinite = NonFiniteGuard(cfg.nonfinite_patience, self._describe_items)
        self._update_had_nonfinite = False
        # a job killed while fairseq copies checkpoint_last.pt must find the previous one whole
        make_checkpoint_copies_atomic()

    @classmethod
    def setup_task(cls, cfg: SpeechImageConfig, **kwargs):
        if not os.path.isdir(cfg.data):
            raise ManifestError(f"task.data={cfg.data}: not a directory of manifests")
        return cls(cfg)

    @property
    def transform(self):
        if self._transform is None:
            self._transform = image_transform(self.cfg.image_model, self.cfg.image_model_config)
        return self._transform

    @property
    def image_cache(self) -> ImageFeatureCache:
        """The cache of task.image_feature_cache, opened once and checked against the image encoder."""
        if self._image_cache is None:
            cache = ImageFeatureCache(self.cfg.image_feature_cache)
            cache.check_identity(
                encoder_identity(self.cfg.image_model, self.cfg.image_pretrained, self.cfg.image_model_config)
            )
            logger.info(f"image features from cache {cache.cache_dir} ({len(cache)} images)")
            self._image_cache = cache
        return self._image_cache

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, size_limits: bool = True, **kwargs):
        """size_limits=False keeps every utterance (scoring: a benchmark row is never computed on a
        filtered test split); True drops those outside [min_sample_size, max_sample_size]."""
        manifest = read_manifest(self.cfg.data, split)
        if self.cfg.check_files:
            # images read from a cache need not be on disk
            check_files_exist(manifest, images=not self.cfg.image_feature_cache)
        if self.cfg.image_feature_cache:
            images = CachedImages(manifest, self.image_cache)
        else:
            images = PixelImages(manifest, self.transform)
        speech_states = None
        if self.cfg.speech_feature_cache:
            speech_states = SpeechStateCache(self.cfg.speech_feature_cache, split)
            if self._speech_identity is not None:  # a split loaded after the model (fairseq's training split)
                speech_states.check_identity(self._speech_identity)
            logger.info(f"{split}: frozen upstream states from cache {speech_states.cache_dir}")
        self.datasets[split] = SpeechImageDataset(
            manifest,
            split,
            images=images,
            speech_states=speech_states,
            sample_rate=self.cfg.sample_rate,
            min_sample_size=self.cfg.min_sample_size if size_limits else 0,
            max_sample_size=self.cfg.max_sample_size if size_limits else None,
            shuffle=split.startswith("train"),
            num_length_buckets=self.cfg.num_length_buckets,
        )
        if self.datasets[split].shuffle and self._queue_size:
            check_queue_size(self._queue_size, len(self.datasets[split]), split)
        logger.info(f"{split}: {len(self.datasets[split])} utterances, {len(manifest.unique_images)} images")

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        # a queue larger than the training split is refused (here or when the split is loaded)
        self._queue_size = int(getattr(model.cfg, "queue_size", 0) or 0)
        for name, ds in self.datasets.items():
            if isinstance(ds, SpeechImageDataset) and ds.shuffle and self._queue_size:
                check_queue_size(self._queue_size, len(ds), name)
        if 0 < self.cfg.valid_rerank_k < max(RECALL_KS):
            raise ValueError(
                f"task.valid_rerank_k={self.cfg.valid_rerank_k}: re-ranked R@{max(RECALL_KS)} needs "
                f"K >= {max(RECALL_KS)}"
            )
        if self.cfg.valid_rerank_k > 0 and getattr(model, "multimodal", None) is None:
            raise ValueError(
                f"task.valid_rerank_k={self.cfg.valid_rerank_k} needs a model with a matching head "
                "(model.multimodal_layers > 0)"
            )
        if self.cfg.speech_feature_cache:
            # cached states are the outputs of the upstream as it was: fine-tuning it would silently diverge
            if not getattr(model.cfg, "freeze_hubert", True):
                raise SpeechCacheError(
                    f"task.speech_feature_cache={self.cfg.speech_feature_cache} needs a frozen upstream: set "
                    "model.freeze_hubert=true, or task.speech_feature_cache='' to encode waveforms"
                )
            identity = upstream_identity(model.hubert)
            for name, ds in self.datasets.items():
                if isinstance(ds, SpeechImageDataset) and ds.speech_states is not None:
                    ds.speech_states.check_identity(identity)
            self._speech_identity = identity
        if self.cfg.image_feature_cache:
            # cached features are the outputs of the encoder as it was: training it would
            # silently diverge from them
            if not getattr(model.cfg, "freeze_image_encoder", True):
                raise ImageCacheError(
                    f"task.image_feature_cache={self.cfg.image_feature_cache} needs a frozen image encoder: "
                    "set model.freeze_image_encoder=true, or task.image_feature_cache='' to encode pixels"
                )
            self.image_cache.check_identity(
                encoder_identity(model.cfg.image_model, model.cfg.image_pretrained, model.cfg.image_model_config)
            )
        return model

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg, from_checkpoint)
        if not isinstance(criterion, CmdContrastiveCriterion):
            raise ValueError(
                f"task speech_image trains with criterion cmd_contrastive, got {type(criterion).__name__}: "
                "set criterion._name=cmd_contrastive"
            )
        return criterion

    def max_positions(self):
        return None

    def get_batch_iterator(self, dataset, *args, **kwargs):
        # fairseq's batch_by_size drops a final remainder smaller than
        # required_batch_size_multiple; recall must see every utterance of a scored split
        if isinstance(dataset, SpeechImageDataset) and not dataset.shuffle:
            kwargs["required_batch_size_multiple"] = 1
        itr = super().get_batch_iterator(dataset, *args, **kwargs)
        if isinstance(dataset, SpeechImageDataset) and dataset.shuffle:
            self._train_batches = len(itr)  # this worker's batches per epoch (distillation ramp)
        return itr

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """FairseqTask.train_step, with non-finite batches reported and kept out of the gradients."""
        criterion.set_update_num(update_num)
        if self._train_batches:
            criterion.set_epoch_batches(self._train_batches)
        criterion.set_dummy_batch(ignore_grad)  # fairseq's dummy batch: a repeated batch, no gradient
        model.train()
        model.set_num_updates(update_num)
        amp = isinstance(optimizer, AMPOptimizer)
        with torch.autograd.profiler.record_function("forward"), self.nonfinite.watch(model):
            with torch.autocast(device_type="cuda") if amp else contextlib.nullcontext():
                loss, sample_size, logging_output = criterion(model, sample)
        if ignore_grad:  # fairseq's dummy batch: no gradient (a zero graph: loss * 0 is NaN for a NaN loss)
            backward_loss = zero_loss(model)
            self._update_had_nonfinite = True
        elif self.nonfinite.check(loss, sample, update_num):
            backward_loss = loss
        else:
            # every worker still runs backward (DDP); this batch counts for nothing
            backward_loss = zero_loss(model)
            sample_size = 0
            logging_output = {"ntokens": 0, "nsentences": 0, "sample_size": 0, "nonfinite_batches": 1}
            self._update_had_nonfinite = True
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(backward_loss)
        return loss, sample_size, logging_output

    def optimizer_step(self, optimizer, model, update_num):
        # all gradients exactly zero after the all-reduce means no worker contributed anything:
        # skip the step (Adam would still move the weights). Gradients are global, so every
        # worker that looks decides alike; only workers that had a non-finite or dummy batch
        # look, and if the gradients are all zero, every worker had one.
        if self._update_had_nonfinite:
            self._update_had_nonfinite = False
            if not any(p.grad is not None and bool(p.grad.any()) for p in model.parameters()):
                logger.warning(f"update {update_num + 1}: no batch of it was finite, the optimizer step is skipped")
                return
        super().optimizer_step(optimizer, model, update_num)

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        skipped = sum(log.get("nonfinite_batches", 0) for log in logging_outputs)
        if skipped:
            metrics.log_scalar_sum("nonfinite_batches", skipped)

    def _describe_items(self, sample, rows):
        """'<split>.tsv:<line> <wav> (image <split>.img:<line> <image>)' for items ``rows`` of
        a batch (all when None)."""
        dataset = self.datasets.get(sample.get("split"))
        ids = sample["id"].tolist()
        chosen = ids if rows is None else [ids[r] for r in rows]
        if not isinstance(dataset, SpeechImageDataset):
            return [f"dataset item {i}" for i in chosen]
        return dataset.describe_items(chosen)

    # ---- whole-split retrieval at validation ----
    def begin_valid_epoch(self, epoch, model):
        self._valid_embeddings.clear()
        self._valid_recall.clear()

    def valid_step(self, sample, model, criterion):
        rerank_on = self.cfg.valid_rerank_k > 0
        criterion.keep_sequences = rerank_on
        self._valid_model = model if rerank_on else None
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        emb = criterion.last_embeddings
        if emb is None:
            return loss, sample_size, logging_output
        # items are filed by their own split: a worker may have run fairseq's dummy batch (a
        # training batch) while the others scored the valid split; only unshuffled splits count
        scored = {
            split_code(name): name
            for name, ds in self.datasets.items()
            if isinstance(ds, SpeechImageDataset) and not ds.shuffle
        }
        for split in {scored[c] for c in emb["split_codes"].tolist() if c in scored}:
            store = self._valid_embeddings.setdefault(split, {})
            for i in (emb["split_codes"] == split_code(split)).nonzero()[:, 0].tolist():
                item = (int(emb["image_ids"][i]), emb["speech"][i], emb["image"][i])
                if rerank_on:
                    item += (emb["speech_seq"][i], emb["image_tokens"][i])
                store[int(emb["ids"][i])] = item
            # evaluated when validation's aggregator is read, i.e. after the whole split
            for key in RECALL_KEYS + (RERANK_KEYS if rerank_on else []):
                metrics.log_derived(key, lambda meters, s=split, k=key: self._split_recall(s)[k])
        return loss, sample_size, logging_output

    def _split_recall(self, split: str) -> Dict[str, float]:
        """Recall on the whole split, read when validation ends. A split not seen whole (e.g.
        dataset.max_valid_steps) is an error, never a NaN that silently stops checkpoint_best.pt."""
        if split in self._valid_recall:
            return self._valid_recall[split]
        store = self._valid_embeddings.get(split, {})
        dataset = self.datasets[split]
        if len(store) != len(dataset):
            raise RuntimeError(
                f"validation of split {split!r} collected {len(store)} of its {len(dataset)} utterances; "
                "recall needs the whole split (dataset.max_valid_steps set? embeddings not gathered?)"
            )
        ids = sorted(store)
        image_ids = torch.tensor([store[i][0] for i in ids])
        speech = torch.stack([store[i][1] for i in ids]).float()
        unique_ids, image_index = torch.unique(image_ids, return_inverse=True)
        first = {}
        for row, img in enumerate(image_ids.tolist()):
            first.setdefault(img, row)
        images = torch.stack([store[ids[first[i]]][2] for i in unique_ids.tolist()]).float()
        result = retrieval_recall(speech, images, image_index, ks=RECALL_KS)
        self._valid_recall[split] = {k: float(result[k]) for k in RECALL_KEYS}
        if self.cfg.valid_rerank_k > 0 and self._valid_model is not None:
            sequences = [store[i][3] for i in ids]
            tokens = torch.stack([store[ids[first[i]]][4] for i in unique_ids.tolist()])
            scorer = SequencePairScorer(self._valid_model, sequences, tokens)
            weight = sic_weight(str(self.cfg.valid_rerank_score), float(self._valid_model.logit_scale.detach().exp()))
            ranked = rerank(speech, images, scorer, self.cfg.valid_rerank_k, sic_weight=weight)
            rr = reranked_recall(ranked, image_index, ks=RECALL_KS)
            self._valid_recall[split].update({"rerank_" + key: float(rr[key]) for key in RECALL_KEYS})
        logger.info(
            f"{split}: whole-split recall on {len(ids)} utterances x {len(unique_ids)} images: "
            + ", ".join(f"{k}={v:.1f}" for k, v in self._valid_recall[split].items())
        )
        return self._valid_recall[split]

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
