import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AddImageRequest(_message.Message):
    __slots__ = ("id", "uri", "image")
    ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    uri: str
    image: bytes
    def __init__(self, id: _Optional[str] = ..., uri: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("id", "code", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    code: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., code: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AddImagesAck(_message.Message):
    __slots__ = ("added", "rejected")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    added: _containers.RepeatedScalarFieldContainer[str]
    rejected: _containers.RepeatedCompositeFieldContainer[Rejection]
    def __init__(self, added: _Optional[_Iterable[str]] = ..., rejected: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ...) -> None: ...

class SearchByTextRequest(_message.Message):
    __slots__ = ("text", "k", "min_score")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    text: str
    k: int
    min_score: float
    def __init__(self, text: _Optional[str] = ..., k: _Optional[int] = ..., min_score: _Optional[float] = ...) -> None: ...

class SearchByImageRequest(_message.Message):
    __slots__ = ("image", "k", "min_score")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    k: int
    min_score: float
    def __init__(self, image: _Optional[bytes] = ..., k: _Optional[int] = ..., min_score: _Optional[float] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "uri", "score")
    ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    uri: str
    score: float
    def __init__(self, id: _Optional[str] = ..., uri: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ...) -> None: ...

class DeleteImagesRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteImagesResponse(_message.Message):
    __slots__ = ("deleted", "missing")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[int] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("count", "index_type", "dimension", "disk_bytes")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    count: int
    index_type: str
    dimension: int
    disk_bytes: int
    def __init__(self, count: _Optional[int] = ..., index_type: _Optional[str] = ..., dimension: _Optional[int] = ..., disk_bytes: _Optional[int] = ...) -> None: ...

class ImageEntry(_message.Message):
    __slots__ = ("id", "uri", "added")
    ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    id: str
    uri: str
    added: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., uri: _Optional[str] = ..., added: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetImagesRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetImagesResponse(_message.Message):
    __slots__ = ("images", "missing")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageEntry]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageEntry, _Mapping]]] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "prefix")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    prefix: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., prefix: _Optional[str] = ...) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images", "next_page_token")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageEntry]
    next_page_token: str
    def __init__(self, images: _Optional[_Iterable[_Union[ImageEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
