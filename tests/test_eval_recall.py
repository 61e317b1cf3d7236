"""examples/eval_recall.py end to end on a tiny corpus and a checkpoint in fairseq's trainer format."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf
from PIL import Image

from cmd_plugin.data.manifest import SpeechImageManifest, write_manifest
from cmd_plugin.models.cmd_speech_image import CmdSpeechImageConfig, CmdSpeechImageModel
from cmd_plugin.retrieval.recall import retrieval_recall
from cmd_plugin.tasks.speech_image import image_transform

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "eval_recall.py")
KEYS = [f"{d}_r{k}" for d in ("s2i", "i2s", "mean") for k in (1, 5, 10)]
NUM_IMAGES, CAPTIONS = 6, 2


def _load_script(path=SCRIPT, name="eval_recall_script"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_recall = _load_script()


@pytest.fixture(scope="module")
def setup(tiny_encoders, tmp_path_factory):
    """Tiny corpus + a checkpoint whose HuBERT file and training manifests have since moved."""
    root = tmp_path_factory.mktemp("eval_recall")
    rng = np.random.default_rng(0)
    wav_dir, img_dir = root / "wavs", root / "images"
    wav_dir.mkdir()
    img_dir.mkdir()
    audio_paths, sizes, image_paths = [], [], []
    for i in range(NUM_IMAGES):
        pixels = rng.integers(0, 256, size=(48 + 8 * i, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(img_dir / f"img{i}.png")
        for c in range(CAPTIONS):
            # 4 lengths, 3 utterances each: length-ordered batches of 3 need no padding, so batched
            # and one-at-a-time embeddings agree exactly (HuBERT's frame mask makes padded ones differ)
            n = 4000 + 1500 * ((i * CAPTIONS + c) % 4)
            sf.write(str(wav_dir / f"img{i}_{c}.wav"), 0.1 * rng.standard_normal(n).astype(np.float32), 16000)
            audio_paths.append(f"img{i}_{c}.wav")
            sizes.append(n)
            image_paths.append(f"img{i}.png")
    # interleave so that captions of one image are not adjacent in the manifest
    order = list(range(0, len(audio_paths), 2)) + list(range(1, len(audio_paths), 2))
    manifest_dir = root / "manifests"
    write_manifest(
        str(manifest_dir),
        "test",
        SpeechImageManifest(
            audio_root=str(wav_dir),
            audio_paths=[audio_paths[i] for i in order],
            num_samples=[sizes[i] for i in order],
            image_root=str(img_dir),
            image_paths=[image_paths[i] for i in order],
        ),
    )

    # HuBERT "moved" after training: the checkpoint names a path that no longer exists
    old_hubert = str(root / "old_location" / "tiny_hubert.pt")
    new_hubert = str(root / "new_location" / "tiny_hubert.pt")
    os.makedirs(os.path.dirname(new_hubert))
    shutil.copy(tiny_encoders["hubert_path"], new_hubert)

    model_cfg = CmdSpeechImageConfig(
        hubert_path=tiny_encoders["hubert_path"],
        image_model=tiny_encoders["image_model"],
        image_pretrained=tiny_encoders["image_pretrained"],
        image_model_config=tiny_encoders["image_model_config"],
        speech_encoder_heads=4,
        speech_encoder_ffn_dim=128,
        speech_encoder_dropout=0.0,
    )
    torch.manual_seed(0)
    model = CmdSpeechImageModel.build_model(model_cfg)
    with torch.no_grad():  # trained weights differ from any fresh initialisation
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()

    model_dict = OmegaConf.to_container(OmegaConf.structured(model_cfg), enum_to_str=True)  # as fairseq saves
    model_dict.update(_name="cmd_speech_image", hubert_path=old_hubert)
    # what fairseq's Trainer.state_dict saves: the resolved config as plain containers
    state = {
        "args": None,
        "cfg": {
            "_name": None,
            "common": {"_name": None, "user_dir": os.path.join(REPO, "cmd_plugin"), "seed": 1},
            "task": {
                "_name": "speech_image",
                "data": str(root / "training_manifests"),
                "image_model": tiny_encoders["image_model"],
                "image_model_config": tiny_encoders["image_model_config"],
                "image_pretrained": tiny_encoders["image_pretrained"],
                "image_feature_cache": str(root / "training_image_cache"),  # gone: scoring encodes pixels
                # training's length filter would drop the 4000- and 8500-sample test utterances:
                # scoring must still score every one of them
                "sample_rate": 16000,
                "min_sample_size": 4500,
                "max_sample_size": 7000,
                "num_length_buckets": 0,
            },
            "model": model_dict,
            "criterion": {"_name": "cmd_contrastive"},
        },
        "model": model.state_dict(),
        "criterion": {},
        "optimizer_history": [
            {
                "criterion_name": "CmdContrastiveCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": 12.5},
                "num_updates": 100,
            }
        ],
        "task_state": {},
        "extra_state": {
            "train_iterator": {"epoch": 2, "iterations_in_epoch": 0, "shuffle": True},
            "previous_training_time": 1.0,
            "val_loss": 1.0,
        },
        "last_optimizer_state": {},
    }
    checkpoint = str(root / "checkpoints" / "checkpoint_best.pt")
    os.makedirs(os.path.dirname(checkpoint))
    torch.save(state, checkpoint)

    # reference: the model's own embeddings, one item at a time, no dataset or collater
    transform = image_transform(tiny_encoders["image_model"], tiny_encoders["image_model_config"])
    with torch.no_grad():
        speech = torch.cat(
            [
                model.encode_speech(torch.from_numpy(sf.read(str(wav_dir / p), dtype="float32")[0])[None])
                for p in [audio_paths[i] for i in order]
            ]
        )
        unique = list(dict.fromkeys(image_paths[i] for i in order))
        pixels = torch.stack([transform(Image.open(img_dir / p).convert("RGB")) for p in unique])
        images, _ = model.encode_image(pixels)
    image_ids = torch.tensor([unique.index(image_paths[i]) for i in order])
    return {
        "root": root,
        "manifests": str(manifest_dir),
        "checkpoint": checkpoint,
        "old_hubert": old_hubert,
        "new_hubert": new_hubert,
        "speech": speech,
        "images": images,
        "image_ids": image_ids,
        "image_paths": unique,
        "utterance_paths": [audio_paths[i] for i in order],
    }


def _run(setup, *extra):
    return eval_recall.main(
        [
            "--checkpoint",
            setup["checkpoint"],
            "--data",
            setup["manifests"],
            "--split",
            "test",
            "--batch-size",
            "3",
            "--no-progress",
            *extra,
        ]
    )


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        eval_recall.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_scores_match_recall_of_the_models_own_embeddings(setup, capsys, tmp_path):
    out_json, emb_path = tmp_path / "out" / "recall.json", tmp_path / "emb.pt"
    assert (
        _run(
            setup,
            "--hubert-path",
            setup["new_hubert"],
            "--output-json",
            str(out_json),
            "--save-embeddings",
            str(emb_path),
        )
        == 0
    )
    printed = capsys.readouterr().out
    record = json.loads(out_json.read_text())

    # the recall of the embeddings it saved, which are the model's own (below) up to float32 rounding:
    # batched and one-at-a-time passes sum in another order, and the i2s scores of this tiny model lie
    # only 5e-6 apart, so recall is compared on the script's own embeddings, not recomputed ones
    saved = torch.load(emb_path, weights_only=True)
    expected = retrieval_recall(saved["speech"], saved["images"], saved["image_ids"])
    for key in KEYS:
        assert record["recall"][key] == pytest.approx(expected[key], abs=1e-9), key
    assert record["counts"]["num_utterances"] == NUM_IMAGES * CAPTIONS
    assert record["counts"]["num_images"] == NUM_IMAGES
    assert record["counts"]["num_utterances_in_manifest"] == NUM_IMAGES * CAPTIONS
    assert record["checkpoint"] == setup["checkpoint"]
    assert record["data"] == setup["manifests"] and record["split"] == "test"
    assert record["upstreams"]["hubert_path"] == setup["new_hubert"]
    assert record["timestamp"] and record["chance_captions_per_image"] == CAPTIONS
    assert record["chance"]["s2i_r1"] == pytest.approx(100.0 / NUM_IMAGES)
    assert not list(tmp_path.joinpath("out").glob("*.tmp"))  # atomic write left no temporary

    # embeddings: the checkpoint's trained weights, every utterance in manifest order, images deduplicated
    assert saved["speech"].shape == setup["speech"].shape
    assert torch.allclose(saved["speech"], setup["speech"], atol=1e-4)
    assert torch.allclose(saved["images"], setup["images"], atol=1e-5)
    assert torch.equal(saved["image_ids"], setup["image_ids"])
    assert saved["image_paths"] == setup["image_paths"]
    assert saved["utterance_paths"] == setup["utterance_paths"]

    # the printed table: Table 2 column layout, model row then chance row, one decimal
    lines = printed.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if "Speech→Image" in line)
    header1, header2, rule, model_row, chance_row = lines[start : start + 5]
    assert [part.strip() for part in header1.split("|")[1:]] == ["Speech→Image", "Image→Speech", "Mean"]
    assert [cells.split() for cells in header2.split("|")] == [["Model"]] + [["R@1", "R@5", "R@10"]] * 3
    assert set(rule) == {"-"}
    assert model_row.startswith("checkpoint_best.pt") and chance_row.startswith("chance")
    values = [float(v) for part in model_row.split("|")[1:] for v in part.split()]
    assert values == [round(record["recall"][k], 1) for k in KEYS]
    assert all(len(v.split(".")[1]) == 1 for part in model_row.split("|")[1:] for v in part.split())

    # save -> from-embeddings: identical figures without loading any model
    out2 = tmp_path / "from_emb.json"
    assert eval_recall.main(["--from-embeddings", str(emb_path), "--output-json", str(out2)]) == 0
    record2 = json.loads(out2.read_text())
    assert record2["recall"] == record["recall"] and record2["hits"] == record["hits"]
    assert record2["checkpoint"] == setup["checkpoint"] and record2["split"] == "test"
    assert "Speech→Image" in capsys.readouterr().out


def test_moved_hubert_file_is_named_in_the_error(setup, capsys):
    err = _error(capsys, ["--checkpoint", setup["checkpoint"], "--data", setup["manifests"], "--no-progress"])
    assert setup["old_hubert"] in err and "--hubert-path" in err
    missing = str(setup["root"] / "nowhere" / "hubert.pt")
    err = _error(
        capsys,
        ["--checkpoint", setup["checkpoint"], "--data", setup["manifests"], "--hubert-path", missing, "--no-progress"],
    )
    assert missing in err


def test_missing_checkpoint_and_foreign_checkpoint_are_clear_errors(setup, tiny_encoders, capsys, tmp_path):
    missing = str(tmp_path / "checkpoints" / "checkpoint_last.pt")
    err = _error(capsys, ["--checkpoint", missing, "--data", setup["manifests"]])
    assert "checkpoint not found" in err and missing in err
    # a fairseq checkpoint of another model (the HuBERT upstream itself)
    err = _error(capsys, ["--checkpoint", tiny_encoders["hubert_path"], "--data", setup["manifests"]])
    assert "not a cmd_speech_image checkpoint" in err and "hubert" in err
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("not a checkpoint")
    err = _error(capsys, ["--checkpoint", str(not_torch), "--data", setup["manifests"]])
    assert "not a fairseq checkpoint" in err
    err = _error(
        capsys,
        [
            "--checkpoint",
            setup["checkpoint"],
            "--data",
            str(tmp_path / "no_manifests"),
            "--hubert-path",
            setup["new_hubert"],
        ],
    )
    assert str(tmp_path / "no_manifests") in err
    err = _error(capsys, ["--checkpoint", setup["checkpoint"], "--data", setup["manifests"], "--fp16"])
    assert "--fp16 needs --device cuda" in err
    err = _error(capsys, ["--from-embeddings", str(tmp_path / "missing_emb.pt")])
    assert "embeddings file not found" in err and "missing_emb.pt" in err


def test_a_wrong_split_is_named_with_the_splits_there_before_the_model_loads(setup, capsys, tmp_path):
    # the checkpoint is no checkpoint at all: an error about the split shows nothing was loaded first
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("not a checkpoint")
    err = _error(capsys, ["--checkpoint", str(not_torch), "--data", setup["manifests"], "--split", "tset"])
    assert f"{setup['manifests']}/tset.tsv: missing (split 'tset'" in err and "splits there: test)" in err, err
    assert "not a fairseq checkpoint" not in err
    err = _error(capsys, ["--checkpoint", str(not_torch), "--data", str(tmp_path), "--split", "test"])
    assert "no split there (<split>.tsv + <split>.img)" in err and "not a fairseq checkpoint" not in err
    # every reader of a manifest says the same (the training task, prepare, pretrain_tiny_clip.py)
    from cmd_plugin.data.manifest import ManifestError, read_manifest

    with pytest.raises(ManifestError, match=r"tset\.tsv: missing .*; splits there: test\)"):
        read_manifest(setup["manifests"], "tset")


def test_cli_runs_from_another_directory_and_documents_the_tie_rule(setup, tiny_encoders, tmp_path):
    # the checkpoint reloaded in a NEW process gives the trained model's own embeddings
    emb_path = tmp_path / "emb.pt"
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--checkpoint",
            setup["checkpoint"],
            "--data",
            setup["manifests"],
            "--split",
            "test",
            "--hubert-path",
            setup["new_hubert"],
            "--batch-size",
            "3",
            "--no-progress",
            "--save-embeddings",
            str(emb_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(emb_path, weights_only=True)
    assert torch.allclose(saved["speech"], setup["speech"], atol=1e-4)
    assert torch.allclose(saved["images"], setup["images"], atol=1e-5)
    # and the checkpoint is small: trained weights only, the frozen upstreams come from their files
    state = torch.load(setup["checkpoint"], map_location="cpu", weights_only=False)
    assert not any(k.startswith(("hubert.", "image_encoder.")) for k in state["model"])
    upstream_bytes = os.path.getsize(setup["new_hubert"]) + os.path.getsize(tiny_encoders["image_pretrained"])
    assert os.path.getsize(setup["checkpoint"]) < upstream_bytes

    help_text = subprocess.run(
        [sys.executable, SCRIPT, "--help"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert "tie" in help_text.lower() and "above" in help_text
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--from-embeddings", "emb.pt", "--output-json", "r.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Image→Speech" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["num_images"] == NUM_IMAGES


def test_scoring_from_an_image_feature_cache_matches_pixels(setup, tiny_encoders, capsys, tmp_path):
    cache_image_features = _load_script(os.path.join(REPO, "examples", "cache_image_features.py"), "cache_script")
    cache_dir = tmp_path / "cache"
    assert (
        cache_image_features.main(
            [
                "--manifest-dir",
                setup["manifests"],
                "--splits",
                "test",
                "--image-model",
                tiny_encoders["image_model"],
                "--image-pretrained",
                tiny_encoders["image_pretrained"],
                "--image-model-config",
                tiny_encoders["image_model_config"],
                "--out",
                str(cache_dir),
                "--no-progress",
            ]
        )
        == 0
    )
    emb_path = tmp_path / "emb_cached.pt"
    assert (
        _run(
            setup,
            "--hubert-path",
            setup["new_hubert"],
            "--image-feature-cache",
            str(cache_dir),
            "--save-embeddings",
            str(emb_path),
        )
        == 0
    )
    saved = torch.load(emb_path, weights_only=True)
    # fp16 storage of the encoder's own outputs: close to the pixel path, never equal by accident
    assert torch.allclose(saved["images"], setup["images"], atol=2e-3)
    assert torch.allclose(saved["speech"], setup["speech"], atol=1e-4)
    # a cache that lacks the scored split's images is an error naming the image
    other = tmp_path / "other_manifests"
    shutil.copytree(setup["manifests"], other)
    img = other / "test.img"
    lines = img.read_text().splitlines()
    img.write_text("\n".join([lines[0]] + ["missing_" + line for line in lines[1:]]) + "\n")
    err = _error(
        capsys,
        [
            "--checkpoint",
            setup["checkpoint"],
            "--data",
            str(other),
            "--split",
            "test",
            "--hubert-path",
            setup["new_hubert"],
            "--image-feature-cache",
            str(cache_dir),
            "--no-progress",
        ],
    )
    assert "missing_" in err and "not in image feature cache" in err


def test_rerank_refuses_a_checkpoint_without_matching_head(setup, capsys):
    err = _error(
        capsys,
        [
            "--checkpoint",
            setup["checkpoint"],
            "--data",
            setup["manifests"],
            "--split",
            "test",
            "--hubert-path",
            setup["new_hubert"],
            "--rerank-k",
            "10",
            "--no-progress",
        ],
    )
    assert "has no matching head" in err and "method=c2f" in err and "+method" not in err
    err = _error(capsys, ["--checkpoint", setup["checkpoint"], "--data", setup["manifests"], "--rerank-k", "5"])
    assert "--rerank-k must be >= 10" in err


def test_scoring_names_the_manifest_line_of_a_file_broken_since_preparation(setup, capsys, tmp_path):
    from cmd_plugin.data.manifest import read_manifest

    manifest = read_manifest(setup["manifests"], "test")
    copy = tmp_path / "corpus"
    shutil.copytree(manifest.audio_root, copy / "wavs")
    shutil.copytree(manifest.image_root, copy / "images")
    manifest.audio_root, manifest.image_root = str(copy / "wavs"), str(copy / "images")
    data = str(tmp_path / "manifests")
    write_manifest(data, "test", manifest)
    argv = [
        "--checkpoint",
        setup["checkpoint"],
        "--data",
        data,
        "--hubert-path",
        setup["new_hubert"],
        "--batch-size",
        "3",
        "--no-progress",
    ]

    sf.write(manifest.audio_path(4), np.zeros(3000, np.float32), 8000)
    err = _error(capsys, argv)
    assert f"{os.path.join(data, 'test.tsv')}:6: {manifest.audio_path(4)} is 8000 Hz" in err

    rel = manifest.image_paths[7]
    os.remove(manifest.image_path(rel))
    err = _error(capsys, argv)
    first = manifest.image_paths.index(rel)  # the line that first lists the image
    assert "1 of the files listed in" in err
    assert f"{os.path.join(data, 'test.img')}:{first + 2}: {manifest.image_path(rel)}" in err
