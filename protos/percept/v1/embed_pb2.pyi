from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbeddingMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMBEDDING_METHOD_UNSPECIFIED: _ClassVar[EmbeddingMethod]
    EMBEDDING_METHOD_DEVISE: _ClassVar[EmbeddingMethod]
    EMBEDDING_METHOD_CONSE: _ClassVar[EmbeddingMethod]
EMBEDDING_METHOD_UNSPECIFIED: EmbeddingMethod
EMBEDDING_METHOD_DEVISE: EmbeddingMethod
EMBEDDING_METHOD_CONSE: EmbeddingMethod

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedImagesRequest(_message.Message):
    __slots__ = ("images", "method")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    method: EmbeddingMethod
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., method: _Optional[_Union[EmbeddingMethod, str]] = ...) -> None: ...

class EmbedImagesResponse(_message.Message):
    __slots__ = ("embeddings", "dimension", "method", "space", "model")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Vector]
    dimension: int
    method: EmbeddingMethod
    space: str
    model: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., dimension: _Optional[int] = ..., method: _Optional[_Union[EmbeddingMethod, str]] = ..., space: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class EmbedTextRequest(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbedTextResponse(_message.Message):
    __slots__ = ("embeddings", "dimension", "space")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Vector]
    dimension: int
    space: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., dimension: _Optional[int] = ..., space: _Optional[str] = ...) -> None: ...

class LabelImageRequest(_message.Message):
    __slots__ = ("image", "k", "method", "under_wnid", "zero_shot", "one_per_word")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    UNDER_WNID_FIELD_NUMBER: _ClassVar[int]
    ZERO_SHOT_FIELD_NUMBER: _ClassVar[int]
    ONE_PER_WORD_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    k: int
    method: EmbeddingMethod
    under_wnid: str
    zero_shot: bool
    one_per_word: bool
    def __init__(self, image: _Optional[bytes] = ..., k: _Optional[int] = ..., method: _Optional[_Union[EmbeddingMethod, str]] = ..., under_wnid: _Optional[str] = ..., zero_shot: _Optional[bool] = ..., one_per_word: _Optional[bool] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("wnid", "lemmas", "gloss", "score")
    WNID_FIELD_NUMBER: _ClassVar[int]
    LEMMAS_FIELD_NUMBER: _ClassVar[int]
    GLOSS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    wnid: str
    lemmas: _containers.RepeatedScalarFieldContainer[str]
    gloss: str
    score: float
    def __init__(self, wnid: _Optional[str] = ..., lemmas: _Optional[_Iterable[str]] = ..., gloss: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class LabelImageResponse(_message.Message):
    __slots__ = ("labels", "method", "model")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    method: EmbeddingMethod
    model: str
    def __init__(self, labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., method: _Optional[_Union[EmbeddingMethod, str]] = ..., model: _Optional[str] = ...) -> None: ...
