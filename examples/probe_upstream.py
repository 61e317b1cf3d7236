#!/usr/bin/env python
"""Does a speech upstream carry the words? A linear probe per layer.

For each upstream (a fairseq HuBERT checkpoint; ``random`` = the first checkpoint's architecture
with fresh random weights), every layer state the plugin sees (SUPERB states: transformer input +
each layer) is mean-pooled over an utterance's frames; for each colour and shape word of the
captions a logistic regression predicts whether the word occurs in the utterance's caption. It is
trained on training-split utterances and scored on the valid split; the table gives the balanced
accuracy (chance 50 %) averaged over the words, per layer and upstream.

    python examples/probe_upstream.py --data work_dirs/demo/manifests \\
        --upstream pretrained=work_dirs/demo/upstream/hubert_pretrained.pt \\
        --upstream finetuned=work_dirs/demo/upstream/hubert_finetuned.pt --random \\
        [--plugin-checkpoint work_dirs/demo/checkpoints_cmd/checkpoint_best.pt] [--output-json probe.json]

``--plugin-checkpoint`` also prints the layer weights (softmax of ``layer_weights``) that a trained
plugin model learnt on top of its upstream.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

try:
    import cmd_plugin  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmd_plugin.checkpoints import load_checkpoint_state  # noqa: E402
from cmd_plugin.data.manifest import ManifestError, read_manifest  # noqa: E402
from cmd_plugin.files import atomic_write_json  # noqa: E402
from cmd_plugin.inference import read_audio, to_mono_16k  # noqa: E402
from cmd_plugin.models.hubert_upstream import HubertUpstream, load_hubert_checkpoint  # noqa: E402

# the corpus generator's vocabulary (examples/generate_scene_corpus.py), plural -> singular
COLOUR_WORDS = ["red", "green", "blue", "yellow", "orange", "purple", "violet", "pink", "black", "white", "brown"]
SHAPE_WORDS = {
    "circle": "circle",
    "circles": "circle",
    "disk": "disk",
    "disks": "disk",
    "square": "square",
    "squares": "square",
    "box": "box",
    "boxes": "box",
    "triangle": "triangle",
    "triangles": "triangle",
    "star": "star",
    "stars": "star",
    "diamond": "diamond",
    "diamonds": "diamond",
    "cross": "cross",
    "crosses": "cross",
    "hexagon": "hexagon",
    "hexagons": "hexagon",
}


def caption_words(text):
    """The words of a caption, plurals of shape nouns made singular."""
    return {SHAPE_WORDS.get(w, w) for w in text.lower().replace(".", " ").replace(",", " ").split()}


def word_matrix(texts, words):
    """(N, W) 0/1: whether each caption contains each word."""
    return np.array([[w in caption_words(t) for w in words] for t in texts], dtype=np.int64).reshape(
        len(texts), len(words)
    )


def probe_words(texts, min_count=10):
    """The colour and shape words that occur in at least ``min_count`` of ``texts``."""
    counts = word_matrix(texts, COLOUR_WORDS + sorted(set(SHAPE_WORDS.values()))).sum(0)
    return [w for w, c in zip(COLOUR_WORDS + sorted(set(SHAPE_WORDS.values())), counts) if c >= min_count]


def balanced_accuracy(y_true, y_pred):
    """Mean of the recall of each class (chance 0.5 for two classes); one class present: its recall."""
    recalls = [np.mean(y_pred[y_true == c] == c) for c in (0, 1) if np.any(y_true == c)]
    return float(np.mean(recalls))


def pooled_states(upstream, manifest, indices, batch_size=16):
    """(num_states, N, D) mean over each utterance's own frames of every SUPERB state."""
    out = []
    for start in range(0, len(indices), batch_size):
        waves = []
        for u in indices[start : start + batch_size]:
            path = manifest.audio_path(u)
            wav, rate = read_audio(path)
            waves.append(to_mono_16k(wav, rate, name=path))
        lengths = torch.tensor([len(w) for w in waves])
        source = torch.zeros(len(waves), int(lengths.max()))
        for i, w in enumerate(waves):
            source[i, : len(w)] = w
        padding = torch.arange(source.size(1))[None, :] >= lengths[:, None]
        with torch.inference_mode():
            states, frame_pad = upstream(source, padding)
        keep = (~frame_pad).float() if frame_pad is not None else torch.ones(states.shape[1:3])
        pooled = (states * keep[None, :, :, None]).sum(2) / keep.sum(1).clamp(min=1)[None, :, None]
        out.append(pooled)
    return torch.cat(out, dim=1).numpy()


def probe_layers(train_x, train_y, valid_x, valid_y):
    """Per layer: mean balanced accuracy over words of a logistic regression (standardised features)."""
    # scikit-learn is an optional package (the "recipe" extra): imported only to probe
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scores = []
    for layer in range(train_x.shape[0]):
        scaler = StandardScaler().fit(train_x[layer])
        tx, vx = scaler.transform(train_x[layer]), scaler.transform(valid_x[layer])
        per_word = []
        for w in range(train_y.shape[1]):
            if train_y[:, w].min() == train_y[:, w].max():
                continue
            clf = LogisticRegression(C=0.1, max_iter=300).fit(tx, train_y[:, w])
            per_word.append(balanced_accuracy(valid_y[:, w], clf.predict(vx)))
        scores.append(100.0 * float(np.mean(per_word)))
    return scores


