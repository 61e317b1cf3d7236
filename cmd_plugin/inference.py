"""Embed your own audio and images with a trained ``cmd_speech_image`` checkpoint.

    from cmd_plugin.inference import SpeechImageEncoder

    encoder = SpeechImageEncoder.from_checkpoint("checkpoint_best.pt", device="cpu")
    speech = encoder.embed_audio(["query.flac", (waveform, 44100)])   # (2, E) unit norm
    images = encoder.embed_images(["beach.jpg", pil_image])           # (2, E) unit norm
    scores = speech @ images.T                                        # cosine similarities

The checkpoint is loaded once (:func:`cmd_plugin.loading.load_cmd_checkpoint`: frozen
upstreams rebuilt from their files, re-pointable with ``hubert_path`` / ``image_pretrained`` /
``image_model_config``; the SIM encoder and matching head kept only with ``keep_matching=True``,
for re-ranking). Embeddings are S_cls and I_cls, the model's unit-norm joint-space embeddings,
returned as float32 CPU tensors.

Audio: a file soundfile reads (wav, flac, ogg/vorbis/opus, mp3 with libsndfile >= 1.1) of any
sample rate and channel count, or an array ``(T,)`` / ``(T, C)`` (channels last, as soundfile
returns) with its sample rate. Channels are averaged (down-mix), then resampled to the model's
16 kHz with ``torchaudio.functional.resample`` (band-limited sinc interpolation).
Clips longer than the model's limit (``task.max_sample_size``, 30 s by default) are never
cropped: with ``long_audio="windows"`` (the default) the clip is cut into the fewest equal
windows within the limit, each window is embedded, and the clip's embedding is the normalised
mean of the windows'; ``long_audio="error"`` refuses such clips instead. Clips shorter than
``task.min_sample_size`` (0.1 s) are refused: the model never saw one.

Images: a file PIL reads or a PIL image, converted to RGB and preprocessed with the image
encoder's own open_clip eval transform (as in training and scoring).

Identities (what an index of embeddings depends on, so that a search index is refused by a model
that would embed differently): :func:`image_identity` for images, :func:`speech_identity` for
spoken clips.
"""

import hashlib
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from PIL import Image
from tqdm import tqdm

from .encoder_identity import image_encoder_identity, update_tensor_digest
from .loading import autocast, has_matching_head, load_cmd_checkpoint, resolve_device

logger = logging.getLogger(__name__)

AudioInput = Union[str, os.PathLike, Tuple[Any, int], np.ndarray, torch.Tensor]
LONG_AUDIO_CHOICES = ("windows", "error")


class InferenceError(ValueError):
    """Input that cannot be embedded; the message names the file (or item) and what was expected."""


# ---------------------------------------------------------------- audio


def read_audio(path: str) -> Tuple[np.ndarray, int]:
    """Read an audio file -> ((T, C) float32, sample rate), with errors naming the file."""
    if not os.path.isfile(path):
        raise InferenceError(f"{path}: audio file not found")
    try:
        wav, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError/RuntimeError/TypeError by format
        image = _image_format(path)
        if image:
            raise InferenceError(
                f"{path}: cannot read audio: this is a {image} image, not a sound file "
                "(expected wav, flac, ogg/opus or mp3)"
            ) from err
        raise InferenceError(
            f"{path}: cannot read audio (expected a file libsndfile reads: wav, flac, ogg/opus, mp3; "
            f"{str(err).strip() or type(err).__name__})"
        ) from err
    return wav, int(rate)


def _image_format(path: str) -> Optional[str]:
    """The format name ("PNG", "JPEG", ...) when PIL recognises ``path`` as an image, else None."""
    try:
        with Image.open(path) as im:
            return im.format or "an"
    except Exception:
        return None


SILENCE_PEAK = 1e-3  # -60 dBFS: below this a clip holds nothing but noise floor (a muted microphone)


def check_audible(wave: torch.Tensor, name: str = "audio", threshold: float = SILENCE_PEAK) -> None:
    """Refuse a silent clip (peak amplitude below ``threshold``) as a search query: its
    embedding would rank images by nothing the speaker said."""
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    if peak < threshold:
        raise InferenceError(
            f"{name}: the clip is silent (peak amplitude {peak:.1e}, below {threshold:.0e} = "
            f"{20 * np.log10(threshold):.0f} dBFS): record again, closer to the microphone"
        )


