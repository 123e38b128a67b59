from percept.v1 import image_pb2 as _image_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpscaleRequest(_message.Message):
    __slots__ = ("image", "scale", "output_format", "model", "quality")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    scale: int
    output_format: _image_pb2.ImageFormat
    model: str
    quality: int
    def __init__(self, image: _Optional[bytes] = ..., scale: _Optional[int] = ..., output_format: _Optional[_Union[_image_pb2.ImageFormat, str]] = ..., model: _Optional[str] = ..., quality: _Optional[int] = ...) -> None: ...

class UpscaleResponse(_message.Message):
    __slots__ = ("image", "width", "height", "model", "format")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    width: int
    height: int
    model: str
    format: _image_pb2.ImageFormat
    def __init__(self, image: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., model: _Optional[str] = ..., format: _Optional[_Union[_image_pb2.ImageFormat, str]] = ...) -> None: ...
