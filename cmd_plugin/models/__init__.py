from . import cmd_speech_image  # noqa: F401
