"""``percept.v1.ServerInfo``: what a server hosts, its models and its limits, answered by
the server core for every service (the models come from each ServiceModule)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import metadata
from typing import TYPE_CHECKING

import grpc

from percept.v1 import server_pb2, server_pb2_grpc
from services.common.config import ServerConfig

if TYPE_CHECKING:
    from services.common.server import ServiceModule

SERVICE_NAME = "percept.v1.ServerInfo"


def model_info(service: str, name: str, artifact_name: str, version: int,
               is_default: bool = False) -> server_pb2.ModelInfo:
    return server_pb2.ModelInfo(service=service, name=name, version=version,
                                artifact=f"{artifact_name}@{version}", is_default=is_default)


def limits(config: ServerConfig) -> server_pb2.ServerLimits:
    return server_pb2.ServerLimits(
        max_message_bytes=config.max_message_bytes, max_pixels=config.max_pixels,
        max_inflight_pixels=config.max_inflight_mpixels * 1_000_000,
        max_queue=config.max_queue, max_batch=config.max_batch,
        max_iterations=config.max_iterations, max_optimisations=config.max_optimisations,
        max_concurrent_rpcs=config.max_concurrent_rpcs, fair_share=config.fair_share,
        min_client_ping_ms=round(config.min_client_ping_seconds * 1000))


def percept_version() -> str:
    try:
        return metadata.version("percept")
    except metadata.PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"


class ServerInfoServicer(server_pb2_grpc.ServerInfoServicer):
    """Answers from the modules as they are: ``ready()`` tells whether they are loaded."""

    def __init__(self, modules: Sequence[ServiceModule], config: ServerConfig,
                 ready: Callable[[], bool]) -> None:
        self.modules = modules
        self.config = config
        self.ready = ready
        self.version = percept_version()

    async def GetServerInfo(self, request: server_pb2.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext
                            ) -> server_pb2.GetServerInfoResponse:
        ready = self.ready()
        models = ([info for module in self.modules for info in module.model_infos()]
                  if ready else [])
        return server_pb2.GetServerInfoResponse(
            services=[module.full_name for module in self.modules], ready=ready,
            models=sorted(models, key=lambda m: (m.service, m.name)),
            limits=limits(self.config), version=self.version)
