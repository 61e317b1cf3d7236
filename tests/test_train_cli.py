"""The user's literal commands: every shipped YAML composes through fairseq-hydra-train, and
the tiny config trains, validates on the whole split, checkpoints and resumes.

Run in both tested environments (tests/conftest.py): the commands are
the ones of the interpreter running the tests (its venv's bin/), never another one on PATH."""

import copy
import functools
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

from cmd_plugin import compat
from cmd_plugin.data.manifest import SpeechImageManifest, write_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _console_script(name):
    """The entry point installed beside this interpreter (sys.executable's bin/), else PATH's."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.isfile(beside) else shutil.which(name)


TRAIN = _console_script("fairseq-hydra-train")


def run_train(args, cwd, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([TRAIN] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def _composed(corpus, overrides):
    # hydra < 1.1 has no --resolve: its output is resolved here, ${hydra:job.name} (the method, see
    # cmd_plugin/config/method/) from the hydra section it printed and the rest with the plugin's resolver
    resolve = ["--resolve"] if compat.hydra_version() >= (1, 1) else []
    proc = run_train(
        ["--config-dir", os.path.join("examples", corpus), "task._name=speech_image", *overrides, "--cfg", "all"]
        + resolve,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import hydra_plugins.cmd_plugin_searchpath.searchpath  # noqa: F401  (registers ${cmd_plugin_dir:})

    job_name = yaml.safe_load(proc.stdout)["hydra"]["job"]["name"]
    cfg = yaml.safe_load(proc.stdout.replace("${hydra:job.name}", job_name))
    del cfg["hydra"]
    return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)


def composed_config(corpus, *overrides):
    """The job config that the user's literal command ``fairseq-hydra-train --config-dir examples/CORPUS
    task._name=speech_image OVERRIDES`` composes (its ``--cfg`` output, resolved), as a dict; each
    command runs once per test session."""
    return copy.deepcopy(_composed(corpus, tuple(overrides)))


@pytest.mark.parametrize("corpus", ["flickr8k", "spokencoco", "tiny"])
def test_shipped_config_composes_with_the_plugin(corpus):
    """The literal command of each corpus (CMD, the default method; every method: test_method_configs.py)."""
    from cmd_plugin.criterions.cmd_contrastive import CmdContrastiveConfig
    from cmd_plugin.models.cmd_speech_image import CmdSpeechImageConfig
    from cmd_plugin.tasks.speech_image import SpeechImageConfig

    # the user's literal command, from the repository root, printing the composed job config
    cfg = composed_config(corpus)
    assert cfg["task"]["_name"] == "speech_image"
    assert cfg["model"]["_name"] == "cmd_speech_image"
    assert cfg["criterion"]["_name"] == "cmd_contrastive"
    # CMD: the fusion encoder and its loss; coarse-to-fine parts off unless method=c2f / c2f_cmd
    assert cfg["model"]["cmd_fusion"] is True and cfg["criterion"]["cmd_weight"] == 1.0
    assert cfg["model"]["queue_size"] == 0 and cfg["criterion"]["sim_weight"] == 0.0
    assert cfg["common"]["user_dir"] == os.path.join(REPO, "cmd_plugin")
    # tensorboard logs next to the checkpoints
    assert cfg["common"]["tensorboard_logdir"] == f"{cfg['checkpoint']['save_dir']}/tensorboard"
    # configs and dataclasses are one source of truth: no key the dataclass does not know
    for section, dc in (
        ("task", SpeechImageConfig),
        ("model", CmdSpeechImageConfig),
        ("criterion", CmdContrastiveConfig),
    ):
        unknown = set(cfg[section]) - set(dc.__dataclass_fields__) - {"_name"}
        assert not unknown, f"{corpus}: {section} keys unknown to {dc.__name__}: {unknown}"
    if corpus != "tiny":
        # the paper's recipe
        assert cfg["optimizer"]["_name"] == "adam" and float(cfg["optimizer"]["weight_decay"]) == 1e-6
        assert cfg["optimization"]["max_update"] == 60000 and cfg["optimization"]["lr"] == [1e-4]
        assert cfg["lr_scheduler"]["_name"] == "polynomial_decay"
        assert cfg["lr_scheduler"]["warmup_updates"] == 4000
        assert float(cfg["lr_scheduler"]["end_learning_rate"]) == 1e-8
        world = cfg["distributed_training"]["distributed_world_size"]
        assert cfg["dataset"]["batch_size"] * world == 128
        assert cfg["criterion"]["patch_noise_ratio"] == 0.3
        assert cfg["model"]["image_model"] == "ViT-L-14-quickgelu" and cfg["common"]["fp16"] is True
        assert cfg["checkpoint"]["best_checkpoint_metric"] == "mean_r1"
        assert cfg["checkpoint"]["save_dir"] == f"checkpoints/{corpus}_cmd"


def make_corpus(root, splits, seed=0):
    """Random 16 kHz wavs and coloured images, written in the manifest format."""
    rng = np.random.default_rng(seed)
    wav_dir, img_dir, man_dir = root / "wavs", root / "images", root / "manifests"
    wav_dir.mkdir(parents=True)
    img_dir.mkdir()
    for split, (n_images, n_captions) in splits.items():
        audio, sizes, images = [], [], []
        for i in range(n_images):
            name = f"{split}_{i}.jpg"
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            Image.new("RGB", (32, 32), colour).save(img_dir / name)
            for c in range(n_captions):
                n = int(rng.integers(8000, 16000))
                wav = (rng.standard_normal(n) * 0.1 + np.sin(np.arange(n) * (i + 1) * 0.05)).astype("float32")
                sf.write(wav_dir / f"{split}_{i}_{c}.wav", wav, 16000)
                audio.append(f"{split}_{i}_{c}.wav")
                sizes.append(n)
                images.append(name)
        write_manifest(str(man_dir), split, SpeechImageManifest(str(wav_dir), audio, sizes, str(img_dir), images))
    return str(man_dir)


def _losses(stdout):
    return [float(x) for x in re.findall(r"\[train_inner\]\[INFO\] - .*? loss=([0-9.]+)", stdout)]


def test_literal_command_trains_validates_checkpoints_and_resumes(tiny_encoders, tmp_path):
    data = make_corpus(tmp_path, {"train": (8, 2), "valid": (4, 2)})
    save_dir = tmp_path / "ckpt"
    overrides = [
        "task._name=speech_image",
        f"task.data={data}",
        f"model.hubert_path={tiny_encoders['hubert_path']}",
        f"model.image_model={tiny_encoders['image_model']}",
        f"model.image_model_config={tiny_encoders['image_model_config']}",
        f"model.image_pretrained={tiny_encoders['image_pretrained']}",
        f"checkpoint.save_dir={save_dir}",
        "dataset.batch_size=8",
        "common.log_interval=1",
        "optimization.lr=[0.002]",
        "lr_scheduler.warmup_updates=2",
    ]
    config_dir = os.path.join(REPO, "examples", "tiny")
    proc = run_train(["--config-dir", config_dir] + overrides + ["optimization.max_update=12"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = _losses(proc.stdout)
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    # whole-split recall was computed at validation (8 utterances x 4 images) and selects best
    valid = re.findall(r"valid on 'valid' subset .*? mean_r1 ([0-9.]+)", proc.stdout)
    assert valid and all(0.0 <= float(v) <= 100.0 for v in valid)
    assert "whole-split recall on 8 utterances x 4 images" in proc.stdout + proc.stderr
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        assert (save_dir / name).is_file()
    # the config's common.tensorboard_logdir: event files of training steps and validation
    for tag in ("train_inner", "valid"):
        events = list((save_dir / "tensorboard" / tag).glob("events.out.tfevents.*"))
        assert events and all(e.stat().st_size > 0 for e in events), tag
    state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 12
    # both upstreams are frozen in this config (as in the paper): the checkpoint holds the trained
    # parts only, and the upstreams by path
    assert not any(k.startswith("hubert.") for k in state["model"])
    assert any(k.endswith("layer_weights") for k in state["model"])
    # hydra's log file lies next to the checkpoints, not in the directory the command ran in
    assert not (tmp_path / "hydra_train.log").exists()
    assert len(re.findall(r"\[train_inner\]", (save_dir / "hydra_train.log").read_text())) == 12

    proc = run_train(["--config-dir", config_dir] + overrides + ["optimization.max_update=16"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 12 updates\)", proc.stdout)
    assert len(_losses(proc.stdout)) == 4
    state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 16
    # the resumed run continues the same log file
    assert len(re.findall(r"\[train_inner\]", (save_dir / "hydra_train.log").read_text())) == 16
    assert not (tmp_path / "hydra_train.log").exists()


@pytest.mark.parametrize("corpus", ["flickr8k", "spokencoco", "tiny"])
def test_shipped_configs_log_next_to_the_checkpoints(corpus):
    """hydra.run.dir is the current directory; hydra's log file goes to checkpoint.save_dir instead
    (the tiny config's runs check the file itself)."""
    with open(os.path.join(REPO, "examples", corpus, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    if "hydra" not in cfg:  # the corpus recipes take it from the shared recipe they select
        assert {"recipe": "paper"} in cfg["defaults"]
        with open(os.path.join(REPO, "cmd_plugin", "config", "recipe", "paper.yaml")) as f:
            cfg = yaml.safe_load(f)
    hydra_cfg = cfg["hydra"]
    assert hydra_cfg["run"]["dir"] == "."
    handler = hydra_cfg["job_logging"]["handlers"]["file"]
    assert handler == {
        "class": "hydra_plugins._cmd_plugin_logging.RunLogFileHandler",
        "filename": "${checkpoint.save_dir}/hydra_train.log",
    }


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("global_negatives", ["true", "false"])
def test_two_gloo_workers_train_and_validate_the_whole_split(tiny_encoders, tmp_path, global_negatives):
    """fairseq's own data-parallel path on CPU: summable logs, whole-split recall from both workers
    whether or not the loss uses the global batch, so checkpoint_best.pt is always written."""
    data = make_corpus(tmp_path, {"train": (8, 2), "valid": (4, 2)})
    torchrun = _console_script("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [
            torchrun,
            "--nproc_per_node=2",
            f"--master-port={_free_port()}",
            TRAIN,
            "--config-dir",
            os.path.join(REPO, "examples", "tiny"),
            "task._name=speech_image",
            f"task.data={data}",
            f"model.hubert_path={tiny_encoders['hubert_path']}",
            f"model.image_model={tiny_encoders['image_model']}",
            f"model.image_model_config={tiny_encoders['image_model_config']}",
            f"model.image_pretrained={tiny_encoders['image_pretrained']}",
            f"checkpoint.save_dir={tmp_path / 'ckpt'}",
            "optimization.max_update=3",
            "dataset.batch_size=3",
            "common.log_interval=1",
            "distributed_training.distributed_world_size=2",
            "distributed_training.distributed_backend=gloo",
            "distributed_training.ddp_backend=legacy_ddp",
            "distributed_training.distributed_init_method=env://",
            "distributed_training.distributed_no_spawn=true",
            # omegaconf 2.1+: ${oc.env:RANK}; 2.0 (fairseq from source): ${env:RANK}
            f"distributed_training.distributed_rank=${{{compat.env_resolver()}:RANK}}",
            f"criterion.global_batch_negatives={global_negatives}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # global batch of 2 workers x 3 utterances, and recall over all 8 valid utterances
    assert re.search(r"\[train_inner\].* bsz=6,", out)
    assert "whole-split recall on 8 utterances x 4 images" in out
    valid = re.findall(r"valid on 'valid' subset .*? mean_r1 ([0-9.a-z]+)", out)
    assert valid and all(0.0 <= float(v) <= 100.0 for v in valid), valid
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        assert (tmp_path / "ckpt" / name).is_file()
    # the workers log before fairseq creates checkpoint.save_dir: the log file's handler makes it
    assert "Logging error" not in out and not (tmp_path / "hydra_train.log").exists()
    assert "[train_inner]" in (tmp_path / "ckpt" / "hydra_train.log").read_text()
    # the fusion's attention is visible in training and validation logs
    for tag in ("train_inner", "valid"):
        line = next(line for line in out.splitlines() if f"[{tag}]" in line and "attn_entropy" in line)
        entropy = float(re.search(r"attn_entropy[= ]([0-9.]+)", line).group(1))
        assert 0.0 <= entropy <= 1.0 and "attn_max" in line and "attn_cos_mean_pool" in line


def test_bf16_training_learns_and_scores(tiny_encoders, tmp_path):
    """Half precision through fairseq's own model conversion (common.bf16: the same path as
    common.fp16, which needs CUDA): the tiny config trains, its loss falls, and the checkpoint scores."""
    data = make_corpus(tmp_path, {"train": (8, 2), "valid": (4, 2)})
    save_dir = tmp_path / "ckpt"
    proc = run_train(
        [
            "--config-dir",
            os.path.join(REPO, "examples", "tiny"),
            "task._name=speech_image",
            f"task.data={data}",
            f"model.hubert_path={tiny_encoders['hubert_path']}",
            f"model.image_model={tiny_encoders['image_model']}",
            f"model.image_model_config={tiny_encoders['image_model_config']}",
            f"model.image_pretrained={tiny_encoders['image_pretrained']}",
            f"checkpoint.save_dir={save_dir}",
            "common.bf16=true",
            "dataset.batch_size=8",
            "common.log_interval=1",
            "optimization.lr=[0.002]",
            "lr_scheduler.warmup_updates=2",
            "optimization.max_update=12",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = _losses(proc.stdout)
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    out_json = tmp_path / "recall.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "examples", "eval_recall.py"),
            "--checkpoint",
            str(save_dir / "checkpoint_best.pt"),
            "--data",
            str(data),
            "--split",
            "valid",
            "--output-json",
            str(out_json),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    record = json.loads(out_json.read_text())
    assert record["counts"]["num_utterances"] == 8
    assert 0.0 <= record["recall"]["mean_r1"] <= 100.0


def test_validation_of_an_incomplete_split_fails_instead_of_logging_nan(tmp_path):
    """A split seen only in part (e.g. dataset.max_valid_steps) must stop the run with a message:
    a NaN mean_r1 silently prevents checkpoint_best.pt, and the README's eval command fails later."""
    from cmd_plugin.tasks.speech_image import SpeechImageConfig, SpeechImageTask

    data = make_corpus(tmp_path, {"valid": (3, 2)})
    task = SpeechImageTask.setup_task(SpeechImageConfig(data=data, image_model="ViT-B-32"))
    task.load_dataset("valid")
    speech, image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1), torch.randn(6, 8)
    store = task._valid_embeddings.setdefault("valid", {})
    for i in range(5):  # one utterance short
        store[i] = (i // 2, speech[i].half(), image[i].half())
    with pytest.raises(RuntimeError, match="collected 5 of its 6 utterances"):
        task._split_recall("valid")
    store[5] = (2, speech[5].half(), image[5].half())
    recall = task._split_recall("valid")
    assert 0.0 <= recall["mean_r1"] <= 100.0
