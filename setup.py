"""cmd_plugin: speech-image retrieval (Cross-Modal Denoising) as a fairseq --user-dir plugin.

Into your existing fairseq environment (fairseq installed from source, its torch and hydra kept):

    pip install --no-build-isolation -e .

``install_requires`` holds version ranges that environment satisfies and never names a fairseq
distribution: any installed ``fairseq`` package of a compatible version is accepted, checked when
cmd_plugin is imported (cmd_plugin/compat.py). For a fresh environment, the ``fairseq`` extra
brings fairseq-fixed (an sdist, compiled against the torch already installed):

    pip install torch torchvision cython -c constraints/env-a.txt
    pip install --no-build-isolation -e ".[fairseq,tensorboard,search,app,lint,test,mteb]" -c constraints/env-a.txt

``scripts/install.sh`` does exactly this in a virtual environment; ``constraints/env-a.txt`` holds
the exact versions tested there, ``constraints/env-b.txt`` those of the existing-fairseq
environment (``scripts/install_env_b.sh``).
"""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    name="cmd_plugin",
    version="0.1.0",
    description="Cross-Modal Denoising speech-image retrieval as a fairseq user-dir plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # 3.10: fairseq installed from source (hydra-core 1.0 / omegaconf 2.0 do not run on 3.11);
    # 3.11+: fairseq-fixed
    python_requires=">=3.10",
    # cmd_demo: the CPU demo's, the tests' and the benchmarks' scaffolding (tiny encoders, the generated
    # corpus, the ablation harness), beside the plugin; cmd_plugin never imports it
    packages=find_packages(include=["cmd_plugin", "cmd_plugin.*", "cmd_demo", "cmd_demo.*"])
    # hydra discovers plugins in the ``hydra_plugins`` namespace package (no __init__.py there)
    + find_namespace_packages(include=["hydra_plugins.*"]),
    # the method config group shared by the corpus configs (hydra_plugins/cmd_plugin_searchpath finds it)
    package_data={"cmd_plugin": ["config/method/*.yaml", "config/recipe/*.yaml"]},
    # ranges tested in both environments (README, "Compatibility"); fairseq itself is not listed
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "hydra-core>=1.0.7,<1.4",
        "omegaconf>=2.0.6,<2.4",
        "open_clip_torch>=3.3,<4",
        # numpy 2.4 breaks fairseq's FileAudioDataset bucketing (np.percentile(interpolation=))
        "numpy>=1.21.3,<2.4",
        "soundfile",
        "sentencepiece",
        "tqdm",
        "pillow",
    ],
    extras_require={
        # a fresh environment's fairseq (Python 3.11+); never needed beside your own fairseq
        "fairseq": ["fairseq-fixed>=0.12.3.1"],
        # fairseq's common.tensorboard_logdir writes through torch.utils.tensorboard
        "tensorboard": ["tensorboard"],
        # nearest-neighbour index for spoken image search
        "search": ["faiss-cpu"],
        # the local web app (examples/search.py serve); gradio 6 caps pillow below 13
        "app": ["gradio>=6,<7"],
        # the ablation harness's plot (examples/ablation.py)
        "plot": ["matplotlib"],
        # fairseq's HuBERT recipe (examples/train_hubert_upstream.py: k-means, MFCC dump, CTC WER)
        # and the upstream probe (examples/probe_upstream.py)
        "recipe": ["scikit-learn", "npy-append-array", "editdistance"],
        # the lint and format checks of the test command and of .pre-commit-config.yaml
        "lint": ["ruff"],
        # selenium drives Debian's chromium + chromium-driver in the web app's browser tests
        "test": ["pytest", "pyyaml", "selenium>=4.20"],
        # MTEB's speech-image retrieval tasks (cmd_plugin/retrieval/mteb_model.py, docs/mteb.md; Python >= 3.11).
        # The full mteb, not the slimmer mteb-core: mteb-core 2.26's mteb.evaluate imports
        # sentence_transformers (docs/mteb.md, "Install"); datasets (with pyarrow) holds the tasks' data
        "mteb": ["mteb>=2.26,<2.27", "datasets"],
    },
)
