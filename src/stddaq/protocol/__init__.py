"""The wire messages shared with the C++ std_daq, and the maps between their enums and numpy.

The ``*_pb2`` modules are generated from the ``.proto`` files beside this one and committed, so
users need only the protobuf runtime (pinned in pyproject.toml to at least the generator's
version). Regenerate after editing a ``.proto`` file, from ``src/``::

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. stddaq/protocol/*.proto
"""

from __future__ import annotations

import numpy as np

from stddaq.protocol.buffered_metadata_pb2 import BufferedMetadata
from stddaq.protocol.image_buffer_pb2 import Ack, NextImageResponse, NoImages, RequestNextImage
from stddaq.protocol.image_metadata_pb2 import (
    EGImageMetadata,
    GFImageMetadata,
    ImageMetadata,
    ImageMetadataCompression,
    ImageMetadataDtype,
    ImageMetadataStatus,
    JFImageMetadata,
    PcoImageMetadata,
)
from stddaq.protocol.writer_action_pb2 import (
    CloseFile,
    ConfirmLastImageWritten,
    CreateFileCommand,
    RecordImage,
    ResponseCode,
    WriterAction,
    WriterResponse,
)

__all__ = [
    "Ack",
    "BufferedMetadata",
    "CloseFile",
    "ConfirmLastImageWritten",
    "CreateFileCommand",
    "EGImageMetadata",
    "GFImageMetadata",
    "ImageMetadata",
    "ImageMetadataCompression",
    "ImageMetadataDtype",
    "ImageMetadataStatus",
    "JFImageMetadata",
    "NextImageResponse",
    "NoImages",
    "PcoImageMetadata",
    "RecordImage",
    "RequestNextImage",
    "ResponseCode",
    "WriterAction",
    "WriterResponse",
    "DTYPE_TO_NUMPY",
    "NUMPY_TO_DTYPE",
    "numpy_dtype",
    "protocol_dtype",
]

#: Metadata dtype enum value -> numpy dtype (little endian, as the ring buffer holds it).
DTYPE_TO_NUMPY: dict[int, np.dtype] = {
    ImageMetadataDtype.uint8: np.dtype("<u1"),
    ImageMetadataDtype.uint16: np.dtype("<u2"),
    ImageMetadataDtype.uint32: np.dtype("<u4"),
    ImageMetadataDtype.uint64: np.dtype("<u8"),
    ImageMetadataDtype.int8: np.dtype("<i1"),
    ImageMetadataDtype.int16: np.dtype("<i2"),
    ImageMetadataDtype.int32: np.dtype("<i4"),
    ImageMetadataDtype.int64: np.dtype("<i8"),
    ImageMetadataDtype.float16: np.dtype("<f2"),
    ImageMetadataDtype.float32: np.dtype("<f4"),
    ImageMetadataDtype.float64: np.dtype("<f8"),
}
NUMPY_TO_DTYPE: dict[np.dtype, int] = {v: k for k, v in DTYPE_TO_NUMPY.items()}


def numpy_dtype(dtype_enum: int) -> np.dtype:
    """The numpy dtype of a metadata ``dtype`` value; ValueError names an unknown value."""
    try:
        return DTYPE_TO_NUMPY[dtype_enum]
    except KeyError:
        allowed = ", ".join(f"{ImageMetadataDtype.Name(k)}={k}" for k in DTYPE_TO_NUMPY)
        raise ValueError(f"metadata dtype {dtype_enum} is not a known image dtype (allowed: {allowed})") from None


def protocol_dtype(dtype: np.dtype | str | type) -> int:
    """The metadata ``dtype`` value of a numpy dtype; ValueError names an unsupported dtype."""
    key = np.dtype(dtype).newbyteorder("<")
    try:
        return NUMPY_TO_DTYPE[key]
    except KeyError:
        raise ValueError(f"numpy dtype {np.dtype(dtype)} has no std_daq metadata dtype") from None
