"""The method config group (cmd_plugin/config/method/: sic, cmd, c2f, c2f_cmd) over every corpus
config, through the user's literal command (``fairseq-hydra-train ... --cfg``, nothing trained):
each method turns on its parts and losses with the corpus's own sizes, the command without a method
is method=cmd, and the spellings of before the group are refused with the new one."""

import os

import pytest
from test_train_cli import REPO, composed_config, run_train

METHOD_DIR = os.path.join(REPO, "cmd_plugin", "config", "method")
# what each method builds and trains: (CMD, C2F)
METHODS = {"sic": (False, False), "cmd": (True, False), "c2f": (False, True), "c2f_cmd": (True, True)}
# each corpus's C2F sizes (examples/<corpus>/config.yaml), used when a method turns the part on
SIZES = {
    "flickr8k": dict(
        queue_size=16384, momentum=0.995, multimodal_heads=8, multimodal_ffn_dim=4096, multimodal_dropout=0.1
    ),
    "spokencoco": dict(
        queue_size=65536, momentum=0.995, multimodal_heads=8, multimodal_ffn_dim=4096, multimodal_dropout=0.1
    ),
    "tiny": dict(queue_size=1024, momentum=0.99, multimodal_heads=2, multimodal_ffn_dim=256, multimodal_dropout=0.0),
}


def test_the_method_group_holds_the_four_methods():
    assert sorted(os.listdir(METHOD_DIR)) == sorted(f"{m}.yaml" for m in METHODS)
    # the corpus directories hold no method of their own (one would shadow the shared one)
    for corpus in SIZES:
        assert not os.path.exists(os.path.join(REPO, "examples", corpus, "method"))


@pytest.mark.parametrize("corpus", sorted(SIZES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_composes_over_each_corpus(corpus, method):
    from cmd_plugin.criterions.cmd_contrastive import CmdContrastiveConfig
    from cmd_plugin.models.cmd_speech_image import CmdSpeechImageConfig
    from cmd_plugin.tasks.speech_image import SpeechImageConfig

    cfg = composed_config(corpus, f"method={method}")
    model, crit = cfg["model"], cfg["criterion"]
    cmd, c2f = METHODS[method]
    # CMD: the fusion encoder is built exactly when its loss is on
    assert model["cmd_fusion"] is cmd and crit["cmd_weight"] == (1.0 if cmd else 0.0)
    # C2F: momentum model, queue of the corpus's size and SIM encoder, with their losses
    assert model["c2f_momentum"] is c2f and model["multimodal_layers"] == (2 if c2f else 0)
    assert model["queue_size"] == (SIZES[corpus]["queue_size"] if c2f else 0)
    assert crit["sim_weight"] == (1.0 if c2f else 0.0) and crit["distill_alpha"] == (0.4 if c2f else 0.0)
    assert crit["sic_weight"] == 1.0 and crit["distill_ramp_updates"] == -1
    # the corpus's sizes, whatever the method
    for key in ("momentum", "multimodal_heads", "multimodal_ffn_dim", "multimodal_dropout"):
        assert model[key] == SIZES[corpus][key], key
    # no part is built unused
    assert cfg["distributed_training"]["find_unused_parameters"] is False
    # the image encoder: the CMD recipe's CLIP ViT-L/14 or BLIP-2's EVA01-g-14 for C2F; the tiny
    # corpus's is given on the command line
    image_model = "EVA01-g-14" if c2f else ("???" if corpus == "tiny" else "ViT-L-14-quickgelu")
    assert model["image_model"] == image_model and cfg["task"]["image_model"] == image_model
    if corpus != "tiny":  # each method's checkpoints apart (the tiny runs name theirs)
        assert cfg["checkpoint"]["save_dir"] == f"checkpoints/{corpus}_{method}"
        assert cfg["common"]["tensorboard_logdir"] == f"checkpoints/{corpus}_{method}/tensorboard"
    for section, dc in (
        ("task", SpeechImageConfig),
        ("model", CmdSpeechImageConfig),
        ("criterion", CmdContrastiveConfig),
    ):
        unknown = set(cfg[section]) - set(dc.__dataclass_fields__) - {"_name"}
        assert not unknown, f"{corpus} {method}: {section} keys unknown to {dc.__name__}: {unknown}"


@pytest.mark.parametrize("corpus", sorted(SIZES))
def test_the_command_without_a_method_is_cmd(corpus):
    assert composed_config(corpus) == composed_config(corpus, "method=cmd")


def test_the_spellings_of_before_the_method_group_are_refused_with_the_new_one():
    proc = run_train(
        [
            "--config-dir",
            os.path.join("examples", "flickr8k"),
            "task._name=speech_image",
            "+method=c2f",
            "+ablation=no_cmd",
            "+method=c2f_cmd",
            "--cfg",
            "job",
        ],
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert (
        "+method=c2f +ablation=no_cmd +method=c2f_cmd: the method is now a config group with a default "
        "(cmd); write method=c2f method=sic method=c2f_cmd instead"
    ) in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not proc.stdout.strip()
