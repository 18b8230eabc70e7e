"""User-facing errors.

Every failure a user can cause (bad path, corrupt file, unsupported model, prompt too long)
raises an `EdgeVLMError` whose message is one readable line; the CLI prints it and exits
non-zero instead of showing a traceback.
"""


class EdgeVLMError(Exception):
    """Base class: the message is meant for the user, as is."""


class CheckpointError(EdgeVLMError):
    """A model folder or weight file is missing, truncated or inconsistent."""


class UnsupportedModelError(EdgeVLMError):
    """The checkpoint's architecture is not one this runtime implements."""


class MediaError(EdgeVLMError):
    """An image or video could not be read."""


class ContextOverflowError(EdgeVLMError):
    """The prompt (text plus image tokens) does not fit in the context window."""
