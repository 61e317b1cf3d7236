"""cmd_plugin: Cross-Modal Denoising speech-image retrieval as a fairseq --user-dir plugin.

Imported by fairseq (``common.user_dir``), the package registers the task ``speech_image``,
the model ``cmd_speech_image`` and the criterion ``cmd_contrastive``, and lets fairseq's own
``torch.load`` read fairseq checkpoints under torch >= 2.6 (:mod:`cmd_plugin.checkpoints`). Without fairseq loaded
(data preparation, recall), importing ``cmd_plugin.data`` or ``cmd_plugin.retrieval.recall`` stays light:
registration then happens when a fairseq-facing module is imported.

Importing the package first checks, without importing fairseq, that the installed ``fairseq``
package (from any distribution) and its hydra/omegaconf are versions cmd_plugin runs with
(:func:`cmd_plugin.compat.check_environment`); otherwise one ImportError says what was found and
what is needed.
"""

import sys

from .compat import check_environment

check_environment()

if "fairseq" in sys.modules:
    from . import criterions, models, tasks  # noqa: F401  (registration side effects)
    from .checkpoints import allow_fairseq_checkpoints_in_torch_load
    from .compat import fix_hubert_ctc_config

    # fairseq's trainer can then resume / fine-tune HuBERT checkpoints under torch >= 2.6, and
    # its HuBERT CTC fine-tuning recipe runs (fairseq issue 4916)
    allow_fairseq_checkpoints_in_torch_load()
    fix_hubert_ctc_config()
