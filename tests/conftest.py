import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pytest

# Environment B (fairseq from source, Python 3.10, hydra 1.0; scripts/run_tests.sh runs `-m env_b` there)
# runs every test module except these slow ones, whose parts are tested there one by one: the
# end-to-end demo (each stage's script has its own tests), the two-process gradient equality
# (two gloo workers train and validate in test_train_cli) and the web app in a browser (gradio and
# selenium are environment A's; the search it serves is tested in test_search_service)
ENV_A_ONLY_MODULES = {
    "test_demo",
    "test_global_batch",
    "test_search_app",
    "test_mteb",
}  # mteb needs Python >= 3.11 (environment B is 3.10)


def pytest_configure(config):
    config.addinivalue_line("markers", "env_b: also run in environment B (see tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        if module not in ENV_A_ONLY_MODULES:
            item.add_marker(pytest.mark.env_b)


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory):
    """Tiny HuBERT (release layout, normalize=True) and tiny open_clip model, built once."""
    from cmd_demo.tiny_encoders import make_tiny_clip, make_tiny_hubert

    root = tmp_path_factory.mktemp("tiny_encoders")
    hubert = make_tiny_hubert(str(root / "tiny_hubert.pt"), seed=0)
    name, config, weights = make_tiny_clip(str(root / "tiny_clip"), seed=0)
    return {"hubert_path": hubert, "image_model": name, "image_model_config": config, "image_pretrained": weights}
