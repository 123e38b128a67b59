"""SuperResolution: 4x upscaling with a perceptual-loss-trained network."""

from __future__ import annotations

import grpc

from percept.v1 import superres_pb2, superres_pb2_grpc
from services.common.artifacts import list_artifacts
from services.common.errors import Unimplemented
from services.common.rpc import unary_errors
from services.common.server import ServiceModule


class SuperResolutionService(ServiceModule, superres_pb2_grpc.SuperResolutionServicer):
    name = "superres"
    full_name = "percept.v1.SuperResolution"

    def add_to_server(self, server: grpc.aio.Server) -> None:
        superres_pb2_grpc.add_SuperResolutionServicer_to_server(self, server)

    async def load(self) -> None:
        self.models = list_artifacts(self.config.models_dir, "superres")

    @unary_errors
    async def Upscale(self, request: superres_pb2.UpscaleRequest,
                      context: grpc.aio.ServicerContext) -> superres_pb2.UpscaleResponse:
        raise Unimplemented("super-resolution is not served yet: no model is loaded under "
                            f"{self.config.models_dir}")
