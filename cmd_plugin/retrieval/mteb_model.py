"""A trained ``cmd_speech_image`` checkpoint as an MTEB model, and our manifests as MTEB tasks.

    import mteb
    from cmd_plugin.retrieval.mteb_model import CmdSpeechImageMteb, manifest_tasks

    model = CmdSpeechImageMteb.from_checkpoint("checkpoint_best.pt")           # an mteb encoder
    mteb.evaluate(model, mteb.get_tasks(tasks=["SpokenCOCOA2IRetrieval"]))     # mteb's registry (download)
    mteb.evaluate(model, manifest_tasks("manifests/flickr8k", "test"))        # our manifests, offline

Needs the ``mteb`` extra (``pip install -e ".[mteb]"``: mteb 2.26, Python >= 3.11; docs/mteb.md says
why the full mteb rather than mteb-core, and what it adds). ``mteb.evaluate`` caches results by model
name and revision in ~/.cache/mteb unless given ``cache=None``.

The model (:class:`CmdSpeechImageMteb`) follows mteb's encoder protocol: ``encode`` takes mteb's
DataLoader of a task's queries or corpus and returns (N, E) unit-norm float32 embeddings; similarity
is cosine (``ModelMeta.similarity_fn_name``). Speech and images go through
:class:`cmd_plugin.inference.SpeechImageEncoder`, which preprocesses them as ``examples/eval_recall.py``
does (mono 16 kHz waveform, padded length-ordered batches; the image encoder's open_clip eval
transform). An audio item arrives as mteb gives it (``{"array", "sampling_rate"}``, or a decoder
object of ``datasets``' Audio feature); a multi-channel array is channels-first, as mteb's own audio
collator takes it. Clips are grouped ``sort_window`` at a time and batched by decreasing length
inside a group: with a group as large as the split, the batches are exactly eval_recall's.

The local tasks (:func:`manifest_tasks`) are mteb retrieval tasks of type ``Any2AnyRetrieval`` built
from a manifest split (``{split}.tsv`` / ``{split}.img``, docs/formats.md): speech -> image (one
relevant image per utterance) and image -> speech (every caption of the image is relevant). Audio is
read into memory (4 bytes per sample) as mteb's ``{"array", "sampling_rate"}`` items; images are
``datasets.Image`` items read lazily from their files.
"""

import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

try:
    import datasets
    import pyarrow as pa
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError(
        f"cmd_plugin.retrieval.mteb_model needs mteb ({err}): install the extra with "
        '`pip install -e ".[mteb]" -c constraints/env-a.txt` (Python >= 3.11)'
    ) from err

from ..data.manifest import ManifestError, check_files_exist, check_split, read_manifest
from ..inference import InferenceError, SpeechImageEncoder

MODEL_ORGANIZATION = "cmd_plugin"  # mteb model names are "organization/name"
MODALITIES = ["audio", "image"]
DEFAULT_BATCH_SIZE = 32  # as examples/eval_recall.py
DEFAULT_SORT_WINDOW = 4096
PROGRESS_FROM = 2000  # utterances from which reading a split's audio shows a progress bar (~10 s and more)


class MtebModelError(ValueError):
    """A checkpoint or an input that the mteb model cannot use; the message says which and why."""


# ---------------------------------------------------------------- the model


def checkpoint_fingerprint(encoder: SpeechImageEncoder) -> str:
    """A short hash of everything the embeddings depend on: the speech identity (HuBERT and the speech
    layer's weights, mixed states, normalisation, rate, window) and the image identity (tower weights,
    preprocessing), informational keys left out. Used as the mteb revision: two checkpoints with equal
    fingerprints embed alike, so mteb's result cache may share their results."""
    identity = {
        key: value
        for part in (encoder.speech_identity, encoder.identity)
        for key, value in part.items()
        if not key.startswith("_")
    }
    canonical = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def model_label(checkpoint: str) -> str:
    """'<run directory>-<file stem>' (e.g. 'checkpoints_cmd-checkpoint_best'): the model name's second part."""
    path = os.path.abspath(checkpoint)
    run = os.path.basename(os.path.dirname(path)) or "run"
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{run}-{stem}"


