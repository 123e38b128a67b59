"""Embedding: DeViSE / ConSE image and text embeddings and WordNet noun labelling."""

from __future__ import annotations

import grpc

from percept.v1 import embed_pb2, embed_pb2_grpc
from services.common.errors import Unimplemented
from services.common.rpc import unary_errors
from services.common.server import ServiceModule

_NOT_YET = ("the embedding model is not served yet: the DeViSE/ConSE model and the WordNet "
            "noun index are not installed")


class EmbeddingService(ServiceModule, embed_pb2_grpc.EmbeddingServicer):
    name = "embed"
    full_name = "percept.v1.Embedding"

    def add_to_server(self, server: grpc.aio.Server) -> None:
        embed_pb2_grpc.add_EmbeddingServicer_to_server(self, server)

    @unary_errors
    async def EmbedImages(self, request: embed_pb2.EmbedImagesRequest,
                          context: grpc.aio.ServicerContext) -> embed_pb2.EmbedImagesResponse:
        raise Unimplemented(_NOT_YET)

    @unary_errors
    async def EmbedText(self, request: embed_pb2.EmbedTextRequest,
                        context: grpc.aio.ServicerContext) -> embed_pb2.EmbedTextResponse:
        raise Unimplemented(_NOT_YET)

    @unary_errors
    async def LabelImage(self, request: embed_pb2.LabelImageRequest,
                         context: grpc.aio.ServicerContext) -> embed_pb2.LabelImageResponse:
        raise Unimplemented(_NOT_YET)
