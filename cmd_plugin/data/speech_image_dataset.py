"""Paired (spoken caption, image) dataset on fairseq's raw-audio dataset.

Audio follows fairseq's wav2vec/HuBERT conventions (``RawAudioDataset``: padded batches with a
padding mask, batches formed by ``batch_by_size`` over length-ordered indices). Waveforms are
returned raw: the model applies the HuBERT checkpoint's own ``normalize`` setting, so the
dataset cannot disagree with the upstream it feeds.

Images are de-duplicated within a batch (captions of one image share one encoded image):
``net_input["image_index"]`` maps each utterance to its row of the batch's images.
"""

import logging
import os
from typing import Callable, Dict, List, Optional

import numpy as np
import soundfile as sf
import torch

from ..quiet import import_fairseq

import_fairseq()  # before fairseq's modules: without its known-harmless import-time notes

from fairseq.data.audio.raw_audio_dataset import RawAudioDataset
from PIL import Image

from .manifest import ManifestError, SpeechImageManifest

logger = logging.getLogger(__name__)


class PixelImages:
    """Images read from disk and preprocessed with the image encoder's own transform."""

    def __init__(self, manifest: SpeechImageManifest, transform: Callable):
        self.manifest = manifest
        self.transform = transform

    def __call__(self, relative_paths: List[str]) -> Dict[str, torch.Tensor]:
        pixels = []
        for rel in relative_paths:
            path = self.manifest.image_path(rel)
            try:
                with Image.open(path) as im:
                    pixels.append(self.transform(im.convert("RGB")))
            except FileNotFoundError:
                raise ManifestError(
                    f"{self.manifest.image_where(rel)}: image {path} is missing (moved or deleted since preparation?)"
                ) from None
            except Exception as e:  # PIL's errors do not name the file
                raise ManifestError(
                    f"{self.manifest.image_where(rel)}: cannot read image {path} ({type(e).__name__}: {e})"
                ) from None
        return {"images": torch.stack(pixels)}


