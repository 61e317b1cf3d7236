import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "env_b: also run in environment B (fairseq from source, Python 3.10; scripts/run_tests.sh)"
    )


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory):
    """Tiny HuBERT (release layout, normalize=True) and tiny open_clip model, built once."""
    from cmd_plugin.tiny_encoders import make_tiny_clip, make_tiny_hubert

    root = tmp_path_factory.mktemp("tiny_encoders")
    hubert = make_tiny_hubert(str(root / "tiny_hubert.pt"), seed=0)
    name, config, weights = make_tiny_clip(str(root / "tiny_clip"), seed=0)
    return {"hubert_path": hubert, "image_model": name, "image_model_config": config, "image_pretrained": weights}
