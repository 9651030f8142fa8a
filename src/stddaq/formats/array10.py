"""array-1.0 (PSI htypes): the live stream's default format (SPEC section 5).

A message has two parts: a JSON header, byte for byte as the C++ std_daq writes it (a space after
each top-level comma)::

    {"htype":"array-1.0", "shape":[H,W], "type":"uint16", "frame":ID}

and the raw pixels, little endian, C order. Only raw pixels travel: a compressed bus image is
decoded before it is encoded here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from stddaq.formats import MAX_IMAGE_ID, FormatError, check_choice, check_integer
from stddaq.formats import type_name as _type_name

HTYPE = "array-1.0"
#: What the live stream may send (SPEC 5); other dtypes are not representable and are skipped.
TYPES: dict[str, np.dtype] = {name: np.dtype(name).newbyteorder("<") for name in
                              ("uint8", "uint16", "uint32", "uint64", "float32")}
#: What a reader accepts: other array-1.0 producers also send signed and float64 images.
READ_TYPES: dict[str, np.dtype] = {**TYPES, **{name: np.dtype(name).newbyteorder("<") for name in
                                               ("int8", "int16", "int32", "int64", "float64")}}


@dataclass(frozen=True)
class Array10Header:
    frame: int
    shape: tuple[int, int]
    type: str

    @property
    def dtype(self) -> np.dtype:
        return READ_TYPES[self.type]

    @property
    def n_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize


def type_name(dtype: np.dtype | str) -> str:
    """The array-1.0 "type" of a numpy dtype; FormatError if array-1.0 cannot carry it."""
    return _type_name(dtype, TYPES, "array-1.0")


class Array10Encoder:
    """Headers for one image shape and type: the constant prefix is built once, per image only the id."""

    def __init__(self, shape: tuple[int, int], dtype: np.dtype | str) -> None:
        height, width = shape
        self.shape = (int(height), int(width))
        self.type = type_name(dtype)
        self._prefix = f'{{"htype":"{HTYPE}", "shape":[{height},{width}], "type":"{self.type}", "frame":'.encode()

    def header(self, frame: int) -> bytes:
        return self._prefix + str(int(frame)).encode() + b"}"


def encode_header(frame: int, shape: tuple[int, int], dtype: np.dtype | str) -> bytes:
    return Array10Encoder(shape, dtype).header(frame)


def encode(frame: int, pixels: np.ndarray) -> list:
    """The two parts of one image: header bytes and the C-order little-endian pixels."""
    if pixels.ndim != 2:
        raise FormatError(f"array-1.0 carries 2-d images, got shape {pixels.shape}")
    header = encode_header(frame, pixels.shape, pixels.dtype)
    return [header, np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))]


def decode_header(data: bytes | memoryview) -> Array10Header:
    return _check(_parse(data))


def _parse(data: bytes | memoryview) -> dict:
    try:
        header = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"array-1.0 header is not JSON: {exc}") from None
    except RecursionError:  # "[[[[..." nested beyond Python's limit: it was the end of the service
        raise FormatError("array-1.0 header is JSON nested too deeply to be a header") from None
    if not isinstance(header, dict):
        raise FormatError(f"array-1.0 header must be a JSON object, got {type(header).__name__}")
    return header


def _check(header: dict) -> Array10Header:
    if header.get("htype") != HTYPE:
        raise FormatError(f"array-1.0 header field 'htype' is {header.get('htype')!r}, expected {HTYPE!r}")
    shape = header.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise FormatError(f"array-1.0 header field 'shape' is {shape!r}, expected [height, width] of integers > 0")
    kind = check_choice(header.get("type"), "array-1.0 header field 'type'", READ_TYPES)
    frame = check_integer(header.get("frame"), "array-1.0 header field 'frame'", MAX_IMAGE_ID)
    if header.get("endianness", "little") != "little":
        raise FormatError(f"array-1.0 header field 'endianness' is {header['endianness']!r}, only 'little' is read")
    return Array10Header(frame, (shape[0], shape[1]), kind)


def decode(parts: list) -> tuple[dict, np.ndarray]:
    """(header dict, pixels) of one message; the pixels view the data part (no copy)."""
    if len(parts) != 2:
        raise FormatError(f"array-1.0 message has {len(parts)} parts, expected 2 (header, data)")
    fields = _parse(parts[0])
    header = _check(fields)
    data = memoryview(parts[1])
    if data.nbytes != header.n_bytes:
        raise FormatError(f"array-1.0 data part of frame {header.frame} has {data.nbytes} bytes, "
                          f"shape {list(header.shape)} {header.type} needs {header.n_bytes}")
    pixels = np.frombuffer(data, header.dtype).reshape(header.shape)
    return fields, pixels


#: GigaFRoST fields a camera's array-1.0 header may carry, as upstream's std_array10_recv reads
#: them into ImageMetadata.gf: header key -> (field, highest value)
GF_HEADER_FIELDS = {"exposure_time": ("exposure_time", (1 << 64) - 1), "timestamp": ("frame_timestamp", (1 << 64) - 1),
                    "scan_id": ("scan_id", (1 << 32) - 1), "scan_time": ("scan_time", (1 << 32) - 1),
                    "sync_time": ("sync_time", (1 << 32) - 1)}


def gigafrost_fields(header: dict) -> tuple[dict | None, list[str]]:
    """The GFImageMetadata fields of a GigaFRoST's header (None: it has none of them), and what
    was wrong with the others: a value that is no integer in its field's range is left out (the
    image is still good), named. ``do_not_store`` true makes store_image false (images a
    std_delay_filter then drops); absent, true."""
    if not any(key in header for key in (*GF_HEADER_FIELDS, "do_not_store")):
        return None, []
    fields, problems = {}, []
    for key, (field, high) in GF_HEADER_FIELDS.items():
        if key not in header:
            continue
        value = header[key]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        try:
            fields[field] = check_integer(value, f"array-1.0 header field {key!r}", high)
        except FormatError as exc:
            problems.append(str(exc))
    do_not_store = header.get("do_not_store", False)
    if isinstance(do_not_store, bool):
        fields["store_image"] = not do_not_store
    else:
        problems.append(f"array-1.0 header field 'do_not_store' is {do_not_store!r}, expected true or false")
        fields["store_image"] = True
    return fields, problems