def load_speech_image_encoder(checkpoint: str, **kwargs) -> SpeechImageEncoder:
    """:meth:`SpeechImageEncoder.from_checkpoint`, refusing with one message a checkpoint mteb cannot use:
    a missing file, a file that is not a ``cmd_speech_image`` checkpoint, or a model without a speech side."""
    if not os.path.isfile(checkpoint):
        raise MtebModelError(f"{checkpoint}: checkpoint not found")
    try:
        encoder = SpeechImageEncoder.from_checkpoint(checkpoint, **kwargs)
    except (FileNotFoundError, ValueError) as err:  # CheckpointError, InferenceError, missing upstream files
        detail = str(err) if checkpoint in str(err) else f"{checkpoint}: {err}"  # the file named once
        raise MtebModelError(
            f"{detail} -- mteb cannot use it: an mteb model needs a trained cmd_speech_image "
            "checkpoint, which embeds both speech and images"
        ) from err
    missing = [part for part in ("hubert", "speech_proj") if getattr(encoder.model, part, None) is None]
    if missing or not hasattr(encoder.model, "encode_speech_sequence"):
        raise MtebModelError(
            f"{checkpoint}: mteb cannot use it: its model has no speech side "
            f"(missing {', '.join(missing) or 'encode_speech_sequence'}); SpokenCOCO-style tasks embed speech and images"
        )
    return encoder


def build_model_meta(
    encoder: SpeechImageEncoder,
    checkpoint: str,
    name: Optional[str] = None,
    loader_kwargs: Optional[Dict[str, Any]] = None,
) -> "ModelMeta":
    """mteb's ModelMeta of a loaded checkpoint: name 'cmd_plugin/<label>', revision = fingerprint,
    modalities audio and image, the joint space's size, cosine similarity. ``loader_kwargs`` are what
    :func:`load_mteb_model` needs to rebuild the model (``ModelMeta.load_model``)."""
    n_parameters = sum(p.numel() for p in encoder.model.parameters())
    return ModelMeta(
        loader=load_mteb_model,
        loader_kwargs=dict(loader_kwargs or {"checkpoint": os.path.abspath(checkpoint)}),
        name=name or f"{MODEL_ORGANIZATION}/{model_label(checkpoint)}",
        revision=checkpoint_fingerprint(encoder),
        release_date=None,
        languages=None,
        n_parameters=n_parameters,
        memory_usage_mb=None,
        max_tokens=None,
        embed_dim=encoder.embed_dim,
        license=None,
        open_weights=None,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch"],
        similarity_fn_name="cosine",
        use_instructions=False,
        training_datasets=None,
        modalities=list(MODALITIES),
    )


def load_mteb_model(
    model_name: str, revision: Optional[str] = None, checkpoint: str = "", device: Optional[str] = None, **kwargs
) -> "CmdSpeechImageMteb":
    """The loader ``ModelMeta.load_model`` calls (mteb's signature: name, revision, keyword arguments)."""
    if not checkpoint:
        raise MtebModelError(f"{model_name}: no checkpoint given to load (loader_kwargs['checkpoint'])")
    model = CmdSpeechImageMteb.from_checkpoint(checkpoint, device=device or "cpu", name=model_name, **kwargs)
    if revision and revision != model.mteb_model_meta.revision:
        raise MtebModelError(
            f"{checkpoint}: fingerprint {model.mteb_model_meta.revision}, expected revision "
            f"{revision} (the checkpoint or its upstream files changed)"
        )
    return model


