"""Structured logging: one JSON object per line (or plain text for a terminal)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from services.common.request_ids import RequestIdFilter

_RESERVED = set(vars(logging.makeLogRecord({})))


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


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in vars(record).items()
                          if k not in _RESERVED and not k.startswith("_"))
        base = f"{time.strftime('%H:%M:%S')} {record.levelname.lower():7s} {record.name}: " \
               f"{record.getMessage()}"
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
