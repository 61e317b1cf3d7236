#!/usr/bin/env python
"""Make a speech upstream with fairseq's own HuBERT recipe on the TRAINING split of a manifest.

The CMD paper freezes a pre-trained HuBERT. For the generated demo corpus none exists, so this
runs the recipe our users ran to get theirs (``examples/hubert`` inside the installed fairseq,
its scripts and configs as shipped; only the overrides in ``--config`` shrink them):

  1. hold out part of the training split as the recipe's validation set (valid/test are never read);
  2. ``simple_kmeans``: MFCC features -> ``learn_kmeans.py`` -> ``dump_km_label.py`` (iteration 1);
  3. pre-training: ``fairseq-hydra-train --config-dir .../config/pretrain --config-name
     hubert_base_librispeech`` on the k-means labels;
  4. optionally CTC fine-tuning on the written captions (letters): ``.../config/finetune/base_10h``.

Output (``--out-dir``): ``hubert_pretrained.pt`` and, with fine-tuning, ``hubert_finetuned.pt``
(fairseq checkpoints in the released layout: load them with ``model.hubert_path``), and
``upstream.json`` naming the one to use. Each stage is skipped when its output exists; an
interrupted training resumes from its ``checkpoint_last.pt`` (fairseq's own resume), and the
final files are copied into place only when complete.

fairseq's ``dump_mfcc_feature.py`` cannot be called as it is with torchaudio >= 2.9: its reader
(``fairseq.data.audio.audio_utils.get_features_or_waveform``) imports ``torchaudio.sox_effects``,
which those versions removed. Its ``MfccFeatureReader`` and ``feature_utils.dump_feature`` are
called instead, with only the waveform read replaced by soundfile (same samples).

    python examples/train_hubert_upstream.py --data work_dirs/demo/manifests \\
        --out-dir work_dirs/demo/upstream --config examples/tiny/hubert_upstream.yaml
"""

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np
import soundfile as sf
import yaml

try:
    import cmd_plugin
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import cmd_plugin

from cmd_plugin.files import atomic_copy, atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from cmd_plugin.progress import JobFailed, LoggedJob, run_job  # noqa: E402
from cmd_plugin.quiet import import_fairseq  # noqa: E402

import_fairseq()  # fairseq's first import: without its known-harmless import-time notes
import fairseq  # noqa: E402
from fairseq.dataclass.configs import FairseqConfig  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fairseq imports the plugin (common.user_dir) so that its trainer can read HuBERT checkpoints under
# torch >= 2.6 (resume, and hubert_ctc loading w2v_path): see cmd_plugin.checkpoints
PLUGIN_DIR = os.path.dirname(os.path.abspath(cmd_plugin.__file__))
DEFAULT_CONFIG = os.path.join(REPO, "examples", "tiny", "hubert_upstream.yaml")
MFCC_WINDOW, MFCC_HOP = 400, 160  # kaldi MFCC at 16 kHz: 25 ms windows, 10 ms hop (snip_edges)


class RecipeError(RuntimeError):
    """Bad input to the recipe: the message names the file and what was expected."""


def fairseq_hubert_dir() -> str:
    """``examples/hubert`` of the installed fairseq package (fairseq-fixed and source installs ship it)."""
    path = os.path.join(os.path.dirname(fairseq.__file__), "examples", "hubert")
    if not os.path.isfile(os.path.join(path, "simple_kmeans", "learn_kmeans.py")):
        raise RecipeError(
            f"fairseq's HuBERT recipe was not found at {path}: this fairseq installation does not "
            "ship fairseq/examples/hubert (install fairseq from source or fairseq-fixed)"
        )
    return path


def words_to_letters(text: str) -> str:
    """fairseq's letter targets: ``a big cat .`` -> ``A | B I G | C A T |`` (words end with ``|``)."""
    words = [re.sub(r"[^A-Z']", "", w.upper()) for w in text.split()]
    return " ".join(" ".join(w) + " |" for w in words if w)


def mfcc_frames(num_samples: int) -> int:
    """Frames kaldi's MFCC makes of ``num_samples`` (snip_edges=True)."""
    return 0 if num_samples < MFCC_WINDOW else 1 + (num_samples - MFCC_WINDOW) // MFCC_HOP


