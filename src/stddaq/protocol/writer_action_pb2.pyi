from stddaq.protocol import image_metadata_pb2 as _image_metadata_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResponseCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNKNOWN: _ClassVar[ResponseCode]
    SUCCESS: _ClassVar[ResponseCode]
    FAILURE: _ClassVar[ResponseCode]
UNKNOWN: ResponseCode
SUCCESS: ResponseCode
FAILURE: ResponseCode

class CreateFileCommand(_message.Message):
    __slots__ = ("path", "writer_id")
    PATH_FIELD_NUMBER: _ClassVar[int]
    WRITER_ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    writer_id: int
    def __init__(self, path: _Optional[str] = ..., writer_id: _Optional[int] = ...) -> None: ...

class RecordImage(_message.Message):
    __slots__ = ("image_metadata", "run")
    IMAGE_METADATA_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    image_metadata: _image_metadata_pb2.ImageMetadata
    run: int
    def __init__(self, image_metadata: _Optional[_Union[_image_metadata_pb2.ImageMetadata, _Mapping]] = ..., run: _Optional[int] = ...) -> None: ...

class CloseFile(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConfirmLastImageWritten(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WriterAction(_message.Message):
    __slots__ = ("create_file", "record_image", "close_file", "confirm_last_image")
    CREATE_FILE_FIELD_NUMBER: _ClassVar[int]
    RECORD_IMAGE_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FILE_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_LAST_IMAGE_FIELD_NUMBER: _ClassVar[int]
    create_file: CreateFileCommand
    record_image: RecordImage
    close_file: CloseFile
    confirm_last_image: ConfirmLastImageWritten
    def __init__(self, create_file: _Optional[_Union[CreateFileCommand, _Mapping]] = ..., record_image: _Optional[_Union[RecordImage, _Mapping]] = ..., close_file: _Optional[_Union[CloseFile, _Mapping]] = ..., confirm_last_image: _Optional[_Union[ConfirmLastImageWritten, _Mapping]] = ...) -> None: ...

class WriterResponse(_message.Message):
    __slots__ = ("code", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: ResponseCode
    reason: str
    def __init__(self, code: _Optional[_Union[ResponseCode, str]] = ..., reason: _Optional[str] = ...) -> None: ...
