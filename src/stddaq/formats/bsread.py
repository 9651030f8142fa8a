"""bsread (SwissFEL's stream format) for one image channel, as the live stream sends it (SPEC 5).

Four parts:

1. main header ``{"htype":"bsr_m-1.1","pulse_id":ID,"global_timestamp":{"sec":S,"ns":NS},"hash":H}``
   where H is the md5 hex digest of part 2's bytes (readers re-parse part 2 only when H changes);
2. data header ``{"htype":"bsr_d-1.1","channels":[{"name":N,"shape":[W,H],"type":T,
   "compression":"bitshuffle_lz4"}]}``; bsread shapes are fastest dimension first (width first);
3. the image as a bitshuffle-lz4 blob (HDF5 filter 32008 chunk, SPEC 9);
4. the timestamp: 16 bytes ``<qq`` (sec, ns), or empty.

Readers also accept ``"compression":"none"`` (raw pixels in part 3), which other bsread senders use.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stddaq.formats import MAX_IMAGE_ID, FormatError, check_choice, check_integer
from stddaq.formats import type_name as _type_name
from stddaq.formats.compression import CodecError, bitshuffle_lz4_decode

MAIN_HTYPE = "bsr_m-1.1"
DATA_HTYPE = "bsr_d-1.1"
COMPRESSION = "bitshuffle_lz4"
READ_COMPRESSIONS = (COMPRESSION, "none")
TIMESTAMP = struct.Struct("<qq")
TYPES: dict[str, np.dtype] = {name: np.dtype(name).newbyteorder("<") for name in
                              ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
                               "float32", "float64")}


@dataclass(frozen=True)
class BsreadChannel:
    """The one image channel of a message, shape in numpy order (height, width)."""

    name: str
    shape: tuple[int, int]
    type: str
    compression: str = COMPRESSION

    @property
    def dtype(self) -> np.dtype:
        return TYPES[self.type]


def type_name(dtype: np.dtype | str) -> str:
    """The bsread "type" of a numpy dtype; FormatError if bsread cannot carry it."""
    return _type_name(dtype, TYPES, "bsread")


def encode_data_header(channel: BsreadChannel) -> bytes:
    height, width = channel.shape
    return json.dumps({"htype": DATA_HTYPE, "channels": [
        {"name": channel.name, "shape": [width, height], "type": channel.type, "compression": channel.compression}]},
        separators=(",", ":")).encode()


def encode_main_header(pulse_id: int, sec: int, ns: int, data_header_hash: str) -> bytes:
    return (f'{{"htype":"{MAIN_HTYPE}","pulse_id":{int(pulse_id)},"global_timestamp":'
            f'{{"sec":{int(sec)},"ns":{int(ns)}}},"hash":"{data_header_hash}"}}').encode()


def encode_timestamp(sec: int, ns: int) -> bytes:
    """The 16-byte ``<qq`` timestamp part; FormatError for a value it cannot hold."""
    check_integer(sec, "bsread timestamp 'sec'", _INT64_MAX)
    check_integer(ns, "bsread timestamp 'ns'", _INT64_MAX)
    return TIMESTAMP.pack(sec, ns)


_INT64_MAX = (1 << 63) - 1


class BsreadEncoder:
    """Encodes images of one shape and type; the data header and its hash are kept per channel name
    (a pco source names its channel in every image's metadata, usually always the same)."""

    def __init__(self, shape: tuple[int, int], dtype: np.dtype | str) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.type = type_name(dtype)
        self._headers: dict[str, tuple[bytes, str]] = {}

    def data_header(self, name: str) -> tuple[bytes, str]:
        """(data header bytes, md5 hex of them) for channel ``name``."""
        cached = self._headers.get(name)
        if cached is None:
            if len(self._headers) > 64:
                self._headers.clear()
            data_header = encode_data_header(BsreadChannel(name, self.shape, self.type))
            cached = self._headers[name] = (data_header, hashlib.md5(data_header).hexdigest())
        return cached

    def parts(self, pulse_id: int, name: str, sec: int, ns: int, blob) -> list:
        """The four parts; ``blob`` is the filter-32008 chunk of the image (not checked here)."""
        data_header, digest = self.data_header(name)
        return [encode_main_header(pulse_id, sec, ns, digest), data_header, blob, encode_timestamp(sec, ns)]


def decode_main_header(data: bytes | memoryview) -> dict:
    header = _json(data, "main header")
    if header.get("htype") != MAIN_HTYPE:
        raise FormatError(f"bsread main header field 'htype' is {header.get('htype')!r}, expected {MAIN_HTYPE!r}")
    check_integer(header.get("pulse_id"), "bsread main header field 'pulse_id'", MAX_IMAGE_ID)
    stamp = header.get("global_timestamp")
    if stamp is not None:
        if not isinstance(stamp, dict):
            raise FormatError(f"bsread main header field 'global_timestamp' is {stamp!r}, expected "
                              '{"sec": ..., "ns": ...}')
        for key in ("sec", "ns"):
            if key in stamp:
                check_integer(stamp[key], f"bsread main header field 'global_timestamp.{key}'")
    if not isinstance(header.get("hash"), str):
        raise FormatError(f"bsread main header field 'hash' is {header.get('hash')!r}, expected an md5 hex string")
    if header.get("dh_compression") not in (None, "none"):
        raise FormatError(f"bsread main header field 'dh_compression' is {header['dh_compression']!r}, "
                          "only an uncompressed data header is read")
    return header


def decode_data_header(data: bytes | memoryview) -> BsreadChannel:
    header = _json(data, "data header")
    if header.get("htype") != DATA_HTYPE:
        raise FormatError(f"bsread data header field 'htype' is {header.get('htype')!r}, expected {DATA_HTYPE!r}")
    channels = header.get("channels")
    if not isinstance(channels, list) or len(channels) != 1 or not isinstance(channels[0], dict):
        raise FormatError(f"bsread data header field 'channels' must list exactly one image channel, got "
                          f"{len(channels) if isinstance(channels, list) else repr(channels)}")
    channel = channels[0]
    name = channel.get("name")
    if not isinstance(name, str):
        raise FormatError(f"bsread channel field 'name' is {name!r}, expected a string")
    shape = channel.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise FormatError(f"bsread channel {name!r} field 'shape' is {shape!r}, expected [width, height] of integers > 0")
    kind = check_choice(channel.get("type", "float64"), f"bsread channel {name!r} field 'type'", TYPES)
    compression = check_choice(channel.get("compression", "none"), f"bsread channel {name!r} field 'compression'",
                               READ_COMPRESSIONS)
    if channel.get("encoding", "little") != "little":
        raise FormatError(f"bsread channel {name!r} field 'encoding' is {channel['encoding']!r}, only 'little' is read")
    return BsreadChannel(name, (shape[1], shape[0]), kind, compression)


def decode(parts: list, check: Callable[[int, BsreadChannel], None] | None = None
           ) -> tuple[dict, BsreadChannel, np.ndarray]:
    """(main header, channel, pixels) of one message; checks the hash and the blob. ``check(pulse
    id, channel)`` is called before anything is decompressed, to refuse (raise) what its caller
    has no room for: a few hundred bytes claiming 131072x131072 pixels ended a receiver (or its memory)."""
    if len(parts) != 4:
        raise FormatError(f"bsread message has {len(parts)} parts, expected 4 (main header, data header, data, "
                          "timestamp)")
    main = decode_main_header(parts[0])
    data_header = bytes(parts[1])
    digest = hashlib.md5(data_header).hexdigest()
    if main["hash"] != digest:
        raise FormatError(f"bsread main header field 'hash' is {main['hash']!r} but the data header's md5 is {digest!r}")
    channel = decode_data_header(data_header)
    if check is not None:
        check(main["pulse_id"], channel)
    blob = memoryview(parts[2])
    if channel.compression == COMPRESSION:
        try:
            pixels = bitshuffle_lz4_decode(blob, channel.dtype, channel.shape)
        except CodecError as exc:
            raise FormatError(f"bsread data of pulse {main['pulse_id']}: {exc}") from None
    else:
        n_bytes = channel.shape[0] * channel.shape[1] * channel.dtype.itemsize
        if blob.nbytes != n_bytes:
            raise FormatError(f"bsread data of pulse {main['pulse_id']} has {blob.nbytes} bytes, shape "
                              f"{list(channel.shape)} {channel.type} needs {n_bytes}")
        pixels = np.frombuffer(blob, channel.dtype).reshape(channel.shape)
    timestamp = memoryview(parts[3])
    if timestamp.nbytes not in (0, TIMESTAMP.size):
        raise FormatError(f"bsread timestamp part has {timestamp.nbytes} bytes, expected 0 or {TIMESTAMP.size}")
    return main, channel, pixels


def _json(data: bytes | memoryview, what: str) -> dict:
    try:
        value = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"bsread {what} is not JSON: {exc}") from None
    except RecursionError:  # "[[[[..." nested beyond Python's limit: it was the end of the service
        raise FormatError(f"bsread {what} is JSON nested too deeply to be a header") from None
    if not isinstance(value, dict):
        raise FormatError(f"bsread {what} must be a JSON object, got {type(value).__name__}")
    return value
