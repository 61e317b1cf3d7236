"""What a user's commands print: none of the known-harmless library messages cmd_plugin causes
(cmd_plugin/quiet.py), while real warnings still pass."""

import json
import logging
import os
import subprocess
import sys
import warnings

import torch
from test_train_cli import REPO, TRAIN, make_corpus

# (what a newcomer saw, a string of it that must not appear)
KNOWN_HARMLESS = {
    "torch.jit.script deprecation at fairseq's import": "`torch.jit.script` is deprecated",
    "fairseq's text-to-speech task at import": "Please install tensorboardX",
    "fairseq's HuBERT task config dump": "HubertPretrainingTask Config",
    "fairseq's HuBERT model config dump": "HubertModel Config",
    "weight_norm deprecation in HuBERT's positional convolution": "weight_norm` is deprecated",
    "open_clip's random-initialisation warning for the tiny CLIP": "Model initialized randomly",
    "open_clip's step-by-step INFO records": "Parsing model identifier",
    "fairseq.trainer's None parameters listed as shared": "detected shared parameter",
}
# printed by fairseq-hydra-train itself while it imports fairseq, before it loads the plugin
# (docs/troubleshooting.md: "What the commands print")
BEFORE_THE_PLUGIN = {"`torch.jit.script` is deprecated", "Please install tensorboardX"}


def _user_env():
    """The user's environment: warnings as Python shows them by default (the other CLI tests ignore them)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return env


def _found(output, allowed=()):
    return {what: s for what, s in KNOWN_HARMLESS.items() if s in output and s not in allowed}


def test_user_commands_print_none_of_the_known_harmless_messages(tmp_path):
    env = _user_env()
    encoders = tmp_path / "encoders"
    made = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "make_tiny_encoders.py"), "--out-dir", str(encoders)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    assert not _found(made.stdout + made.stderr), made.stdout + made.stderr
    paths = dict(line.split("=", 1) for line in made.stdout.splitlines() if "=" in line)

    data = make_corpus(tmp_path / "corpus", {"train": (8, 2), "valid": (4, 2)})
    save_dir = tmp_path / "checkpoints"
    train = subprocess.run(
        [
            TRAIN,
            "--config-dir",
            os.path.join(REPO, "examples", "tiny"),
            "task._name=speech_image",
            "method=c2f",
            f"task.data={data}",
            f"model.hubert_path={paths['hubert_checkpoint']}",
            f"model.image_model={paths['clip_model_name']}",
            f"model.image_model_config={paths['clip_model_config']}",
            f"model.image_pretrained={paths['clip_pretrained']}",
            f"checkpoint.save_dir={save_dir}",
            "dataset.batch_size=4",
            "model.queue_size=12",
            "common.log_interval=1",
            "optimization.max_update=2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = train.stdout + train.stderr
    assert train.returncode == 0, output[-3000:]
    assert "num_updates=2" in output and "sim_acc" in output  # it trained, with the C2F parts
    assert not _found(output, allowed=BEFORE_THE_PLUGIN), output[-5000:]

    scored = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "examples", "eval_recall.py"),
            "--checkpoint",
            str(save_dir / "checkpoint_last.pt"),
            "--data",
            data,
            "--split",
            "valid",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "checkpoint_last.pt" in scored.stdout
    assert not _found(scored.stdout + scored.stderr), scored.stdout + scored.stderr
    # fairseq's import configures the root logger at DEBUG: left as it was, nobody's debug records show
    assert "DEBUG" not in scored.stderr


IMPORT_CHECK = r"""
import json, logging, sys, warnings
before = list(warnings.filters)
if sys.argv[1] == "quiet":
    from cmd_plugin.quiet import import_fairseq
    import_fairseq()
else:
    import fairseq
after = list(warnings.filters)
root = logging.getLogger()
print(json.dumps({
    "root_level": root.level, "root_handlers": len(root.handlers),
    "filters_added": [[f[0], f[1].pattern if f[1] else None, f[2].__name__] for f in after if f not in before],
}))
"""


def _import(how):
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, how], env=_user_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr, json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_fairseq_quietly_keeps_the_process_as_it_was():
    quiet_err, quiet = _import("quiet")
    assert "tensorboardX" not in quiet_err and "`torch.jit.script` is deprecated" not in quiet_err, quiet_err
    # the root logger as it was (a plain import leaves it configured by fairseq)
    assert quiet["root_level"] == logging.WARNING and quiet["root_handlers"] == 0
    _, plain = _import("plain")
    assert plain["root_handlers"] == 1
    # no filter of ours is left, and those numpy/torch install for themselves while fairseq imports them are kept
    assert quiet["filters_added"] == plain["filters_added"]


def test_real_warnings_still_pass(tiny_encoders, caplog):
    from cmd_plugin.models.clip_upstream import ClipImageUpstream
    from cmd_plugin.models.hubert_upstream import HubertUpstream
    from cmd_plugin.quiet import building_hubert, without_none_sharing_lines

    enc = tiny_encoders
    filters = list(warnings.filters)
    caplog.set_level(logging.INFO)
    # a CLIP asked for without weights: open_clip's warning is a real one here
    ClipImageUpstream(enc["image_model"], "", enc["image_model_config"])
    assert any(r.levelno == logging.WARNING and "initialized randomly" in r.getMessage() for r in caplog.records)
    assert not any("Parsing model identifier" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with building_hubert():
        HubertUpstream(enc["hubert_path"])
        logging.getLogger("fairseq.models.hubert.hubert").warning("a real HuBERT warning")
    messages = [r.getMessage() for r in caplog.records]
    assert "a real HuBERT warning" in messages and not any("Config" in m for m in messages), messages
    assert warnings.filters == filters  # nothing left behind
    assert not logging.getLogger("fairseq.models.hubert.hubert").filters

    # fairseq's trainer catalogue: None entries are left out, a real shared parameter is still logged
    from fairseq.trainer import _catalog_shared_params

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3, bias=False)
            self.b = torch.nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

    model = without_none_sharing_lines(Tied())
    caplog.clear()
    trainer_logger = logging.getLogger("fairseq.trainer")
    groups = _catalog_shared_params(model)
    assert sorted(map(sorted, groups)) == [["a.bias", "b.bias"], ["a.weight", "b.weight"]]
    for first, *others in groups:
        for other in others:  # as fairseq's Trainer logs them
            trainer_logger.info("detected shared parameter: {} <- {}".format(first, other))
    assert [r.getMessage() for r in caplog.records] == ["detected shared parameter: a.weight <- b.weight"]