def random_like(checkpoint, seed=0):
    """A HubertUpstream with ``checkpoint``'s architecture and fresh random weights."""
    upstream = HubertUpstream(checkpoint, freeze=True)
    _, cfg, task = load_hubert_checkpoint(checkpoint)
    torch.manual_seed(seed)
    model = task.build_model(cfg.model)
    model.remove_pretraining_modules()
    upstream.model = model.eval().requires_grad_(False)
    return upstream


def learned_layer_weights(plugin_checkpoint):
    state = load_checkpoint_state(plugin_checkpoint, what="cmd_plugin checkpoint")["model"]
    key = next((k for k in state if k.endswith("layer_weights")), None)
    if key is None:
        raise SystemExit(f"{plugin_checkpoint}: no layer_weights in the model state")
    return torch.softmax(state[key].float(), dim=0).tolist()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="manifest directory (train/valid .tsv and .wrd)")
    parser.add_argument(
        "--upstream", action="append", default=[], metavar="NAME=PATH", help="a HuBERT checkpoint to probe"
    )
    parser.add_argument(
        "--random", action="store_true", help="also probe the first upstream's architecture with random weights"
    )
    parser.add_argument(
        "--train-utterances", type=int, default=1500, help="training-split utterances the probes learn from"
    )
    parser.add_argument(
        "--min-count", type=int, default=10, help="probe the words found in at least this many training captions"
    )
    parser.add_argument("--plugin-checkpoint", default="", help="print the layer weights this trained model learnt")
    parser.add_argument("--output-json", default="")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.upstream:
        parser.error("give at least one --upstream NAME=PATH")
    upstreams = []
    for item in args.upstream:
        name, sep, path = item.partition("=")
        if not sep or not os.path.isfile(path):
            parser.error(f"--upstream {item!r}: expected NAME=PATH of an existing checkpoint")
        upstreams.append((name, path))
    try:
        train, valid = read_manifest(args.data, "train"), read_manifest(args.data, "valid")
    except ManifestError as e:
        raise SystemExit(f"probe_upstream: error: {e}")
    for split in (train, valid):
        if not split.texts:
            raise SystemExit(f"probe_upstream: error: {args.data}: the {split.split}.wrd captions are needed")
    rng = np.random.default_rng(args.seed)
    train_idx = sorted(
        rng.choice(len(train.texts), min(args.train_utterances, len(train.texts)), replace=False).tolist()
    )
    valid_idx = list(range(len(valid.texts)))
    words = probe_words([train.texts[i] for i in train_idx], min_count=args.min_count)
    if not words:
        raise SystemExit(
            f"probe_upstream: error: {args.data}/train.wrd: no colour or shape word occurs in "
            f"{args.min_count} or more of the {len(train_idx)} captions drawn"
        )
    train_y = word_matrix([train.texts[i] for i in train_idx], words)
    valid_y = word_matrix([valid.texts[i] for i in valid_idx], words)

    entries = ([("random", None)] if args.random else []) + upstreams
    table = {}
    for name, path in entries:
        t = time.time()
        upstream = random_like(upstreams[0][1], seed=args.seed) if path is None else HubertUpstream(path, freeze=True)
        tx = pooled_states(upstream, train, train_idx)
        vx = pooled_states(upstream, valid, valid_idx)
        table[name] = probe_layers(tx, train_y, vx, valid_y)
        print(f"  probed {name} in {time.time() - t:.0f}s", file=sys.stderr)

    num_states = max(len(v) for v in table.values())
    print(
        f"Linear probe: presence of {len(words)} colour/shape words ({', '.join(words)}), mean-pooled states, "
        f"{len(train_idx)} train -> {len(valid_idx)} valid utterances; mean balanced accuracy % (chance 50)"
    )
    print("state  " + "  ".join(f"{name:>10}" for name in table))
    for layer in range(num_states):
        label = "input" if layer == 0 else f"L{layer}"
        print(f"{label:<6} " + "  ".join(f"{v[layer]:10.1f}" if layer < len(v) else " " * 10 for v in table.values()))
    record = {
        "words": words,
        "train_utterances": len(train_idx),
        "valid_utterances": len(valid_idx),
        "balanced_accuracy": table,
        "upstreams": dict(upstreams),
    }
    if args.plugin_checkpoint:
        weights = learned_layer_weights(args.plugin_checkpoint)
        record["plugin_layer_weights"] = weights
        print("layer weights learnt by the plugin (softmax): " + " ".join(f"{w:.3f}" for w in weights))
    if args.output_json:
        atomic_write_json(args.output_json, record, indent=1)
    return record


if __name__ == "__main__":
    main()