def to_mono_16k(wav, rate: int, target_rate: int = 16000, name: str = "audio") -> torch.Tensor:
    """(T,) or (T, C) samples at ``rate`` -> (T',) float32 mono at ``target_rate``.

    Down-mix: the mean of the channels. Resampling: torchaudio's band-limited sinc
    interpolation (its defaults: Hann window, 6 zero crossings, roll-off 0.99)."""
    x = torch.as_tensor(np.asarray(wav, dtype=np.float32) if not isinstance(wav, torch.Tensor) else wav)
    x = x.float()
    if x.dim() == 2:
        x = x.mean(dim=1)
    elif x.dim() != 1:
        raise InferenceError(f"{name}: expected samples of shape (T,) or (T, channels), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise InferenceError(f"{name}: no audio samples")
    if not bool(torch.isfinite(x).all()):
        raise InferenceError(f"{name}: audio contains NaN or inf")
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate < 1:
        raise InferenceError(f"{name}: sample rate must be a positive int, got {rate!r}")
    if int(rate) != target_rate:
        x = AF.resample(x, int(rate), target_rate)
    return x.contiguous()


def split_windows(num_samples: int, max_samples: int) -> List[Tuple[int, int]]:
    """The fewest equal windows (start, stop) covering ``num_samples``, none over ``max_samples``."""
    count = max(1, -(-num_samples // max_samples))
    bounds = [round(i * num_samples / count) for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(count)]


# ---------------------------------------------------------------- images


def load_image(item, transform, name: Optional[str] = None) -> torch.Tensor:
    """A path or PIL image -> preprocessed (3, H, W) pixels, errors naming the file."""
    if isinstance(item, Image.Image):
        return transform(item.convert("RGB"))
    path = os.fspath(item)
    if not os.path.isfile(path):
        raise InferenceError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return transform(im.convert("RGB"))
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError...
        raise InferenceError(
            f"{path}: cannot read image (expected a jpg/png/webp file PIL decodes; "
            f"{str(err).strip() or type(err).__name__})"
        ) from err


class ImageBatches(torch.utils.data.Dataset):
    """Consecutive batches of ``items`` (batch i: ``items[i * batch_size:(i + 1) * batch_size]``), each
    read by ``read(batch)`` -- in a DataLoader's worker processes when it has any (``batch_size=None``:
    the batches are already made). Whole-split scoring reads relative paths with the task's image
    reader (pixels or cached features); :meth:`SpeechImageEncoder.embed_image_files` reads
    (position, file) pairs with :class:`ReadImageFiles`."""

    def __init__(self, items: Sequence, batch_size: int, read: Callable[[list], Any]):
        self.items = list(items)
        self.batch_size = batch_size
        self.read = read

    def __len__(self):
        return -(-len(self.items) // self.batch_size)

    def __getitem__(self, i):
        return self.read(self.items[i * self.batch_size : (i + 1) * self.batch_size])


class ReadImageFiles:
    """[(position, path)] -> (positions read, pixels (B', 3, H, W) or None, failures [(position, message)]):
    files that cannot be read are reported, not raised."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, batch):
        positions, pixels, failures = [], [], []
        for pos, path in batch:
            try:
                pixels.append(load_image(path, self.transform))
                positions.append(pos)
            except InferenceError as err:
                failures.append((pos, str(err)))
        return positions, (torch.stack(pixels) if pixels else None), failures


# ---------------------------------------------------------------- identity


IDENTITY_WORDS = {
    "image_model": "open_clip model name",
    "model_config": "open_clip model config",
    "preprocess": "image preprocessing",
    "image_weights_sha256": "image encoder weights",
    "embed_dim": "embedding size",
    "speech_weights_sha256": "speech encoder weights (HuBERT and the speech layer)",
    "hubert_layer_states": "HuBERT states mixed (model.hubert_layer_states)",
    "hubert_normalize": "waveform normalisation of the HuBERT checkpoint",
    "sample_rate": "sample rate",
    "max_sample_size": "longest window (task.max_sample_size)",
}

# the parts of the model an utterance's S_cls goes through (fine-tuned with the rest: every
# checkpoint has its own speech side, hence its own index of spoken clips)
SPEECH_PARTS = ("hubert", "layer_weights", "cls_token", "speech_encoder", "speech_proj")


def speech_identity(model, task, checkpoint: str = "") -> Dict[str, Any]:
    """What speech embeddings depend on: the weights of every part S_cls goes through, which
    HuBERT states are mixed, the waveform normalisation, the sample rate and the window length
    that long clips are cut into. An index of spoken clips is refused by a model whose speech
    identity differs. Keys starting with "_" are informational."""
    digest = hashlib.sha256()
    for part in SPEECH_PARTS:
        obj = getattr(model, part)
        state = obj.state_dict() if isinstance(obj, torch.nn.Module) else {"": obj}
        update_tensor_digest(digest, state, prefix=part + ".")
    return {
        "speech_weights_sha256": digest.hexdigest(),
        "hubert_layer_states": str(getattr(model.cfg, "hubert_layer_states", "")),
        "hubert_normalize": bool(model.hubert.normalize),
        "sample_rate": int(model.hubert.sample_rate),
        "max_sample_size": int(task.cfg.max_sample_size),
        "embed_dim": int(model.image_encoder.embed_dim),
        "_checkpoint": os.path.abspath(checkpoint) if checkpoint else "",
    }


def image_identity(model, checkpoint: str = "") -> Dict[str, Any]:
    """What image embeddings depend on: :func:`cmd_plugin.encoder_identity.image_encoder_identity`
    of the image tower as loaded (a frozen CLIP's file, or fine-tuned weights from the checkpoint),
    under the keys an index records. The fingerprint equals the ``weights_sha256`` of an image
    feature cache made with the same tower.

    Checkpoints trained against the same frozen image encoder share one joint space, so an
    index built with one serves them all. Keys starting with "_" are informational."""
    tower = image_encoder_identity(model.image_encoder)
    cfg = model.cfg
    return {
        "image_model": tower["model"],
        "model_config": tower["model_config"],
        "preprocess": tower["preprocess"],
        "image_weights_sha256": tower["weights_sha256"],
        "embed_dim": int(model.image_encoder.embed_dim),
        "_checkpoint": os.path.abspath(checkpoint) if checkpoint else "",
        "_image_pretrained": getattr(cfg, "image_pretrained", ""),
        "_image_encoder_frozen": bool(getattr(cfg, "freeze_image_encoder", True)),
    }


# ---------------------------------------------------------------- the encoder


class SpeechImageEncoder:
    """A loaded checkpoint that embeds audio and images into the joint space.

    Attributes: ``model`` (eval mode, on ``device``), ``task``, ``device``, ``fp16``,
    ``sample_rate`` (16000), ``min_samples`` / ``max_samples`` (the task's size limits),
    ``embed_dim`` E, ``checkpoint``.
    """

    def __init__(
        self, model, task, device: str = "cpu", fp16: bool = False, checkpoint: str = "", long_audio: str = "windows"
    ):
        if long_audio not in LONG_AUDIO_CHOICES:
            raise InferenceError(f"long_audio must be one of {LONG_AUDIO_CHOICES}, got {long_audio!r}")
        self.device = resolve_device(device, fp16)
        self.fp16 = fp16
        self.checkpoint = checkpoint
        self.long_audio = long_audio
        self.task = task
        self._identity = self._speech_identity = None
        self.model = model.eval()
        self.identity  # hashed on the CPU in float32, before any move or cast
        self.model = self.model.to(self.device)
        self.sample_rate = int(model.hubert.sample_rate)
        self.min_samples = int(task.cfg.min_sample_size)
        self.max_samples = int(task.cfg.max_sample_size)
        self.embed_dim = int(model.image_encoder.embed_dim)
        self.transform = task.transform

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        device: str = "cpu",
        fp16: bool = False,
        hubert_path: Optional[str] = None,
        image_pretrained: Optional[str] = None,
        image_model_config: Optional[str] = None,
        long_audio: str = "windows",
        keep_matching: bool = False,
        keep_fusion: bool = False,
    ) -> "SpeechImageEncoder":
        """Load ``checkpoint`` once; ``device`` cpu/cuda/cuda:N, ``fp16`` (CUDA only) encodes under
        float16 autocast. The upstream arguments re-point files that moved since training.
        ``keep_matching`` keeps a coarse-to-fine checkpoint's SIM encoder and matching head (to re-rank and
        to explain with its Grad-CAM), ``keep_fusion`` a CMD checkpoint's fusion encoder (:meth:`explain`)."""
        resolve_device(device, fp16)  # fail before the slow load
        # No manifest is read: task.data only has to be a directory for the task to set up.
        model, task = load_cmd_checkpoint(
            checkpoint,
            data=os.path.dirname(os.path.abspath(checkpoint)),
            hubert_path=hubert_path,
            image_pretrained=image_pretrained,
            image_model_config=image_model_config,
            keep_matching=keep_matching,
            keep_fusion=keep_fusion,
        )
        return cls(model, task, device=device, fp16=fp16, checkpoint=checkpoint, long_audio=long_audio)

    @property
    def identity(self) -> Dict[str, Any]:
        """:func:`image_identity` of the loaded model (computed once)."""
        if self._identity is None:
            self._identity = image_identity(self.model, self.checkpoint)
        return self._identity

    @property
    def speech_identity(self) -> Dict[str, Any]:
        """:func:`speech_identity` of the loaded model (computed once, when an index of spoken clips
        is first built or read: hashing HuBERT-Large takes seconds)."""
        if self._speech_identity is None:
            self._speech_identity = speech_identity(self.model, self.task, self.checkpoint)
        return self._speech_identity

    @property
    def has_matching_head(self) -> bool:
        """True when the model holds a matching head (a coarse-to-fine checkpoint loaded with
        ``keep_matching``): results can be re-ranked."""
        return has_matching_head(self.model)

    def autocast(self):
        """The context to run this encoder's model under (:func:`cmd_plugin.loading.autocast`)."""
        return autocast(self.device, self.fp16)

    # ---- audio ----
    def load_audio(
        self, item: AudioInput, sample_rate: Optional[int] = None, name: Optional[str] = None
    ) -> torch.Tensor:
        """One audio input -> (T,) float32 mono waveform at the model's sample rate.

        ``item``: a path; a ``(samples, rate)`` pair; or samples with ``sample_rate``."""
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            wav, rate = read_audio(path)
            return to_mono_16k(wav, rate, self.sample_rate, name=path)
        if isinstance(item, tuple):
            if len(item) != 2:
                raise InferenceError(f"{name or 'audio'}: expected (samples, sample_rate), got a tuple of {len(item)}")
            wav, rate = item
        else:
            wav, rate = item, sample_rate
            if rate is None:
                raise InferenceError(
                    f"{name or 'audio'}: an array needs its sample rate (give (samples, rate) or sample_rate=)"
                )
        return to_mono_16k(wav, rate, self.sample_rate, name=name or "audio array")

    def windows(self, wave: torch.Tensor, name: str) -> List[torch.Tensor]:
        """The windows (T_w,) a clip is embedded in: the clip itself, or the fewest equal windows
        within the model's limit. Raises :class:`InferenceError` naming ``name`` for a clip shorter
        than the model's minimum, or longer than its limit with ``long_audio="error"``."""
        n = wave.numel()
        rate = self.sample_rate
        if n < self.min_samples:
            raise InferenceError(
                f"{name}: {n / rate:.3f} s of audio, shorter than the model's minimum "
                f"{self.min_samples / rate:.3f} s (task.min_sample_size={self.min_samples} samples at {rate} Hz)"
            )
        if n <= self.max_samples:
            return [wave]
        if self.long_audio == "error":
            raise InferenceError(
                f"{name}: {n / rate:.1f} s of audio, longer than the model's limit {self.max_samples / rate:.1f} s "
                f"(task.max_sample_size); cut it, or embed it in windows (long_audio='windows')"
            )
        return [wave[a:b] for a, b in split_windows(n, self.max_samples)]

    @torch.no_grad()
    def embed_waveforms(
        self,
        waves: Sequence[torch.Tensor],
        names: Optional[Sequence[str]] = None,
        batch_size: int = 8,
        return_sequences: bool = False,
    ):
        """(T_i,) mono waveforms at the model's rate -> (N, E) float32 unit-norm S_cls.

        Segments are batched by decreasing length (little padding) with a padding mask. With
        ``return_sequences`` also returns, per waveform, the list of its windows' speech layer
        outputs (1+T'_w, D) without padding (the matching head's input; one window unless the
        clip is longer than the model's limit), on the model's device: ``(embeddings, sequences)``."""
        if batch_size < 1:
            raise InferenceError(f"batch_size must be positive, got {batch_size}")
        names = list(names) if names is not None else [f"audio #{i}" for i in range(len(waves))]
        segments, owner = [], []
        for i, (wave, name) in enumerate(zip(waves, names)):
            for seg in self.windows(wave, name):
                segments.append(seg)
                owner.append(i)
        sums = torch.zeros(len(waves), self.embed_dim)
        counts = torch.zeros(len(waves))
        sequences: List[List[Optional[torch.Tensor]]] = [[] for _ in waves]
        window_of = {}
        for j, i in enumerate(owner):  # windows keep their order within a clip
            window_of[j] = len(sequences[i])
            sequences[i].append(None)
        order = sorted(range(len(segments)), key=lambda j: -segments[j].numel())
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            longest = segments[batch[0]].numel()
            source = torch.zeros(len(batch), longest)
            padding = torch.ones(len(batch), longest, dtype=torch.bool)
            for row, j in enumerate(batch):
                n = segments[j].numel()
                source[row, :n] = segments[j]
                padding[row, :n] = False
            with self.autocast():
                out = self.model.encode_speech_sequence(source.to(self.device), padding.to(self.device))
            emb = out["speech"].float().cpu()
            for row, j in enumerate(batch):
                sums[owner[j]] += emb[row]
                counts[owner[j]] += 1
                if return_sequences:
                    seq, mask = out["speech_seq"][row], out["speech_mask"]
                    n = seq.size(0) if mask is None else int((~mask[row]).sum())
                    sequences[owner[j]][window_of[j]] = seq[:n]
        # one window: its own (unit-norm) embedding; several: the normalised mean
        emb = F.normalize(sums / counts.clamp(min=1).unsqueeze(1), dim=-1)
        return (emb, sequences) if return_sequences else emb

    def embed_audio(
        self, items: Sequence[AudioInput], sample_rate: Optional[int] = None, batch_size: int = 8
    ) -> torch.Tensor:
        """Audio files or arrays -> (N, E) float32 unit-norm speech embeddings (S_cls).

        Raises :class:`InferenceError` naming the first file that cannot be read or is
        outside the model's length limits (see the module docstring)."""
        single_pair = isinstance(items, tuple) and len(items) == 2 and isinstance(items[1], (int, np.integer))
        if isinstance(items, (str, os.PathLike, np.ndarray, torch.Tensor)) or single_pair:
            items = [items]  # one clip (an array is one clip, (T,) or (T, channels))
        waves, names = [], []
        for i, item in enumerate(items):
            name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"audio #{i}"
            waves.append(self.load_audio(item, sample_rate=sample_rate, name=name))
            names.append(name)
        return self.embed_waveforms(waves, names, batch_size=batch_size)

    # ---- images ----
    @torch.no_grad()
    def explain(self, audio: AudioInput, image, sample_rate: Optional[int] = None, name: Optional[str] = None):
        """Why this image for this spoken query: every map the checkpoint can give of the pair
        (:func:`cmd_plugin.retrieval.explain.explain_pair`), the best-pointing first -- the cosine of
        S_cls with each patch's value-path token (MaskCLIP's dense features; every checkpoint whose tower
        has one), the matching head's Grad-CAM over the patches with the match logit's saliency over the
        speech frames (coarse-to-fine checkpoints loaded with ``keep_matching=True``), the cosine with
        each plain patch token (every checkpoint), the fusion encoder's attention (CMD checkpoints
        loaded with ``keep_fusion=True``). ``audio`` as :meth:`load_audio` (a clip longer than the model's limit
        is cut into the windows :meth:`embed_audio` uses: the maps are their mean, the saliencies
        side by side), ``image`` a path or a PIL image. Each :class:`~cmd_plugin.retrieval.explain.Explanation`
        holds a map on the patch grid and a saliency per speech frame, both in [0, 1].

            enc = SpeechImageEncoder.from_checkpoint("checkpoint_best.pt", keep_matching=True)
            best = enc.explain("query.wav", "photo.jpg")[0]
            print(best.label, best.peak(), best.image_map.shape)
        """
        return self.explain_images(audio, [image], sample_rate=sample_rate, name=name)[0]

    def explain_images(
        self,
        audio: AudioInput,
        images: Sequence,
        sample_rate: Optional[int] = None,
        name: Optional[str] = None,
        keep_errors: bool = False,
        first_only: bool = False,
    ) -> List:
        """:meth:`explain` of one query against several images, the query's HuBERT states computed once.
        With ``keep_errors`` an image that cannot be read gives its :class:`InferenceError` in its place
        instead of raising it; with ``first_only`` each image gets only the first map (the best-pointing one)."""
        from .retrieval.explain import combine_windows, explain_pair

        label = name or (os.fspath(audio) if isinstance(audio, (str, os.PathLike)) else "audio")
        wave = self.load_audio(audio, sample_rate=sample_rate, name=label)
        check_audible(wave, label)  # nothing to explain in silence
        windows = []
        for window in self.windows(wave, label):  # a clip over the model's limit: as embed_audio cuts it
            with torch.no_grad():
                windows.append(self.model.hubert(window[None].to(self.device)))
        out = []
        for image in images:
            try:
                pixels = load_image(image, self.transform)[None].to(self.device)
            except InferenceError as err:
                if not keep_errors:
                    raise
                out.append(err)
                continue
            out.append(
                combine_windows(
                    [explain_pair(self.model, states, mask, pixels, first_only) for states, mask in windows]
                )
            )
        return out

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, E) float32 unit-norm I_cls."""
        with self.autocast():
            emb, _ = self.model.encode_image(pixels.to(self.device))
        return F.normalize(emb.float(), dim=-1).cpu()

    def embed_images(self, items: Sequence, batch_size: int = 32) -> torch.Tensor:
        """Image files or PIL images -> (N, E) float32 unit-norm image embeddings (I_cls).

        Raises :class:`InferenceError` naming the first file that cannot be read."""
        if isinstance(items, (str, os.PathLike, Image.Image)):
            items = [items]
        out = []
        for start in range(0, len(items), batch_size):
            pixels = torch.stack([load_image(item, self.transform) for item in items[start : start + batch_size]])
            out.append(self.embed_pixels(pixels))
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    def embed_image_files(
        self, paths: Sequence[str], batch_size: int = 32, num_workers: int = 0, progress: bool = False, on_batch=None
    ):
        """Many image files, decoded in ``num_workers`` processes, unreadable ones skipped.

        Returns (embeddings (M, E) float32, positions (M,) of ``paths`` they belong to,
        failures [(path, message)]). ``on_batch(positions, embeddings)`` is called after
        each batch (e.g. to save progress)."""
        loader = torch.utils.data.DataLoader(
            ImageBatches(list(enumerate(paths)), batch_size, ReadImageFiles(self.transform)),
            batch_size=None,
            num_workers=num_workers,
        )
        chunks, positions, failures = [], [], []
        with tqdm(total=len(paths), unit="img", desc="embedding images", disable=not progress) as bar:
            for pos, pixels, failed in loader:
                failures.extend((paths[p], msg) for p, msg in failed)
                if pixels is not None:
                    emb = self.embed_pixels(pixels)
                    chunks.append(emb)
                    positions.extend(pos)
                    if on_batch is not None:
                        on_batch(pos, emb)
                bar.update(len(pos) + len(failed))
        emb = torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)
        return emb, positions, failures
