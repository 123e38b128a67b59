"""The servers' log lines: one JSON object per line, Python warnings included."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest

from services.common.logs import configure_logging


@pytest.fixture()
def json_log() -> Iterator[io.StringIO]:
    """The root logger configured as a server configures it, into a buffer."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buffer = io.StringIO()
    configure_logging("json", stream=buffer)
    try:
        yield buffer
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = handlers
        root.setLevel(level)


def test_a_library_warning_is_a_json_log_line(json_log: io.StringIO) -> None:
    logging.getLogger("percept.test").info("first")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Corrupt EXIF data", UserWarning, stacklevel=1)
    lines = json_log.getvalue().strip().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    assert [(r["logger"], r["level"]) for r in records] == [("percept.test", "info"),
                                                            ("py.warnings", "warning")]
    assert records[0]["msg"] == "first" and "UserWarning: Corrupt EXIF data" in records[1]["msg"]
