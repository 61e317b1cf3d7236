"""cmd_plugin: speech-image retrieval (Cross-Modal Denoising) as a fairseq --user-dir plugin.

Install (Python 3.11): torch and torchvision first, then this package without build isolation,
so that fairseq-fixed (an sdist) compiles against the torch already installed:

    pip install torch==2.14.1 torchvision==0.29.1 cython "numpy<2.4"
    pip install --no-build-isolation -e . --config-settings editable_mode=compat

``scripts/install.sh`` does exactly this in a virtual environment.
"""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    name="cmd_plugin",
    version="0.1.0",
    description="Cross-Modal Denoising speech-image retrieval as a fairseq user-dir plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["cmd_plugin", "cmd_plugin.*"])
    # hydra discovers plugins in the ``hydra_plugins`` namespace package (no __init__.py there)
    + find_namespace_packages(include=["hydra_plugins.*"]),
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "fairseq-fixed==0.12.3.1",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "open_clip_torch>=3.3,<4",
        "numpy<2.4",
        "soundfile",
        "sentencepiece",
        "tqdm",
        "pillow",
    ],
    extras_require={"test": ["pytest", "pyyaml"]},
)
