"""services.proto_json: --json outputs keep proto field names and give 64-bit integers as
numbers, at any depth, in repeated fields and map values, while well-known types keep their
own JSON forms."""

from __future__ import annotations

import json

from google.protobuf.json_format import MessageToDict

from percept.v1 import search_pb2, server_pb2, style_pb2
from services.proto_json import message_to_json_dict


def test_int64_fields_are_numbers_at_every_depth() -> None:
    info = server_pb2.GetServerInfoResponse(version="1.2", ready=True,
                                            services=["percept.v1.Search"])
    info.limits.max_pixels = 2**62 + 1  # beyond a double's 53 bits: kept exactly
    info.limits.max_queue = 7
    info.models.add(service="percept.v1.StyleTransfer", name="a", artifact="style-a@3",
                    version=3)
    info.models.add(name="b")
    data = message_to_json_dict(info)
    assert MessageToDict(info)["limits"]["maxPixels"] == str(2**62 + 1)  # the canonical form
    assert data["limits"]["max_pixels"] == 2**62 + 1
    assert data["limits"]["max_queue"] == 7 and data["limits"]["max_message_bytes"] == 0
    assert [model["version"] for model in data["models"]] == [3, 0]
    assert data["services"] == ["percept.v1.Search"] and data["version"] == "1.2"
    assert json.loads(json.dumps(data)) == data  # plain JSON, the big number exact


def test_maps_enums_and_well_known_types_keep_their_json_forms() -> None:
    request = style_pb2.StylizeWithImageRequest(seed=2**40)
    request.style_layer_weights["relu1_1"] = 0.5
    request.init = style_pb2.StylizeWithImageRequest.DESCRIPTOR.fields_by_name[
        "init"].enum_type.values[-1].number
    data = message_to_json_dict(request)
    assert data["seed"] == 2**40
    assert data["style_layer_weights"] == {"relu1_1": 0.5}
    assert isinstance(data["init"], str)  # enums by name, as proto JSON gives them

    stored = search_pb2.ImageEntry(id="x")
    stored.added.FromSeconds(1_700_000_000)
    assert message_to_json_dict(stored)["added"] == "2023-11-14T22:13:20Z"
