"""Protocol-buffer messages as plain JSON for the command line's ``--json`` outputs.

Proto3's canonical JSON mapping writes 64-bit integers as strings (``"64000000"``), so
that JavaScript's doubles cannot round them. A user piping ``percept info --json`` into
``jq`` or Python wants numbers: Python's ``json`` and ``jq`` 1.7 both keep every int64
exactly. This module keeps the canonical mapping for everything else (field names as in the
.proto, enums by name, fields without presence printed with their defaults) and turns the
64-bit integer fields back into numbers, at any depth, repeated and map values included.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

_INT64_TYPES = frozenset({
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
})
_WELL_KNOWN_PREFIX = "google.protobuf."


def message_to_json_dict(message: Message) -> dict[str, Any]:
    """``message`` as a JSON-ready dict: proto field names, every field without presence
    printed, and 64-bit integers as numbers rather than strings."""
    data = MessageToDict(message, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)
    descriptor: Descriptor = message.DESCRIPTOR  # type: ignore[assignment]  # upb's twin
    return _numbers_in_message(descriptor, data)


def _numbers_in_message(descriptor: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    if descriptor.full_name.startswith(_WELL_KNOWN_PREFIX):
        return data  # Timestamp, Duration, wrappers ... have their own JSON forms
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        map_value = _map_value_field(field)
        if map_value is not None:
            data[field.name] = {key: _numbers_in_value(map_value, item)
                                for key, item in value.items()}
        elif field.is_repeated:
            data[field.name] = [_numbers_in_value(field, item) for item in value]
        else:
            data[field.name] = _numbers_in_value(field, value)
    return data


def _numbers_in_value(field: FieldDescriptor, value: Any) -> Any:
    if field.type in _INT64_TYPES:
        return int(value)
    if field.message_type is not None and isinstance(value, dict):
        return _numbers_in_message(field.message_type, value)
    return value


def _map_value_field(field: FieldDescriptor) -> FieldDescriptor | None:
    """The ``value`` field of a map field's entry type; None for any other field."""
    entry = field.message_type
    if not field.is_repeated or entry is None or not entry.GetOptions().map_entry:
        return None
    return entry.fields_by_name["value"]
