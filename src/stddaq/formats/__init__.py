"""Wire formats and codecs: pure encode/decode functions, no sockets, no logging."""


class FormatError(ValueError):
    """A stream message that is not what its format says; the text names the bad part or field."""
