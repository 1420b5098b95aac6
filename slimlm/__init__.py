"""slimlm: distil, prune, quantize and serve small language models.

Every stage is a function over Hugging Face model directories; see README.md for the map.
"""

__version__ = "0.1.0"


class SlimlmError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with ``exit_code``."""

    exit_code = 2


class AssetError(SlimlmError):
    """An offline asset could not be fetched or failed its checksum."""


class InvalidValue(SlimlmError):
    """A setting outside what slimlm can take; ``field`` names it (the server reports it as the error's param)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