class SpeechImageDataset(RawAudioDataset):
    def __init__(
        self,
        manifest: SpeechImageManifest,
        split: str,
        images: Callable[[List[str]], Dict[str, torch.Tensor]],
        sample_rate: int = 16000,
        min_sample_size: int = 0,
        max_sample_size: Optional[int] = None,
        shuffle: bool = True,
        num_length_buckets: int = 0,
        speech_states=None,
    ):
        """
        Args:
            manifest: the split's utterances and images (``cmd_plugin.data.manifest``).
            split: split name, carried in each batch (validation gathers per split).
            images: maps a list of relative image paths to a dict of batched tensors
                (pixels, or cached features).
            min_sample_size / max_sample_size: utterances outside [min, max] samples are
                dropped, with their images (parallel data stays aligned). Captions are never
                cropped: cropping would cut words the image must be matched to.
            num_length_buckets: 0 orders utterances by exact length; N > 0 groups them in N
                length quantiles and shuffles within each, so batches of similar length still
                change composition (and negatives) from epoch to epoch.
            speech_states: a :class:`~cmd_plugin.data.speech_cache.SpeechStateCache` of this split: items
                carry the frozen upstream's states instead of waveforms, batches ``speech_states``
                (num_states, B, frames, D) and ``speech_frame_mask`` (B, frames) instead of ``source``
                and ``padding_mask``.
        """
        super().__init__(sample_rate=sample_rate, shuffle=shuffle, pad=True, normalize=False)
        self.manifest = manifest
        self.split = split
        self.images = images
        self.num_length_buckets = num_length_buckets
        self.speech_states = speech_states
        if speech_states is not None:
            speech_states.check_manifest(manifest)
        sizes = np.asarray(manifest.num_samples, dtype=np.int64)
        upper = max_sample_size if max_sample_size is not None else np.iinfo(np.int64).max
        keep = (sizes >= min_sample_size) & (sizes <= upper)
        self.kept = np.nonzero(keep)[0]
        if len(self.kept) == 0:
            raise ManifestError(f"split {split!r}: no utterance within [{min_sample_size}, {upper}] samples")
        if len(self.kept) < len(sizes):
            logger.info(f"{split}: dropped {len(sizes) - len(self.kept)} utterances outside the size limits")
        self.sizes = sizes[self.kept]
        self.image_ids = manifest.image_ids[self.kept]
        self.image_paths = manifest.unique_images

    def read_wave(self, row: int) -> torch.Tensor:
        """The manifest row's waveform (float32, checked against the manifest); errors name its line."""
        path = self.manifest.audio_path(row)
        where = self.manifest.audio_where(row)
        # errors name the manifest line: a bare libsndfile message from a data-loader worker
        # does not say which of 600k files broke
        if not os.path.isfile(path):
            raise ManifestError(f"{where}: wav {path} is missing (moved or deleted since preparation?)")
        try:
            wav, sr = sf.read(path, dtype="float32", always_2d=True)
        except Exception as e:
            raise ManifestError(f"{where}: cannot read audio {path} ({type(e).__name__}: {e})") from None
        if sr != self.sample_rate or wav.shape[1] != 1:
            raise ManifestError(
                f"{where}: {path} is {sr} Hz with {wav.shape[1]} channel(s), expected {self.sample_rate} Hz mono"
            )
        expected = self.manifest.num_samples[row]
        if wav.shape[0] != expected:
            raise ManifestError(
                f"{where}: {path} has {wav.shape[0]} samples, the manifest says {expected} "
                "(the file changed since preparation: re-run it)"
            )
        return torch.from_numpy(wav[:, 0])

    def __getitem__(self, index: int):
        row = int(self.kept[index])
        if self.speech_states is not None:
            # the frozen upstream's states of this utterance, (frames, num_states, D), instead of its waveform
            return {"id": index, "states": self.speech_states[row], "image_id": int(self.image_ids[index])}
        return {"id": index, "source": self.read_wave(row), "image_id": int(self.image_ids[index])}

    def describe_items(self, indices: List[int]) -> List[str]:
        """'<split>.tsv:<line> <wav> (image <split>.img:<line> <image>)' per dataset index."""
        lines = []
        for index in indices:
            row = int(self.kept[index])
            rel = self.manifest.image_paths[row]
            lines.append(
                f"{self.manifest.audio_where(row)} {self.manifest.audio_path(row)} "
                f"(image {self.manifest.image_where(rel)} {self.manifest.image_path(rel)})"
            )
        return lines

    @property
    def can_reuse_epoch_itr_across_epochs(self):
        # fairseq would otherwise order and batch a training split once, and every epoch would
        # see the same batches: each utterance the same negatives for the whole training
        return not self.shuffle

    def ordered_indices(self):
        if not self.shuffle:
            return np.arange(len(self))
        order = np.random.permutation(len(self))
        if self.num_length_buckets > 0:
            edges = np.quantile(self.sizes, np.linspace(0, 1, self.num_length_buckets + 1)[1:-1])
            keys = np.searchsorted(edges, self.sizes, side="right")
        else:
            keys = self.sizes
        # primary key: length (bucket); ties broken by the random permutation
        return np.lexsort((order, keys))[::-1]

    def collate_states(self, samples):
        """Cached items -> {"id", "net_input": {"speech_states" (S, B, T', D) float32, zero past each
        utterance's frames, "speech_frame_mask" (B, T') True at padding}}."""
        if not samples:
            return {}
        lengths = [s["states"].shape[0] for s in samples]
        num_states, dim = samples[0]["states"].shape[1:]
        states = torch.zeros(num_states, len(samples), max(lengths), dim)
        mask = torch.ones(len(samples), max(lengths), dtype=torch.bool)
        for i, (s, n) in enumerate(zip(samples, lengths)):
            states[:, i, :n] = s["states"].transpose(0, 1).float()
            mask[i, :n] = False
        return {
            "id": torch.LongTensor([s["id"] for s in samples]),
            "net_input": {"speech_states": states, "speech_frame_mask": mask},
        }

    def collater(self, samples):
        if self.speech_states is not None:
            batch = self.collate_states(samples)
            if not batch:
                return batch
            image_ids = torch.tensor([s["image_id"] for s in samples])
            padding = batch["net_input"]["speech_frame_mask"]
        else:
            batch = super().collater(samples)
            if not batch:
                return batch
            image_ids = torch.tensor([s["image_id"] for s in samples if s["source"] is not None])
            padding = batch["net_input"]["padding_mask"]
        unique_ids, image_index = torch.unique(image_ids, return_inverse=True)
        batch["net_input"].update(self.images([self.image_paths[i] for i in unique_ids.tolist()]))
        batch["net_input"]["image_index"] = image_index
        batch["image_ids"] = image_ids
        batch["split"] = self.split
        batch["nsentences"] = len(image_ids)
        batch["ntokens"] = int((~padding).sum())  # samples, or frames when states are cached
        return batch
