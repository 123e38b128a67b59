"""ImageSearch: word -> image and image -> image search over a durable index."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from percept.v1 import search_pb2, search_pb2_grpc
from services.common.errors import Unimplemented
from services.common.rpc import stream_errors, unary_errors
from services.common.server import ServiceModule

_NOT_YET = ("image search is not served yet: it needs the Embedding service's model, "
            "which is not installed")


class ImageSearchService(ServiceModule, search_pb2_grpc.ImageSearchServicer):
    name = "search"
    full_name = "percept.v1.ImageSearch"

    def add_to_server(self, server: grpc.aio.Server) -> None:
        search_pb2_grpc.add_ImageSearchServicer_to_server(self, server)

    @stream_errors
    async def AddImages(self, request_iterator: AsyncIterator[search_pb2.AddImageRequest],
                        context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[search_pb2.AddImagesAck]:
        raise Unimplemented(_NOT_YET)
        yield  # pragma: no cover - makes this an async generator

    @unary_errors
    async def SearchByText(self, request: search_pb2.SearchByTextRequest,
                           context: grpc.aio.ServicerContext) -> search_pb2.SearchResponse:
        raise Unimplemented(_NOT_YET)

    @unary_errors
    async def SearchByImage(self, request: search_pb2.SearchByImageRequest,
                            context: grpc.aio.ServicerContext) -> search_pb2.SearchResponse:
        raise Unimplemented(_NOT_YET)

    @unary_errors
    async def DeleteImages(self, request: search_pb2.DeleteImagesRequest,
                           context: grpc.aio.ServicerContext) -> search_pb2.DeleteImagesResponse:
        raise Unimplemented(_NOT_YET)

    @unary_errors
    async def Stats(self, request: search_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> search_pb2.StatsResponse:
        raise Unimplemented(_NOT_YET)