class CmdSpeechImageMteb(AbsEncoder):
    """An mteb encoder (speech and images) around a loaded :class:`SpeechImageEncoder`.

    ``batch_size``: clips / images per forward pass; ``sort_window``: clips read before they are
    sorted by length and batched (more: less padding, more memory). With ``record`` every ``encode``
    call's item ids and embeddings are kept in ``recorded[(task name, modality)]`` (a list of
    (ids, (n, E) tensor) pairs): examples/eval_mteb.py scores our R@K on the very embeddings mteb scored."""

    def __init__(
        self,
        encoder: SpeechImageEncoder,
        checkpoint: str = "",
        name: Optional[str] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        sort_window: int = DEFAULT_SORT_WINDOW,
        loader_kwargs: Optional[Dict[str, Any]] = None,
        record: bool = False,
    ):
        if batch_size < 1 or sort_window < 1:
            raise MtebModelError(f"batch_size and sort_window must be positive, got {batch_size} and {sort_window}")
        self.record = record
        self.recorded: Dict[Tuple[str, str], List[Tuple[List[str], torch.Tensor]]] = {}
        self.encoder = encoder
        self.model = encoder.model
        self.checkpoint = checkpoint or encoder.checkpoint
        self.batch_size = batch_size
        self.sort_window = sort_window
        self.mteb_model_meta = build_model_meta(encoder, self.checkpoint, name=name, loader_kwargs=loader_kwargs)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        device: str = "cpu",
        fp16: bool = False,
        name: Optional[str] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        sort_window: int = DEFAULT_SORT_WINDOW,
        record: bool = False,
        **upstreams,
    ) -> "CmdSpeechImageMteb":
        """Load ``checkpoint`` (``upstreams``: hubert_path / image_pretrained / image_model_config re-point
        moved upstream files, as everywhere else)."""
        encoder = load_speech_image_encoder(checkpoint, device=device, fp16=fp16, **upstreams)
        loader_kwargs = {
            "checkpoint": os.path.abspath(checkpoint),
            "fp16": fp16,
            "batch_size": batch_size,
            "sort_window": sort_window,
            **{k: v for k, v in upstreams.items() if v is not None},
        }
        return cls(
            encoder,
            checkpoint=checkpoint,
            name=name,
            batch_size=batch_size,
            sort_window=sort_window,
            loader_kwargs=loader_kwargs,
            record=record,
        )

    # ---- mteb's encoder protocol ----
    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs) -> np.ndarray:
        """mteb's DataLoader of audio or image items -> (N, E) float32 unit-norm embeddings, in order."""
        columns = set(_column_names(inputs))
        what = f"task {task_metadata.name} ({hf_subset}/{hf_split}, {getattr(prompt_type, 'value', prompt_type) or 'items'})"
        given = sorted(columns & {"text", "video", "audio", "image"})
        if given not in (["audio"], ["image"]):
            gives = ", ".join(given) if given else f"no audio or image (columns: {', '.join(sorted(columns))})"
            raise MtebModelError(
                f"{self.mteb_model_meta.name}: {what} gives {gives}; this model embeds either "
                "speech (audio) or images, one modality per item (tasks such as SpokenCOCOA2IRetrieval)"
            )
        progress = bool(kwargs.get("show_progress_bar", True))
        modality = "audio" if "audio" in columns else "image"
        if modality == "audio":
            embeddings = self._encode_audio(inputs, what, progress)
        else:
            embeddings = self._encode_images(inputs, what, progress)
        if self.record:
            ids = list(inputs.dataset["id"]) if "id" in columns else list(range(len(embeddings)))
            self.recorded.setdefault((task_metadata.name, modality), []).append((ids, embeddings))
        return embeddings.numpy()

    def _encode_audio(self, inputs, what: str, progress: bool) -> torch.Tensor:
        chunks, waves, names = [], [], []
        count = 0
        for batch in tqdm(inputs, desc=f"{what}: speech", unit="batch", disable=not progress):
            for item in batch["audio"]:
                name = f"{what} audio #{count}"
                count += 1
                samples, rate = audio_item(item, name)
                waves.append(self.encoder.load_audio((samples, rate), name=name))
                names.append(name)
                if len(waves) == self.sort_window:
                    chunks.append(self.encoder.embed_waveforms(waves, names, batch_size=self.batch_size))
                    waves, names = [], []
        if waves:
            chunks.append(self.encoder.embed_waveforms(waves, names, batch_size=self.batch_size))
        return torch.cat(chunks) if chunks else torch.empty(0, self.encoder.embed_dim)

    def _encode_images(self, inputs, what: str, progress: bool) -> torch.Tensor:
        chunks = []
        for batch in tqdm(inputs, desc=f"{what}: images", unit="batch", disable=not progress):
            chunks.append(self.encoder.embed_images(list(batch["image"]), batch_size=self.batch_size))
        return torch.cat(chunks) if chunks else torch.empty(0, self.encoder.embed_dim)


def _column_names(inputs) -> List[str]:
    dataset = getattr(inputs, "dataset", None)
    names = getattr(dataset, "column_names", None)
    if names is None:
        raise MtebModelError(f"expected mteb's DataLoader over a datasets.Dataset, got {type(inputs).__name__}")
    return list(names)


