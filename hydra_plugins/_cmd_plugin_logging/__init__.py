"""The file hydra's job logging writes (``hydra_train.log``), put next to the checkpoints.

The shipped configs run in the current directory (``hydra.run.dir: .``), so hydra's default file
handler would write ``hydra_train.log`` into whatever directory the command was started from (a
checkout, a home directory), one file for every run. The configs point it at
``${checkpoint.save_dir}/hydra_train.log`` with this handler instead: it opens the file only when the
first record is written and creates the directory then, because hydra configures logging before
fairseq creates ``checkpoint.save_dir`` (and a multi-process run logs its ``distributed init`` lines
before that). Appending, like hydra's own: a resumed run continues the same file.

It lives here, not in ``cmd_plugin``, because hydra configures logging before fairseq imports the
plugin, whose import must not move into hydra's logging set-up (its errors would then read "Unable to
configure handler 'file'"); importing this package does not import ``cmd_plugin``. Its name starts
with "_" so that hydra's plugin scan, which loads ``hydra_plugins.*`` modules without binding them to
their parent package (so that dotted paths to them do not resolve), leaves it to an ordinary import.
"""

import logging
import os


class RunLogFileHandler(logging.FileHandler):
    def __init__(self, filename, mode="a", encoding=None):
        super().__init__(filename, mode=mode, encoding=encoding, delay=True)

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()
