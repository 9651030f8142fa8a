"""Wire formats and codecs: pure encode/decode functions, no sockets, no logging."""


class FormatError(ValueError):
    """A stream message that is not what its format says; the text names the bad part or field."""


def type_name(dtype, types: dict, format_name: str) -> str:
    """The stream "type" of a numpy dtype in a format whose allowed types are ``types``;
    FormatError if that format cannot carry it (big endian, or a type it lacks)."""
    import numpy as np

    dtype = np.dtype(dtype)
    name = dtype.newbyteorder("=").name
    if name not in types or dtype.byteorder == ">":
        raise FormatError(f"dtype {dtype} is not representable in {format_name} (allowed: {', '.join(types)})")
    return name
