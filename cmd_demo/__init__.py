"""cmd_demo: the scaffolding of the CPU demo, the tests and the benchmarks; no part of the method.

Installed next to :mod:`cmd_plugin` (``pip install --no-build-isolation -e .``) so that the scripts
in ``examples/``, the tests and the benchmarks import it by name. It may import ``cmd_plugin``;
``cmd_plugin`` never imports it (``tests/test_packaging.py`` checks). Importing this package
imports nothing else: each module pulls in only what it needs. The scripts of ``examples/`` named
below are the command lines; they parse options and call these modules.

* :mod:`cmd_demo.tiny_encoders`: tiny random HuBERT / open_clip checkpoints in the released
  formats (``examples/make_tiny_encoders.py``, the tests' ``tiny_encoders`` fixture), and
  random-weight ones of the real HuBERT architectures (benchmarks).
* :mod:`cmd_demo.scene_corpus`: the generated spoken-scene corpus in the Flickr 8k layout
  (``examples/generate_scene_corpus.py``).
* :mod:`cmd_demo.clip_pretraining`: image-text pre-training of the tiny CLIP on a manifest's
  written captions (``examples/pretrain_tiny_clip.py``).
* :mod:`cmd_demo.minimal_pairs` and :mod:`cmd_demo.minimal_pairs_scoring`: the minimal-pairs test
  set beside a generated corpus, and a checkpoint's score on it
  (``examples/generate_minimal_pairs.py``, ``examples/score_minimal_pairs.py``).
* :mod:`cmd_demo.demo`: the demo's stages, each the ``examples/`` script a user runs on real
  data (``examples/demo.py``).
* :mod:`cmd_demo.ablation`: rows x seeds over the demo's stages, the table and the plot
  (``examples/ablation.py``).
"""
