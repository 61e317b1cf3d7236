from . import cmd_contrastive  # noqa: F401
