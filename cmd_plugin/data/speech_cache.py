"""The frozen speech upstream's layer states, computed once per utterance and read back in training.

A frozen HuBERT gives every utterance the same states at every epoch, yet training recomputes them at
every step. With ``task.speech_feature_cache=DIR`` (made by ``examples/cache_speech_features.py``) the
dataset reads each utterance's states (num_states x frames x D) from a memory-mapped file instead of its
waveform, and the model skips the upstream (:meth:`CmdSpeechImageModel.encode_speech_sequence`).
The learnable layer weights, the speech layer and everything after it train as before.

Layout of DIR, per split: ``SPLIT.states.npy`` (total frames, num_states, D) in float16,
``SPLIT.offsets.npy`` (utterances + 1,) int64 (utterance i is rows offsets[i]:offsets[i+1]) and
``SPLIT.json``: the upstream's identity (fingerprint of its weights, which states, waveform
normalisation, sample rate), the manifest's wav paths and sample counts in order, and the shapes.
The JSON is written last, so a split without it was never finished; each file is written under a
temporary name and renamed.

Size: frames x num_states x D x 2 bytes, i.e. 50 frames/s x 25 x 1024 x 2 = 2.56 MB per second of
speech for HuBERT-Large (Flickr8k's 40k captions: some hundreds of GB), 64 KB per second for the
demo's 4-layer, 128-wide upstream: a cache is for small upstreams, or an experiment that trains
many runs on one corpus. States are stored in float16 (HuBERT-Large's are far inside its range; the
rounding, ~1e-3 relative, is what fp16 training already applies to them).

Utterances are encoded one batch of similar lengths at a time with exact per-utterance frame counts
(:meth:`HubertUpstream.frame_padding_mask`), so a cached utterance's states are those the model
computes for it alone.
"""

import json
import os
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from ..encoder_identity import tensors_sha256
from ..files import atomic_write_json
from .manifest import SpeechImageManifest

FORMAT = "cmd_plugin.speech_state_cache.v1"

__all__ = [
    "SpeechCacheError",
    "SpeechStateCache",
    "upstream_identity",
    "write_speech_cache",
    "cache_paths",
]


class SpeechCacheError(ValueError):
    """A speech state cache that is missing, unfinished or made for another upstream or manifest."""


def upstream_identity(hubert) -> Dict:
    """What cached states depend on: the weights of a :class:`HubertUpstream` (fingerprint), which
    states it returns, its waveform normalisation and sample rate, and their shape."""
    return {
        "hubert_weights_sha256": tensors_sha256(hubert.model),
        "layer_states": hubert.layer_states,
        "normalize": bool(hubert.normalize),
        "sample_rate": int(hubert.sample_rate),
        "num_states": int(hubert.num_states),
        "embed_dim": int(hubert.embed_dim),
    }


def cache_paths(cache_dir: str, split: str) -> Dict[str, str]:
    base = os.path.join(cache_dir, split)
    return {"states": base + ".states.npy", "offsets": base + ".offsets.npy", "meta": base + ".json"}


def _utterances(manifest: SpeechImageManifest) -> List[List]:
    return [[manifest.audio_paths[i], int(manifest.num_samples[i])] for i in range(len(manifest))]


