"""array-1.0 and bsread: golden bytes, round trips, independent decoders, one test per rejection."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import bitshuffle
import numpy as np
import pytest

from stddaq.formats import FormatError, array10, bsread
from stddaq.formats.compression import bitshuffle_lz4_encode
from stddaq.patterns import ramp

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------- array-1.0
def test_array10_golden_bytes() -> None:
    pixels = ramp(42, (6, 10), "uint16")
    header, data = array10.encode(42, pixels)
    assert header == (DATA / "array10_frame42_6x10_uint16.header.json").read_bytes()
    assert header == b'{"htype":"array-1.0", "shape":[6,10], "type":"uint16", "frame":42}'
    assert data.tobytes() == (DATA / "array10_frame42_6x10_uint16.data").read_bytes()
    fields, decoded = array10.decode([header, (DATA / "array10_frame42_6x10_uint16.data").read_bytes()])
    assert fields == {"htype": "array-1.0", "shape": [6, 10], "type": "uint16", "frame": 42}
    assert np.array_equal(decoded, pixels)


@pytest.mark.parametrize("dtype", list(array10.TYPES))
def test_array10_round_trip(dtype: str) -> None:
    pixels = ramp(7, (5, 9), "uint16").astype(dtype)
    header, data = array10.encode(2**40, pixels)
    assert json.loads(header)["type"] == dtype
    fields, decoded = array10.decode([header, bytes(data)])
    assert fields["frame"] == 2**40 and decoded.dtype == np.dtype(dtype) and np.array_equal(decoded, pixels)


def test_array10_encoder_prefix_is_reused() -> None:
    encoder = array10.Array10Encoder((480, 128), "uint16")
    assert encoder.header(0) == b'{"htype":"array-1.0", "shape":[480,128], "type":"uint16", "frame":0}'
    assert encoder.header(123456789) == array10.encode_header(123456789, (480, 128), np.uint16)


def _a10(**fields) -> bytes:
    header = {"htype": "array-1.0", "shape": [2, 3], "type": "uint16", "frame": 1, **fields}
    return json.dumps({k: v for k, v in header.items() if v is not None}).encode()


@pytest.mark.parametrize("parts,field", [
    ([_a10()], "1 parts, expected 2"),
    ([b"{not json", bytes(12)], "not JSON"),
    ([b"[1, 2]", bytes(12)], "JSON object"),
    ([_a10(htype="array-2.0"), bytes(12)], "'htype'"),
    ([_a10(shape=[2]), bytes(12)], "'shape'"),
    ([_a10(shape=[2, 0]), bytes(12)], "'shape'"),
    ([_a10(shape=[2, "3"]), bytes(12)], "'shape'"),
    ([_a10(type="complex64"), bytes(12)], "'type'"),
    ([_a10(type=[]), bytes(12)], r"'type' is \[\] \(allowed: uint8"),  # was TypeError: it stopped the receiver
    ([_a10(type={"a": 1}), bytes(12)], "'type'"),
    ([_a10(frame=-1), bytes(12)], "'frame'"),
    ([_a10(frame=None), bytes(12)], "'frame'"),
    ([_a10(endianness="big"), bytes(12)], "'endianness'"),
    ([_a10(), bytes(11)], "11 bytes"),
])
def test_array10_rejects(parts: list, field: str) -> None:
    with pytest.raises(FormatError, match=field):
        array10.decode(parts)


@pytest.mark.parametrize("dtype", ["int16", "float64", ">u2"])
def test_array10_refuses_to_encode_types_it_cannot_carry(dtype: str) -> None:
    with pytest.raises(FormatError, match="not representable in array-1.0"):
        array10.Array10Encoder((2, 2), dtype)


# ---------------------------------------------------------------- bsread
def _golden_parts() -> list[bytes]:
    return [(DATA / f"bsread_pulse42_6x10_uint16.part{i}").read_bytes() for i in range(1, 5)]


def test_bsread_golden_bytes() -> None:
    pixels = ramp(42, (6, 10), "uint16")
    golden = _golden_parts()
    parts = bsread.BsreadEncoder((6, 10), "uint16").parts(42, "det:image", 1700000000, 123456789,
                                                           bitshuffle_lz4_encode(pixels).tobytes())
    assert parts[0] == golden[0] and parts[1] == golden[1] and parts[3] == golden[3]
    assert golden[1] == (b'{"htype":"bsr_d-1.1","channels":[{"name":"det:image","shape":[10,6],"type":"uint16",'
                         b'"compression":"bitshuffle_lz4"}]}')
    assert json.loads(golden[0])["hash"] == hashlib.md5(golden[1]).hexdigest()
    assert golden[3] == (1700000000).to_bytes(8, "little") + (123456789).to_bytes(8, "little")
    # the blob is a filter-32008 chunk: header + what bitshuffle itself decodes
    assert golden[2][:12] == (120).to_bytes(8, "big") + (8192).to_bytes(4, "big")
    body = np.frombuffer(golden[2], np.uint8)[12:]
    assert np.array_equal(bitshuffle.decompress_lz4(body, (6, 10), np.dtype("uint16"), 4096), pixels)
    main, channel, decoded = bsread.decode(golden)
    assert main["pulse_id"] == 42 and main["global_timestamp"] == {"sec": 1700000000, "ns": 123456789}
    assert channel == bsread.BsreadChannel("det:image", (6, 10), "uint16")
    assert np.array_equal(decoded, pixels)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "float32", "int16", "float64"])
def test_bsread_round_trip(dtype: str) -> None:
    pixels = ramp(3, (33, 17), "uint16").astype(dtype)
    parts = bsread.BsreadEncoder((33, 17), dtype).parts(9, "x:y", 5, 6, bitshuffle_lz4_encode(pixels))
    main, channel, decoded = bsread.decode([bytes(p) for p in parts])
    assert main["pulse_id"] == 9 and channel.shape == (33, 17) and np.array_equal(decoded, pixels)


def test_bsread_reads_uncompressed_channels_and_empty_timestamps() -> None:
    pixels = ramp(3, (4, 5), "uint16")
    channel = bsread.BsreadChannel("a", (4, 5), "uint16", compression="none")
    data_header = bsread.encode_data_header(channel)
    main = bsread.encode_main_header(1, 0, 0, hashlib.md5(data_header).hexdigest())
    _, decoded_channel, decoded = bsread.decode([main, data_header, pixels.tobytes(), b""])
    assert decoded_channel == channel and np.array_equal(decoded, pixels)


def _bs(main: dict | None = None, channel: dict | None = None, data: bytes | None = None,
        timestamp: bytes = bytes(16), fix_hash: bool = True) -> list[bytes]:
    pixels = ramp(1, (2, 8), "uint16")
    ch = {"name": "c", "shape": [8, 2], "type": "uint16", "compression": "bitshuffle_lz4", **(channel or {})}
    data_header = json.dumps({"htype": "bsr_d-1.1", "channels": [ch]}).encode()
    m = {"htype": "bsr_m-1.1", "pulse_id": 1, "hash": hashlib.md5(data_header).hexdigest(), **(main or {})}
    if not fix_hash:
        m["hash"] = "0" * 32
    blob = bitshuffle_lz4_encode(pixels).tobytes() if data is None else data
    return [json.dumps(m).encode(), data_header, blob, timestamp]


@pytest.mark.parametrize("parts,field", [
    (_bs()[:3], "3 parts"),
    ([b"nope", *_bs()[1:]], "main header is not JSON"),
    (_bs(main={"htype": "bsr_m-1.0"}), "'htype'"),
    (_bs(main={"pulse_id": "7"}), "'pulse_id'"),
    (_bs(main={"hash": None}), "'hash'"),
    (_bs(main={"dh_compression": "bitshuffle_lz4"}), "'dh_compression'"),
    (_bs(fix_hash=False), "md5"),
    (_bs(channel={"shape": [8]}), "'shape'"),
    (_bs(channel={"type": "string"}), "'type'"),
    (_bs(channel={"type": ["x"]}), r"'type' is \['x'\]"),  # was TypeError: it stopped the receiver
    (_bs(channel={"compression": "lz4"}), "'compression'"),
    (_bs(channel={"compression": {}}), "'compression' is {}"),
    (_bs(channel={"name": 3}), "'name'"),
    (_bs(channel={"encoding": "big"}), "'encoding'"),
    (_bs(channel={"shape": [8, 3]}), "header says 32 bytes"),
    (_bs(data=b"\x00" * 5), "shorter than its 12-byte header"),
    (_bs(data=bitshuffle_lz4_encode(ramp(1, (2, 8), "uint16")).tobytes()[:-3]), "bitshuffle-lz4"),
    (_bs(channel={"compression": "none"}, data=bytes(31)), "31 bytes"),
    (_bs(timestamp=bytes(8)), "timestamp part"),
])
def test_bsread_rejects(parts: list, field: str) -> None:
    with pytest.raises(FormatError, match=field):
        bsread.decode(parts)


def test_bsread_rejects_several_channels() -> None:
    parts = _bs()
    header = json.loads(parts[1])
    header["channels"].append(dict(header["channels"][0], name="d"))
    parts[1] = json.dumps(header).encode()
    parts[0] = json.dumps(dict(json.loads(parts[0]), hash=hashlib.md5(parts[1]).hexdigest())).encode()
    with pytest.raises(FormatError, match="exactly one image channel"):
        bsread.decode(parts)


def test_bsread_refuses_to_encode_types_it_cannot_carry() -> None:
    with pytest.raises(FormatError, match="not representable in bsread"):
        bsread.BsreadEncoder((2, 2), "float16")
