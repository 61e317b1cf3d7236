"""Killed runs resume exactly: real fairseq-hydra-train processes, real SIGKILLs.

One uninterrupted run is the reference. A second run of the same command is SIGKILLed right
after its first checkpoint; restarted with the same command it continues from
checkpoint_last.pt, and is SIGKILLed again in the middle of writing its next checkpoint_last.pt
(inside fairseq's copy of the checkpoint); the previous checkpoint_last.pt must stay loadable,
and the final restart must finish the run. On the CPU with a fixed seed, every update after a
restart logs the loss of the same update of the reference run (same batches, same CMD noise),
and the final weights are equal.
"""

import os
import re
import signal
import subprocess
import sys

import torch
from test_train_cli import REPO, TRAIN, make_corpus

from cmd_plugin.checkpoints import safe_torch_load

MAX_UPDATE = 8

# fairseq-hydra-train, killed by SIGKILL half-way through the first copy of a checkpoint onto an
# existing checkpoint_last.pt (fairseq copies the first file of a save to the others)
KILLED_IN_SAVE = """
import os, shutil, signal, sys

copyfile = shutil.copyfile

def copy_then_die(src, dst, *args, **kwargs):
    last = os.path.join(os.path.dirname(dst), "checkpoint_last.pt")
    if os.path.basename(dst).startswith("checkpoint_last") and os.path.exists(last):
        with open(src, "rb") as f:
            data = f.read()
        with open(dst, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        print("KILLING MYSELF DURING THE COPY TO", dst, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return copyfile(src, dst, *args, **kwargs)

shutil.copyfile = copy_then_die
from fairseq_cli.hydra_train import cli_main
sys.argv = ["fairseq-hydra-train"] + sys.argv[1:]
cli_main()
"""


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")


def _updates(log):
    """{update number: logged loss} of the train_inner lines (log_interval=1)."""
    found = re.findall(r"\[train_inner\]\[INFO\] - .*? loss=([0-9.]+),.*? num_updates=(\d+)", log)
    return {int(u): float(loss) for loss, u in found}


def _kill_after_first_checkpoint(args, cwd):
    proc = subprocess.Popen(
        [TRAIN] + args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Saved checkpoint" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    assert proc.wait(timeout=60) == -signal.SIGKILL, "".join(lines)[-3000:]
    return "".join(lines)


def test_killed_runs_resume_exactly_and_a_kill_during_a_save_keeps_the_previous_checkpoint(tiny_encoders, tmp_path):
    data = make_corpus(tmp_path, {"train": (12, 2), "valid": (3, 2)})
    enc = tiny_encoders

    def args(save_dir):
        return [
            "--config-dir",
            os.path.join(REPO, "examples", "tiny"),
            "task._name=speech_image",
            f"task.data={data}",
            f"model.hubert_path={enc['hubert_path']}",
            f"model.image_model={enc['image_model']}",
            f"model.image_model_config={enc['image_model_config']}",
            f"model.image_pretrained={enc['image_pretrained']}",
            f"checkpoint.save_dir={save_dir}",
            "dataset.batch_size=4",
            "common.log_interval=1",
            "optimization.lr=[0.002]",
            "lr_scheduler.warmup_updates=2",
            f"optimization.max_update={MAX_UPDATE}",
            # mid-epoch checkpoints too: the restart must also resume inside an epoch
            "checkpoint.save_interval_updates=3",
            "model.speech_encoder_dropout=0.1",
        ]

    # the reference runs alongside the interrupted one (one core each)
    reference = subprocess.Popen(
        [TRAIN] + args(tmp_path / "reference"),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    save_dir = tmp_path / "interrupted"

    # 1. SIGKILL right after the first checkpoint
    first = _kill_after_first_checkpoint(args(save_dir), tmp_path)
    saved_at = int(re.search(r"Saved checkpoint .*? @ (\d+) updates", first).group(1))
    assert safe_torch_load(str(save_dir / "checkpoint_last.pt"))["optimizer_history"][-1]["num_updates"] == saved_at

    # 2. the same command resumes from checkpoint_last.pt; SIGKILL half-way through writing the next one
    second = subprocess.run(
        [sys.executable, "-c", KILLED_IN_SAVE] + args(save_dir),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == -signal.SIGKILL, second.stdout[-3000:] + second.stderr[-3000:]
    assert re.search(rf"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ {saved_at} updates\)", second.stdout)
    assert "KILLING MYSELF DURING THE COPY" in second.stdout
    # the previous checkpoint_last.pt is whole (fairseq alone leaves it truncated here)
    state = safe_torch_load(str(save_dir / "checkpoint_last.pt"))
    assert state["optimizer_history"][-1]["num_updates"] == saved_at

    # 3. the same command again finishes the run
    third = subprocess.run(
        [TRAIN] + args(save_dir), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert re.search(rf"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ {saved_at} updates\)", third.stdout)

    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out[-3000:]
    expected = _updates(ref_out)
    assert sorted(expected) == list(range(1, MAX_UPDATE + 1))
    for log in (first, second.stdout, third.stdout):
        for update, loss in _updates(log).items():
            assert loss == expected[update], (update, loss, expected[update])
    resumed = _updates(third.stdout)
    assert sorted(resumed) == list(range(saved_at + 1, MAX_UPDATE + 1))
    assert len(_updates(second.stdout)) >= 1  # the killed restart trained before dying

    final = safe_torch_load(str(save_dir / "checkpoint_last.pt"))
    reference_final = safe_torch_load(str(tmp_path / "reference" / "checkpoint_last.pt"))
    assert final["optimizer_history"][-1]["num_updates"] == MAX_UPDATE
    assert final["model"].keys() == reference_final["model"].keys()
    for key, value in reference_final["model"].items():
        assert torch.equal(final["model"][key], value), key
