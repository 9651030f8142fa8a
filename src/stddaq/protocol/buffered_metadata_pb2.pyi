from stddaq.protocol import image_metadata_pb2 as _image_metadata_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BufferedMetadata(_message.Message):
    __slots__ = ("metadata", "offset")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    metadata: _image_metadata_pb2.ImageMetadata
    offset: int
    def __init__(self, metadata: _Optional[_Union[_image_metadata_pb2.ImageMetadata, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...
