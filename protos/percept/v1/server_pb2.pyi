from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("service", "name", "artifact", "version", "is_default")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    service: str
    name: str
    artifact: str
    version: int
    is_default: bool
    def __init__(self, service: _Optional[str] = ..., name: _Optional[str] = ..., artifact: _Optional[str] = ..., version: _Optional[int] = ..., is_default: _Optional[bool] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_message_bytes", "max_pixels", "max_inflight_pixels", "max_queue", "max_batch", "max_iterations", "max_optimisations", "max_concurrent_rpcs", "fair_share", "min_client_ping_ms")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_OPTIMISATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_RPCS_FIELD_NUMBER: _ClassVar[int]
    FAIR_SHARE_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENT_PING_MS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_pixels: int
    max_inflight_pixels: int
    max_queue: int
    max_batch: int
    max_iterations: int
    max_optimisations: int
    max_concurrent_rpcs: int
    fair_share: bool
    min_client_ping_ms: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_pixels: _Optional[int] = ..., max_inflight_pixels: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_iterations: _Optional[int] = ..., max_optimisations: _Optional[int] = ..., max_concurrent_rpcs: _Optional[int] = ..., fair_share: _Optional[bool] = ..., min_client_ping_ms: _Optional[int] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("services", "ready", "models", "limits", "version")
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedScalarFieldContainer[str]
    ready: bool
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    limits: ServerLimits
    version: str
    def __init__(self, services: _Optional[_Iterable[str]] = ..., ready: _Optional[bool] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., version: _Optional[str] = ...) -> None: ...