def read_fairseq_tsv(path: str):
    """(root, [(relative path, num samples)]) of a fairseq audio manifest, errors with file:line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        raise RecipeError(f"{path}: empty; expected the audio root on line 1, then '<wav>\\t<samples>' lines")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].isdigit():
            raise RecipeError(f"{path}:{n}: expected '<wav path>\\t<number of samples>', got {line!r}")
        rows.append((parts[0], int(parts[1])))
    return lines[0], rows


def write_lines(path: str, lines) -> None:
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def hold_out(data: str, out: str, fraction: float, seed: int) -> dict:
    """Split ``data/train.{tsv,wrd}`` into the recipe's ``out/train`` and ``out/valid`` (+ ``.ltr``,
    ``dict.ltr.txt``). Held out by image, so no caption of a held-out image is trained on."""
    tsv = os.path.join(data, "train.tsv")
    if not os.path.isfile(tsv):
        raise RecipeError(f"{tsv} not found: --data must be a manifest directory with the training split")
    root, rows = read_fairseq_tsv(tsv)
    extra = {}
    for ext in ("wrd", "img"):
        path = os.path.join(data, f"train.{ext}")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
            if ext == "img":
                lines = lines[1:]  # line 1 is the image root
            if len(lines) != len(rows):
                raise RecipeError(f"{path}: {len(lines)} lines, expected one per utterance of {tsv} ({len(rows)})")
            extra[ext] = lines
    groups = extra.get("img") or [r[0] for r in rows]
    keys = sorted(set(groups))
    random.Random(seed).shuffle(keys)
    held = set(keys[: max(1, int(round(fraction * len(keys))))]) if len(keys) > 1 else set()
    counts = {}
    for split, keep in (("train", lambda g: g not in held), ("valid", lambda g: g in held)):
        idx = [i for i, g in enumerate(groups) if keep(g)]
        write_lines(os.path.join(out, f"{split}.tsv"), [root] + [f"{rows[i][0]}\t{rows[i][1]}" for i in idx])
        if "wrd" in extra:
            write_lines(os.path.join(out, f"{split}.wrd"), [extra["wrd"][i] for i in idx])
            write_lines(os.path.join(out, f"{split}.ltr"), [words_to_letters(extra["wrd"][i]) for i in idx])
        counts[split] = len(idx)
    if "wrd" in extra:
        letters = sorted({c for line in extra["wrd"] for c in words_to_letters(line).split()})
        write_lines(os.path.join(out, "dict.ltr.txt"), [f"{c} 1" for c in letters])
    return counts


def check_kmeans_size(tsv: str, n_clusters: int) -> int:
    """Refuse a corpus with fewer MFCC frames than clusters (k-means cannot place them)."""
    _, rows = read_fairseq_tsv(tsv)
    frames = sum(mfcc_frames(n) for _, n in rows)
    if frames < n_clusters:
        raise RecipeError(
            f"{tsv}: {len(rows)} utterances give {frames} MFCC frames, fewer than the "
            f"{n_clusters} k-means clusters asked for (kmeans.n_clusters); use more audio or fewer clusters"
        )
    return frames


def dump_mfcc(hubert_dir: str, tsv_dir: str, split: str, feat_dir: str) -> None:
    """fairseq's MFCC dump (see the module docstring for why its functions and not its script)."""
    # the recipe's own modules, importable only from its scripts' directory
    sys.path.insert(0, os.path.join(hubert_dir, "simple_kmeans"))
    try:
        from dump_mfcc_feature import MfccFeatureReader
        from feature_utils import dump_feature, get_path_iterator
    finally:
        sys.path.pop(0)

    class SoundfileMfccReader(MfccFeatureReader):
        def read_audio(self, path, ref_len=None):
            wav, rate = sf.read(path, dtype="float32")
            if rate != self.sample_rate or wav.ndim != 1:
                raise RecipeError(f"{path}: {rate} Hz with shape {wav.shape}, expected {self.sample_rate} Hz mono")
            if ref_len is not None and ref_len != len(wav):
                raise RecipeError(f"{path} has {len(wav)} samples, the manifest says {ref_len} (re-run preparation)")
            return np.asarray(wav)

    generator, num = get_path_iterator(os.path.join(tsv_dir, f"{split}.tsv"), 1, 0)
    dump_feature(SoundfileMfccReader(16000), generator, num, split, 1, 0, feat_dir)