def audio_item(item, name: str) -> Tuple[np.ndarray, int]:
    """One of mteb's audio items -> (samples (T,) or (T, C), sample rate), as SpeechImageEncoder takes them.

    Items: a mapping with "array" and "sampling_rate" (mteb's AudioInputItem, datasets' decoded Audio), or
    a decoder with ``get_all_samples()`` (datasets >= 4 with torchcodec). Multi-channel arrays come
    channels-first (C, T), as mteb's audio collator reads them."""
    if hasattr(item, "get_all_samples"):
        decoded = item.get_all_samples()
        samples, rate = decoded.data, decoded.sample_rate
    else:
        try:
            samples, rate = item["array"], item["sampling_rate"]
        except (KeyError, TypeError, IndexError) as err:
            raise InferenceError(
                f"{name}: expected an audio item with 'array' and 'sampling_rate', got {type(item).__name__}"
            ) from err
    samples = samples.numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.T  # (C, T) -> (T, C)
    return samples.astype(np.float32, copy=False), int(rate)


# ---------------------------------------------------------------- the local tasks


TASK_DIRECTIONS = {
    # category: (name suffix, query modality, corpus modality, description)
    "a2i": (
        "A2I",
        "audio",
        "image",
        "queries are spoken captions, the corpus holds the images; one relevant image per query",
    ),
    "i2a": (
        "I2A",
        "image",
        "audio",
        "queries are images, the corpus holds the spoken captions; every caption of the image is relevant",
    ),
}


def task_name_for(data_dir: str, split: str, category: str) -> str:
    """'Manifest<Directory><Split>A2IRetrieval'-style name from the manifest directory and split; a directory
    called 'manifests' is named after its parent (work_dirs/demo/manifests: 'ManifestDemoTestA2IRetrieval')."""
    path = os.path.abspath(data_dir)
    base = os.path.basename(path)
    if base == "manifests":
        base = os.path.basename(os.path.dirname(path)) or base
    stem = "".join(part.capitalize() for part in base.replace("-", "_").split("_"))
    return f"Manifest{stem}{split.capitalize()}{TASK_DIRECTIONS[category][0]}Retrieval"


def manifest_task_metadata(data_dir: str, split: str, category: str, name: Optional[str] = None) -> "TaskMetadata":
    """mteb TaskMetadata of one direction ('a2i' or 'i2a') of a manifest split; the dataset "path" is the
    manifest directory, its "revision" a hash of the split's manifest files."""
    suffix, query, corpus, description = TASK_DIRECTIONS[category]
    return TaskMetadata(
        name=name or task_name_for(data_dir, split, category),
        description=f"Speech-image retrieval on the manifest split {split!r} of {os.path.abspath(data_dir)}: {description}.",
        dataset={"path": os.path.abspath(data_dir), "revision": manifest_revision(data_dir, split)},
        type="Any2AnyRetrieval",
        category=category,
        modalities=[query, corpus],
        eval_splits=[split],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
        domains=["Spoken"],
        task_subtypes=["Cross-Modal Retrieval"],
        sample_creation="created",
    )


