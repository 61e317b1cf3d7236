from . import speech_image  # noqa: F401