def run(cmd, log_path, env=None):
    print("+ " + " ".join(cmd), flush=True)
    start = time.time()
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        with open(log_path) as log:
            sys.stderr.write(log.read()[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd[:3])} ...; see {log_path}")
    return time.time() - start


def run_fairseq(label, cmd, log_path, overrides, metric):
    """A fairseq training of the recipe, with a progress line every 30 s (updates done of the config's
    max_update, the latest valid ``metric``, time left) naming its log."""
    total = overrides.get("optimization.max_update")
    try:
        return run_job(LoggedJob(label, cmd, log_path, total_updates=total, metric=metric, fairseq=True, append=True))
    except JobFailed as e:
        raise SystemExit(str(e))


def override_args(overrides: dict, base_yaml: str):
    """YAML mapping -> hydra command-line overrides (lists and null as hydra spells them). A key
    that the recipe's YAML ``base_yaml`` does not list gets hydra's ``+`` (add) prefix when its group
    is free-form in fairseq's config (task, model, criterion, ...: typed ``Any``); the typed groups
    (common, dataset, checkpoint, ...) already hold every key. (hydra 1.0 has no ``++``.)"""
    free_form = {name for name, f in FairseqConfig.__dataclass_fields__.items() if f.type is Any}
    with open(base_yaml, encoding="utf-8") as f:
        base = yaml.safe_load(f) or {}

    def listed(key):
        if key.split(".")[0] not in free_form:
            return True
        node = base
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    args = []
    for key, value in overrides.items():
        if value is None:
            text = "null"
        elif isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, (list, tuple)):
            text = "[" + ",".join(str(v) for v in value) + "]"
        else:
            text = str(value)
            if any(c in text for c in " ,()[]'\"") and not text.startswith("'"):
                text = "'" + text + "'"
        args.append(f"{'' if listed(key) else '+'}{key}={text}")
    return args


def copy_final(src: str, dst: str) -> None:
    if not os.path.isfile(src):
        raise SystemExit(f"training ended without {src}")
    atomic_copy(src, dst)


def write_json(path: str, record: dict) -> None:
    atomic_write_json(path, record, indent=1)


def stage_done(out: str, name: str) -> bool:
    return os.path.isfile(os.path.join(out, f".{name}.done"))