@torch.no_grad()
def write_speech_cache(
    hubert,
    manifest: SpeechImageManifest,
    split: str,
    cache_dir: str,
    read_wave: Callable[[int], torch.Tensor],
    max_batch_samples: int = 16000 * 200,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Dict:
    """Encode every utterance of ``manifest`` with the frozen ``hubert`` (a :class:`HubertUpstream`)
    and write ``split``'s cache under ``cache_dir``; returns its meta record. ``read_wave(row)`` gives
    the row's float32 waveform (the dataset's reader, with its errors naming the manifest line).
    Batches hold utterances of similar length, at most ``max_batch_samples`` padded samples each."""
    os.makedirs(cache_dir, exist_ok=True)
    paths = cache_paths(cache_dir, split)
    if os.path.exists(paths["meta"]):
        os.remove(paths["meta"])  # the split is unfinished from here until its meta is renamed in
    hubert.eval()
    device = next(hubert.parameters()).device
    sizes = np.asarray(manifest.num_samples, dtype=np.int64)
    frames = hubert.frame_lengths(torch.as_tensor(sizes)).numpy()
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(frames)
    shape = (int(offsets[-1]), hubert.num_states, hubert.embed_dim)
    tmp_states = paths["states"] + ".partial.npy"
    states_out = np.lib.format.open_memmap(tmp_states, mode="w+", dtype=np.float16, shape=shape)
    order = np.argsort(sizes, kind="stable")
    done, start = 0, 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and sizes[order[stop]] * (stop + 1 - start) <= max_batch_samples:
            stop += 1
        rows = order[start:stop]
        waves = [read_wave(int(r)) for r in rows]
        longest = max(w.numel() for w in waves)
        source = torch.zeros(len(waves), longest)
        padding = torch.ones(len(waves), longest, dtype=torch.bool)
        for i, w in enumerate(waves):
            source[i, : w.numel()] = w
            padding[i, : w.numel()] = False
        states, _ = hubert(source.to(device), padding.to(device))  # (S, B, T', D)
        states = states.float().cpu()
        for i, r in enumerate(rows):
            n = int(frames[r])
            states_out[offsets[r] : offsets[r] + n] = states[:, i, :n].transpose(0, 1).numpy().astype(np.float16)
        done += len(rows)
        start = stop
        if progress is not None:
            progress(done, len(order))
    states_out.flush()
    del states_out
    tmp_offsets = paths["offsets"] + ".partial.npy"
    np.save(tmp_offsets, offsets)
    os.replace(tmp_states, paths["states"])
    os.replace(tmp_offsets, paths["offsets"])
    meta = {
        "format": FORMAT,
        "split": split,
        "identity": upstream_identity(hubert),
        "shape": list(shape),
        "dtype": "float16",
        "utterances": _utterances(manifest),
    }
    atomic_write_json(paths["meta"], meta)
    return meta


class SpeechStateCache:
    """One split of a cache directory, read lazily (memory-mapped; picklable for data-loader workers).

    ``cache[row]`` -> (frames, num_states, D) float16 tensor of the manifest's row ``row``."""

    def __init__(self, cache_dir: str, split: str):
        self.cache_dir = os.path.abspath(cache_dir)
        self.split = split
        self.paths = cache_paths(self.cache_dir, split)
        if not os.path.isfile(self.paths["meta"]):
            what = "never finished" if os.path.exists(self.paths["states"] + ".partial.npy") else "not found"
            raise SpeechCacheError(
                f"{self.paths['meta']}: {what}; task.speech_feature_cache={cache_dir} has no finished "
                f"cache of split {split!r} (make it with examples/cache_speech_features.py --splits {split})"
            )
        try:
            with open(self.paths["meta"]) as f:
                self.meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SpeechCacheError(f"{self.paths['meta']}: cannot read it ({e})") from None
        if self.meta.get("format") != FORMAT:
            raise SpeechCacheError(f"{self.paths['meta']}: format {self.meta.get('format')!r}, expected {FORMAT}")
        for key in ("states", "offsets"):
            if not os.path.isfile(self.paths[key]):
                raise SpeechCacheError(f"{self.paths[key]}: not found (named by {self.paths['meta']})")
        self._states = self._offsets = None

    def __len__(self) -> int:
        return len(self.meta["utterances"])

    @property
    def identity(self) -> Dict:
        return self.meta["identity"]

    def __getstate__(self):
        return {**self.__dict__, "_states": None, "_offsets": None}  # workers map the files anew

    def _arrays(self):
        if self._states is None:
            self._states = np.load(self.paths["states"], mmap_mode="r")
            self._offsets = np.load(self.paths["offsets"])
            if tuple(self._states.shape) != tuple(self.meta["shape"]) or len(self._offsets) != len(self) + 1:
                raise SpeechCacheError(
                    f"{self.paths['states']}: shape {self._states.shape} and {len(self._offsets)} offsets do not "
                    f"match {self.paths['meta']} ({self.meta['shape']}, {len(self)} utterances)"
                )
        return self._states, self._offsets

    def __getitem__(self, row: int) -> torch.Tensor:
        states, offsets = self._arrays()
        return torch.from_numpy(np.array(states[offsets[row] : offsets[row + 1]]))

    def check_manifest(self, manifest: SpeechImageManifest) -> None:
        """The manifest must list the cached utterances in the same order with the same lengths."""
        listed = _utterances(manifest)
        cached = self.meta["utterances"]
        if len(listed) != len(cached):
            raise SpeechCacheError(
                f"{self.paths['meta']}: {len(cached)} utterances cached, {manifest.tsv_file or 'the manifest'} lists "
                f"{len(listed)}: rebuild the cache (examples/cache_speech_features.py)"
            )
        for row, (a, b) in enumerate(zip(listed, cached)):
            if a != list(b):
                raise SpeechCacheError(
                    f"{manifest.audio_where(row)}: {a[0]} ({a[1]} samples) differs from the cache's row {row} "
                    f"({b[0]}, {b[1]} samples) in {self.paths['meta']}: rebuild the cache"
                )

    def check_identity(self, identity: Dict) -> None:
        """Refuse a cache made with another upstream (weights, states, normalisation, rate, shape)."""
        differ = [k for k in sorted(set(identity) | set(self.identity)) if identity.get(k) != self.identity.get(k)]
        if differ:
            detail = "; ".join(f"{k}: cache {self.identity.get(k)!r}, model {identity.get(k)!r}" for k in differ)
            raise SpeechCacheError(
                f"{self.paths['meta']}: made with another speech upstream ({detail}); rebuild it with the model's "
                "model.hubert_path, or set task.speech_feature_cache='' to encode waveforms"
            )
