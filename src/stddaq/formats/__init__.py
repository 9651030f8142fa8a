"""Wire formats and codecs: pure encode/decode functions, no sockets, no logging."""


class FormatError(ValueError):
    """A stream message that is not what its format says; the text names the bad part or field."""


#: The highest image id a stream may carry: the ring buffer's overwrite guard stores 2 * id + 2
#: in a uint64 (stddaq.bus.ram_buffer).
MAX_IMAGE_ID = (1 << 63) - 2
_UINT64_END = 1 << 64


def check_integer(value, field: str, high: int = _UINT64_END - 1) -> int:
    """``value`` if it is an integer in 0..``high``; else FormatError naming ``field``
    (e.g. "array-1.0 header field 'frame'") and what is allowed."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise FormatError(f"{field} is {value!r}, expected an integer 0..{high}")
    return value


def check_choice(value, field: str, allowed) -> str:
    """``value`` if it is one of the strings ``allowed``; else FormatError naming ``field`` and
    what is allowed (a JSON list or object there is refused, not a TypeError of a dict lookup)."""
    if not isinstance(value, str) or value not in allowed:
        raise FormatError(f"{field} is {value!r} (allowed: {', '.join(allowed)})")
    return value


def type_name(dtype, types: dict, format_name: str) -> str:
    """The stream "type" of a numpy dtype in a format whose allowed types are ``types``;
    FormatError if that format cannot carry it (big endian, or a type it lacks)."""
    import numpy as np

    dtype = np.dtype(dtype)
    name = dtype.newbyteorder("=").name
    if name not in types or dtype.byteorder == ">":
        raise FormatError(f"dtype {dtype} is not representable in {format_name} (allowed: {', '.join(types)})")
    return name
