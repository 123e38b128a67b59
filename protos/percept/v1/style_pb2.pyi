from percept.v1 import image_pb2 as _image_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StyleInit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STYLE_INIT_UNSPECIFIED: _ClassVar[StyleInit]
    STYLE_INIT_CONTENT: _ClassVar[StyleInit]
    STYLE_INIT_BLURRED_NOISE: _ClassVar[StyleInit]

class StyleOptimizer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STYLE_OPTIMIZER_UNSPECIFIED: _ClassVar[StyleOptimizer]
    STYLE_OPTIMIZER_LBFGS: _ClassVar[StyleOptimizer]
    STYLE_OPTIMIZER_ADAM: _ClassVar[StyleOptimizer]
STYLE_INIT_UNSPECIFIED: StyleInit
STYLE_INIT_CONTENT: StyleInit
STYLE_INIT_BLURRED_NOISE: StyleInit
STYLE_OPTIMIZER_UNSPECIFIED: StyleOptimizer
STYLE_OPTIMIZER_LBFGS: StyleOptimizer
STYLE_OPTIMIZER_ADAM: StyleOptimizer

class ListStylesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StyleInfo(_message.Message):
    __slots__ = ("name", "title", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    title: str
    version: str
    def __init__(self, name: _Optional[str] = ..., title: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ListStylesResponse(_message.Message):
    __slots__ = ("styles",)
    STYLES_FIELD_NUMBER: _ClassVar[int]
    styles: _containers.RepeatedCompositeFieldContainer[StyleInfo]
    def __init__(self, styles: _Optional[_Iterable[_Union[StyleInfo, _Mapping]]] = ...) -> None: ...

class StylizeRequest(_message.Message):
    __slots__ = ("image", "style", "preserve_color", "strength", "mask", "output_format", "quality")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    PRESERVE_COLOR_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    style: str
    preserve_color: bool
    strength: float
    mask: bytes
    output_format: _image_pb2.ImageFormat
    quality: int
    def __init__(self, image: _Optional[bytes] = ..., style: _Optional[str] = ..., preserve_color: _Optional[bool] = ..., strength: _Optional[float] = ..., mask: _Optional[bytes] = ..., output_format: _Optional[_Union[_image_pb2.ImageFormat, str]] = ..., quality: _Optional[int] = ...) -> None: ...

class StylizeResponse(_message.Message):
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

class StylizeWithImageRequest(_message.Message):
    __slots__ = ("content_image", "style_image", "iterations", "init", "style_layer_weights", "content_weight", "style_weight", "tv_weight", "preserve_color", "mask", "max_size", "optimizer", "seed", "progress_every", "output_format", "quality")
    class StyleLayerWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CONTENT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STYLE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    STYLE_LAYER_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STYLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TV_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRESERVE_COLOR_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_EVERY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    content_image: bytes
    style_image: bytes
    iterations: int
    init: StyleInit
    style_layer_weights: _containers.ScalarMap[str, float]
    content_weight: float
    style_weight: float
    tv_weight: float
    preserve_color: bool
    mask: bytes
    max_size: int
    optimizer: StyleOptimizer
    seed: int
    progress_every: int
    output_format: _image_pb2.ImageFormat
    quality: int
    def __init__(self, content_image: _Optional[bytes] = ..., style_image: _Optional[bytes] = ..., iterations: _Optional[int] = ..., init: _Optional[_Union[StyleInit, str]] = ..., style_layer_weights: _Optional[_Mapping[str, float]] = ..., content_weight: _Optional[float] = ..., style_weight: _Optional[float] = ..., tv_weight: _Optional[float] = ..., preserve_color: _Optional[bool] = ..., mask: _Optional[bytes] = ..., max_size: _Optional[int] = ..., optimizer: _Optional[_Union[StyleOptimizer, str]] = ..., seed: _Optional[int] = ..., progress_every: _Optional[int] = ..., output_format: _Optional[_Union[_image_pb2.ImageFormat, str]] = ..., quality: _Optional[int] = ...) -> None: ...

class StylizeProgress(_message.Message):
    __slots__ = ("iteration", "iterations", "total_loss", "content_loss", "style_loss", "tv_loss")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LOSS_FIELD_NUMBER: _ClassVar[int]
    STYLE_LOSS_FIELD_NUMBER: _ClassVar[int]
    TV_LOSS_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    iterations: int
    total_loss: float
    content_loss: float
    style_loss: float
    tv_loss: float
    def __init__(self, iteration: _Optional[int] = ..., iterations: _Optional[int] = ..., total_loss: _Optional[float] = ..., content_loss: _Optional[float] = ..., style_loss: _Optional[float] = ..., tv_loss: _Optional[float] = ...) -> None: ...

class StylizeWithImageResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: StylizeProgress
    result: StylizeResponse
    def __init__(self, progress: _Optional[_Union[StylizeProgress, _Mapping]] = ..., result: _Optional[_Union[StylizeResponse, _Mapping]] = ...) -> None: ...