def manifest_revision(data_dir: str, split: str) -> str:
    """sha256 (16 hex) of the split's .tsv and .img files: what the task's relevance judgements come from."""
    digest = hashlib.sha256()
    for ext in ("tsv", "img"):
        with open(os.path.join(data_dir, f"{split}.{ext}"), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


class ManifestRetrievalTask(AbsTaskRetrieval):
    """One direction of a manifest split as an mteb Any2AnyRetrieval task; data is read on ``load_data``.

    mteb keeps a task's metadata on its class (it drops per-instance metadata when it unloads the
    data), so :func:`manifest_task` makes a subclass per manifest directory, split and direction."""

    metadata: "TaskMetadata"
    data_dir: str
    split: str
    category: str

    def load_data(self, num_proc: Optional[int] = None, **kwargs) -> None:
        if self.data_loaded:
            return
        utterances, images, relevant = manifest_split_data(self.data_dir, self.split, self.category)
        queries, corpus = (utterances, images) if self.category == "a2i" else (images, utterances)
        self.dataset = {
            "default": {
                self.split: {"queries": queries, "corpus": corpus, "relevant_docs": relevant, "top_ranked": None}
            }
        }
        self.data_loaded = True


def manifest_task(
    data_dir: str, split: str = "test", category: str = "a2i", name: Optional[str] = None
) -> ManifestRetrievalTask:
    """One local task: ``category`` 'a2i' (speech -> image) or 'i2a' (image -> speech) of a manifest split."""
    if category not in TASK_DIRECTIONS:
        raise MtebModelError(f"category must be one of {sorted(TASK_DIRECTIONS)}, got {category!r}")
    try:
        check_split(data_dir, split)
    except (FileNotFoundError, ValueError) as err:
        raise MtebModelError(f"{data_dir}: no manifest split {split!r} for an mteb task: {err}") from err
    metadata = manifest_task_metadata(data_dir, split, category, name=name)
    task_class = type(
        metadata.name,
        (ManifestRetrievalTask,),
        {"metadata": metadata, "data_dir": os.path.abspath(data_dir), "split": split, "category": category},
    )
    return task_class()


def manifest_tasks(
    data_dir: str, split: str = "test", categories: Sequence[str] = ("a2i", "i2a")
) -> List[ManifestRetrievalTask]:
    """The local tasks of a manifest split: speech -> image ('a2i') and image -> speech ('i2a')."""
    return [manifest_task(data_dir, split, category) for category in categories]


def manifest_split_data(data_dir: str, split: str, category: str):
    """(utterances Dataset {id, audio}, images Dataset {id, image}, relevance judgements) of a split.

    Ids are the paths relative to the manifest's roots. a2i judgements: utterance -> {its image: 1};
    i2a: image -> {each of its captions: 1}."""
    manifest = read_manifest(data_dir, split)
    check_files_exist(manifest)
    ids = manifest.audio_paths
    if len(set(ids)) != len(ids):
        first = next(p for i, p in enumerate(ids) if p in ids[:i])
        raise ManifestError(f"{manifest.tsv_file}: utterance {first!r} is listed twice; utterance ids must be unique")
    utterances = audio_dataset(manifest)
    images = datasets.Dataset.from_dict(
        {"id": manifest.unique_images, "image": [manifest.image_path(p) for p in manifest.unique_images]},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()}),
    )
    if category == "a2i":
        relevant = {utt: {img: 1} for utt, img in zip(ids, manifest.image_paths)}
    else:
        relevant: Dict[str, Dict[str, int]] = {}
        for utt, img in zip(ids, manifest.image_paths):
            relevant.setdefault(img, {})[utt] = 1
    return utterances, images, relevant


def read_wav(manifest, row: int) -> Tuple[np.ndarray, int]:
    """Utterance ``row``'s samples (T,) float32 and rate, checked against the manifest's sample count."""
    import soundfile as sf

    path, where = manifest.audio_path(row), manifest.audio_where(row)
    try:
        wav, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile's errors vary by format
        raise ManifestError(f"{where}: cannot read audio {path} ({type(err).__name__}: {err})") from None
    if wav.shape[0] != manifest.num_samples[row]:
        raise ManifestError(
            f"{where}: {path} has {wav.shape[0]} samples, the manifest says "
            f"{manifest.num_samples[row]} (the file changed since preparation: re-run it)"
        )
    return wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0], int(rate)


def audio_dataset(manifest) -> "datasets.Dataset":
    """{id, audio: {array, sampling_rate}} for every utterance, built column-wise in Arrow (no Python floats)."""
    arrays, rates = [], []
    for row in tqdm(
        range(len(manifest)),
        desc=f"reading {manifest.tsv_file or 'audio'}",
        unit="wav",
        disable=len(manifest) < PROGRESS_FROM,
    ):
        samples, rate = read_wav(manifest, row)
        arrays.append(samples)
        rates.append(rate)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.size for a in arrays])
    values = pa.array(np.concatenate(arrays) if arrays else np.zeros(0, np.float32), type=pa.float32())
    audio = pa.StructArray.from_arrays(
        [pa.LargeListArray.from_arrays(pa.array(offsets), values), pa.array(rates, type=pa.int32())],
        names=["array", "sampling_rate"],
    )
    table = pa.table({"id": pa.array(manifest.audio_paths, type=pa.string()), "audio": audio})
    return datasets.Dataset(table)
