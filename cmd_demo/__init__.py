"""cmd_demo: the scaffolding of the CPU demo, the tests and the benchmarks; no part of the method.

Installed next to :mod:`cmd_plugin` (``pip install --no-build-isolation -e .``) so that the scripts
in ``examples/``, the tests and the benchmarks import it by name. It may import ``cmd_plugin``;
``cmd_plugin`` never imports it (``tests/test_packaging.py`` checks). Importing this package
imports nothing else: each module pulls in only what it needs.

* :mod:`cmd_demo.tiny_encoders`: tiny random HuBERT / open_clip checkpoints in the released
  formats (``examples/make_tiny_encoders.py``), and random-weight ones of the real architectures.
* :mod:`cmd_demo.clip_pretraining`: image-text pre-training of the tiny CLIP on a manifest's
  written captions (``examples/pretrain_tiny_clip.py``).
"""
