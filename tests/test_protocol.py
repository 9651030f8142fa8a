"""The protobuf messages: exact bytes shared with the C++ std_daq, and the dtype maps."""

from __future__ import annotations

import numpy as np
import pytest

from stddaq import protocol as p


def test_image_metadata_bytes_are_pinned() -> None:
    message = p.ImageMetadata(image_id=42, height=2, width=4, size=29, dtype=p.ImageMetadataDtype.uint16,
                              status=p.ImageMetadataStatus.good_image,
                              compression=p.ImageMetadataCompression.h5bitshuffle_lz4)
    assert message.SerializeToString() == bytes.fromhex("082a1002180420 1d280230013801".replace(" ", ""))


def test_enum_values_match_upstream() -> None:
    assert [p.ImageMetadataDtype.Value(n) for n in ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32",
                                                    "int64", "float16", "float32", "float64")] == \
        [1, 2, 4, 8, 11, 12, 14, 18, 22, 24, 28]
    assert [p.ImageMetadataStatus.Value(n) for n in ("undefined", "good_image", "missing_packets", "id_missmatch")] == \
        [0, 1, 2, 3]
    assert [p.ImageMetadataCompression.Value(n) for n in ("none", "h5bitshuffle_lz4", "blosc2")] == [0, 1, 2]


def test_detector_specific_fields_and_oneof() -> None:
    message = p.ImageMetadata(image_id=1, gf=p.GFImageMetadata(scan_id=3, frame_timestamp=2**40, store_image=True))
    assert message.WhichOneof("image_metadata") == "gf"
    message.pco.bsread_name = "X:FPICTURE"
    assert message.WhichOneof("image_metadata") == "pco"
    again = p.ImageMetadata.FromString(message.SerializeToString())
    assert again.pco.bsread_name == "X:FPICTURE" and not again.HasField("gf")
    # field 11 (pco) is a length-delimited field: tag byte 0x5a
    assert b"\x5a" in message.SerializeToString()


def test_control_messages_round_trip() -> None:
    action = p.WriterAction(create_file=p.CreateFileCommand(path="/data/f.h5", writer_id=3))
    assert p.WriterAction.FromString(action.SerializeToString()).create_file.writer_id == 3
    record = p.WriterAction(record_image=p.RecordImage(image_metadata=p.ImageMetadata(image_id=7)))
    assert record.SerializeToString() == bytes.fromhex("12 04 0a 02 08 07".replace(" ", ""))
    assert p.WriterResponse(code=p.ResponseCode.FAILURE, reason="x").SerializeToString() == b"\x08\x02\x12\x01x"
    assert p.RequestNextImage(image_id=5, new_request=True).SerializeToString() == b"\x08\x05\x10\x01"
    assert p.NextImageResponse(ack=p.Ack(image_id=9)).SerializeToString() == b"\x12\x02\x08\x09"
    assert p.NextImageResponse(no_image=p.NoImages()).SerializeToString() == b"\x0a\x00"
    buffered = p.BufferedMetadata(metadata=p.ImageMetadata(image_id=1), offset=300)
    assert p.BufferedMetadata.FromString(buffered.SerializeToString()).offset == 300


@pytest.mark.parametrize("name", ["uint8", "uint16", "uint32", "uint64", "int16", "float32", "float64"])
def test_dtype_maps(name: str) -> None:
    assert p.numpy_dtype(p.protocol_dtype(name)) == np.dtype(name)


def test_dtype_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="metadata dtype 99"):
        p.numpy_dtype(99)
    with pytest.raises(ValueError, match="complex64"):
        p.protocol_dtype(np.complex64)
