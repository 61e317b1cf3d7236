"""The layout's promises: objectives (the losses) and modules (the model's building blocks) are pure
torch (no fairseq), and the criterion refuses parts that no objective trains (their parameters would
be unused: DDP would need find_unused_parameters)."""

import os
import pkgutil
import subprocess
import sys

import pytest
from test_model import build_model, criterion, make_batch

import cmd_plugin.modules as modules
import cmd_plugin.objectives as objectives

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_objective_and_building_block_imports_without_fairseq():
    names = [m.name for m in pkgutil.walk_packages(objectives.__path__, "cmd_plugin.objectives.")]
    assert {
        "cmd_plugin.objectives.sic",
        "cmd_plugin.objectives.cmd.objective",
        "cmd_plugin.objectives.c2f.sim",
        "cmd_plugin.objectives.c2f.queue_sic",
    } <= set(names)
    blocks = [m.name for m in pkgutil.walk_packages(modules.__path__, "cmd_plugin.modules.")]
    assert {
        "cmd_plugin.modules.fusion",
        "cmd_plugin.modules.multimodal",
        "cmd_plugin.modules.momentum",
        "cmd_plugin.modules.queue",
    } <= set(blocks)
    names += blocks
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'fairseq' or m.startswith('fairseq.'))\n"
        "print(loaded)\nsys.exit(1 if loaded else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, f"objectives imported fairseq: {out.stdout[-500:]} {out.stderr[-2000:]}"


def test_parts_without_an_objective_are_refused_with_the_method_to_use(tiny_encoders):
    batch = make_batch([0, 1, 2])
    with pytest.raises(ValueError, match="method=sic"):  # Ω built, alpha = 0
        criterion(cmd_weight=0.0)(build_model(tiny_encoders), batch)
    with pytest.raises(ValueError, match="model.cmd_fusion=true"):  # alpha > 0 without Ω
        criterion(cmd_weight=1.0)(build_model(tiny_encoders, cmd_fusion=False), batch)
    with pytest.raises(ValueError, match="multimodal_layers=0"):  # SIM encoder built, SIM off
        criterion(cmd_weight=0.0)(
            build_model(
                tiny_encoders, cmd_fusion=False, multimodal_layers=1, multimodal_heads=2, multimodal_ffn_dim=32
            ),
            batch,
        )
    model = build_model(tiny_encoders, cmd_fusion=False)
    assert model.fusion is None and not any(k.startswith("fusion.") for k in model.state_dict())
    loss, _, log = criterion(cmd_weight=0.0)(model.train(), batch)  # SIC alone: every parameter used
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == [] and "cmd_loss" not in log
