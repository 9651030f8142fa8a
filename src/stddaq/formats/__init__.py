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


# ---------------------------------------------------------------- bitshuffle blocks (filter 32008)
# Here, not in formats.compression: the config validates -b with them without loading the codecs.
DEFAULT_BLOCK_BYTES = 8192


def default_block_elements(itemsize: int) -> int:
    """bitshuffle's default block: 8192 bytes worth of elements, a multiple of 8."""
    return max(8, (DEFAULT_BLOCK_BYTES // itemsize) // 8 * 8)


#: the largest block LZ4 compresses in one piece (LZ4_MAX_INPUT_SIZE); the chunk header's field
#: is a u32 and bitshuffle counts a block's elements in a C int, both larger
MAX_BLOCK_BYTES = 0x7E000000


def check_block_bytes(block_bytes: int, itemsize: int) -> int:
    """Elements per block for a ``-b BLOCK_BYTES`` option (0 = default); ValueError if not allowed."""
    if block_bytes > MAX_BLOCK_BYTES:
        raise ValueError(f"block size {block_bytes} bytes is not allowed: must be at most {MAX_BLOCK_BYTES} "
                         "(LZ4's largest input; a block larger than the image gains nothing)")
    if block_bytes < 0:
        raise ValueError(f"block size {block_bytes} is not allowed: must be 0 (default) or a positive multiple of "
                         f"{8 * itemsize} bytes (8 x {itemsize} bytes per pixel)")
    if block_bytes == 0:
        return default_block_elements(itemsize)
    if block_bytes % (8 * itemsize):
        raise ValueError(f"block size {block_bytes} bytes is not a multiple of {8 * itemsize} "
                         f"(8 x {itemsize} bytes per pixel)")
    return block_bytes // itemsize


def check_stream_address(address: str, *, any_port: bool = False) -> None:
    """ValueError unless ``address`` is ``tcp://HOST:PORT`` with PORT 0..65535, what a live stream
    binds (libzmq itself takes port 99999 as 34463, and -5 as 65531, without a word). With
    ``any_port``, PORT may also be ``*`` (libzmq binds a free one)."""
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    if any_port and port == "*":
        port = "0"
    if not address.startswith("tcp://") or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"address {address!r} is not allowed: a live stream is at tcp://HOST:PORT "
                         "(e.g. tcp://0.0.0.0:9100; PORT 0..65535)")
