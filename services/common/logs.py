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
    """gRPC logs an error with a traceback when a handler answers a call that has already
    ended (its deadline passed, or its client went, while the answer was being made): a
    race every client with tight deadlines can cause, not a server fault. Its metrics count
    the call as DEADLINE_EXCEEDED or CANCELLED; here it becomes one info line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("ExecuteBatchError raised in core"):
            method = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = ("a call ended (its deadline passed, or its client went) before "
                          "its answer could be sent: %s")
            record.args = (method,)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
            return logging.getLogger().isEnabledFor(logging.INFO)
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
