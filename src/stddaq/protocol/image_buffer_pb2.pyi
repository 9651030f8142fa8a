from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestNextImage(_message.Message):
    __slots__ = ("image_id", "new_request")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_REQUEST_FIELD_NUMBER: _ClassVar[int]
    image_id: int
    new_request: bool
    def __init__(self, image_id: _Optional[int] = ..., new_request: _Optional[bool] = ...) -> None: ...

class NoImages(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Ack(_message.Message):
    __slots__ = ("image_id",)
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    image_id: int
    def __init__(self, image_id: _Optional[int] = ...) -> None: ...

class NextImageResponse(_message.Message):
    __slots__ = ("no_image", "ack")
    NO_IMAGE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    no_image: NoImages
    ack: Ack
    def __init__(self, no_image: _Optional[_Union[NoImages, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ...) -> None: ...
