"""Structured logging: one JSON object per line (or plain text for a terminal)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from services.common.request_ids import RequestIdFilter

#: The record's own attributes, not extra fields ("message" and "asctime" are set on it
#: by a handler that formatted it first).
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as ``{"ts", "level", "logger", "msg", ...extra fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


#: What a text-format value is quoted for: a space or '=' would let it pass for more
#: fields (a client's request id "r1 level=error"), a quote or backslash for its end.
_NEEDS_QUOTES = frozenset(' ="\\')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def logfmt_value(value: Any) -> str:
    """``value`` as a text-format (logfmt) field's value: as it is, or in double quotes
    with ``\\"`` and ``\\\\`` escaped where it is empty or holds a space, '=', a quote,
    a backslash or a character that is not printable (a line break, escaped too: no
    value can start a line of its own)."""
    text = str(value)
    if text and not any(c in _NEEDS_QUOTES or not c.isprintable() for c in text):
        return text
    escaped = "".join(
        _ESCAPES.get(c) or (c if c.isprintable() else
                            f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        for c in text)
    return f'"{escaped}"'


class TextFormatter(logging.Formatter):
    """Formats a record as ``HH:MM:SS level logger: msg key=value...``, the time the
    record's (local time); each extra field's value is quoted as logfmt quotes it
    (:func:`logfmt_value`), so that none can pass for more fields."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={logfmt_value(v)}" for k, v in vars(record).items()
                          if k not in _RESERVED and not k.startswith("_"))
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname.lower():7s} " \
               f"{record.name}: {record.getMessage()}"
        text = f"{base} {extras}" if extras else base
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


#: The logger gRPC's asyncio server reports a handler's failures through.
GRPC_SERVER_LOGGER = "grpc._cython.cygrpc"


class LateAnswerFilter(logging.Filter):
    """gRPC logs an error with a traceback of its own internals whenever an answer cannot
    be sent, mostly for a call that had ended already (its deadline passed, or its client
    went, while the answer was being made): a race every client with tight deadlines can
    cause. Here it becomes one warning line naming the method (gRPC formats it into the
    message), without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        said = record.getMessage()
        if said.startswith("ExecuteBatchError raised in core"):
            method = said[said.find("[") + 1:said.rfind("]")] if "[" in said else "?"
            record.msg = ("an answer could not be sent (mostly: the call had ended, its "
                          "deadline passed or its client went): %s")
            record.args = (method,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
            return logging.getLogger().isEnabledFor(logging.WARNING)
        return True


def configure_logging(log_format: str = "json", level: str = "info",
                      stream: TextIO | None = None) -> None:
    """Routes the root logger to ``stream`` (default stderr) in the chosen format. Python
    warnings go through it too (logger ``py.warnings``), so a library's warning cannot
    break a JSON log into lines that are not JSON."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())  # the lines of a call carry its request_id
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    grpc_server = logging.getLogger(GRPC_SERVER_LOGGER)
    if not any(isinstance(f, LateAnswerFilter) for f in grpc_server.filters):
        grpc_server.addFilter(LateAnswerFilter())
    logging.captureWarnings(True)