def mark_done(out: str, name: str, record: dict) -> None:
    write_json(os.path.join(out, f".{name}.done"), record)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="manifest directory (train.tsv, train.wrd, train.img)")
    parser.add_argument("--out-dir", required=True, help="where the recipe's files and the upstream are written")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="overrides of fairseq's recipe (YAML)")
    parser.add_argument("--no-finetune", action="store_true", help="skip CTC fine-tuning whatever the config says")
    args = parser.parse_args(argv)

    with open(args.config, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    out = os.path.abspath(args.out_dir)
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    hubert_dir = fairseq_hubert_dir()
    timings = {}
    py = sys.executable
    train_bin = shutil.which("fairseq-hydra-train") or os.path.join(os.path.dirname(py), "fairseq-hydra-train")
    km = cfg["kmeans"]

    try:
        if not stage_done(out, "holdout"):
            t = time.time()
            counts = hold_out(os.path.abspath(args.data), data_dir, cfg["holdout_fraction"], cfg["seed"])
            mark_done(out, "holdout", counts)
            timings["hold out"] = time.time() - t
        frames = check_kmeans_size(os.path.join(data_dir, "train.tsv"), int(km["n_clusters"]))
    except RecipeError as e:
        raise SystemExit(f"train_hubert_upstream: error: {e}")

    feat_dir = os.path.join(out, "mfcc")
    if not stage_done(out, "mfcc"):
        t = time.time()
        for split in ("train", "valid"):
            dump_mfcc(hubert_dir, data_dir, split, feat_dir)
        mark_done(out, "mfcc", {"frames": frames})
        timings["MFCC"] = time.time() - t

    scripts = os.path.join(hubert_dir, "simple_kmeans")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [scripts, os.environ.get("PYTHONPATH")])))
    km_path = os.path.join(out, f"mfcc_km{km['n_clusters']}.bin")
    log = os.path.join(out, "kmeans.log")
    if not stage_done(out, "kmeans"):
        t = time.time()
        atomic_write(
            km_path,
            lambda tmp_km: run(
                [
                    py,
                    os.path.join(scripts, "learn_kmeans.py"),
                    feat_dir,
                    "train",
                    "1",
                    tmp_km,
                    str(km["n_clusters"]),
                    "--percent",
                    str(km["percent"]),
                    "--batch_size",
                    str(km["batch_size"]),
                    "--max_iter",
                    str(km["max_iter"]),
                    "--n_init",
                    str(km["n_init"]),
                    "--seed",
                    str(cfg["seed"]),
                ],
                log,
                env=env,
            ),
        )
        mark_done(out, "kmeans", {"km": km_path})
        timings["k-means"] = time.time() - t
    if not stage_done(out, "labels"):
        t = time.time()
        label_tmp = os.path.join(out, "labels.partial")
        for split in ("train", "valid"):
            run(
                [py, os.path.join(scripts, "dump_km_label.py"), feat_dir, split, km_path, "1", "0", label_tmp],
                log,
                env=env,
            )
            os.replace(os.path.join(label_tmp, f"{split}_0_1.km"), os.path.join(data_dir, f"{split}.km"))
        shutil.rmtree(label_tmp, ignore_errors=True)
        write_lines(os.path.join(data_dir, "dict.km.txt"), [f"{i} 1" for i in range(int(km["n_clusters"]))])
        mark_done(out, "labels", {})
        timings["labels"] = time.time() - t

    pretrained = os.path.join(out, "hubert_pretrained.pt")
    if not os.path.isfile(pretrained):
        save_dir = os.path.join(out, "pretrain")
        pre = cfg["pretrain"]
        cmd = [
            train_bin,
            "--config-dir",
            os.path.join(hubert_dir, "config", "pretrain"),
            "--config-name",
            pre["config_name"],
            f"task.data={data_dir}",
            f"task.label_dir={data_dir}",
            "task.labels=[km]",
            f"checkpoint.save_dir={save_dir}",
            f"hydra.run.dir={save_dir}",
            f"common.seed={cfg['seed']}",
            f"common.user_dir={PLUGIN_DIR}",
            *override_args(
                pre["overrides"], os.path.join(hubert_dir, "config", "pretrain", pre["config_name"] + ".yaml")
            ),
        ]
        timings["pre-training"] = run_fairseq(
            "HuBERT pre-training", cmd, os.path.join(out, "pretrain.log"), pre["overrides"], metric="loss"
        )
        copy_final(os.path.join(save_dir, "checkpoint_last.pt"), pretrained)

    upstream = pretrained
    ft = cfg.get("finetune") or {}
    if ft.get("enabled") and not args.no_finetune:
        finetuned = os.path.join(out, "hubert_finetuned.pt")
        if not os.path.isfile(finetuned):
            save_dir = os.path.join(out, "finetune")
            cmd = [
                train_bin,
                "--config-dir",
                os.path.join(hubert_dir, "config", "finetune"),
                "--config-name",
                ft["config_name"],
                f"task.data={data_dir}",
                f"task.label_dir={data_dir}",
                f"model.w2v_path={pretrained}",
                f"checkpoint.save_dir={save_dir}",
                f"hydra.run.dir={save_dir}",
                f"common.seed={cfg['seed']}",
                f"common.user_dir={PLUGIN_DIR}",
                *override_args(
                    ft["overrides"], os.path.join(hubert_dir, "config", "finetune", ft["config_name"] + ".yaml")
                ),
            ]
            timings["fine-tuning"] = run_fairseq(
                "HuBERT CTC fine-tuning", cmd, os.path.join(out, "finetune.log"), ft["overrides"], metric="uer"
            )
            copy_final(os.path.join(save_dir, "checkpoint_last.pt"), finetuned)
        upstream = finetuned

    record = {
        "upstream": upstream,
        "pretrained": pretrained,
        "config": os.path.abspath(args.config),
        "fairseq_recipe": hubert_dir,
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    write_json(os.path.join(out, "upstream.json"), record)
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"speech upstream: {upstream}")
    return record


if __name__ == "__main__":
    main()
