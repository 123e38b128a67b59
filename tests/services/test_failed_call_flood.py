"""A flood of one kind of failed call writes the first --failed-call-log-limit lines of
each window and then one line that counts the rest, while the metrics count every call:
LineBudget on its own (a clock the test moves), and a real server on loopback flooded
with bytes that are no image."""

from __future__ import annotations

import json
import logging

import grpc
import pytest
from prometheus_client import REGISTRY

from percept.v1 import superres_pb2, superres_pb2_grpc
from services.common.line_budget import Held, LineBudget
from services.common.server import start_in_thread
from tests.conftest import server_config
from tests.services.test_call_logs import _calls_ended, _lines, server_log

KIND = ("Upscale", "INVALID_ARGUMENT", "NOT_AN_IMAGE")


def test_a_budget_writes_its_share_then_counts_the_rest_per_window() -> None:
    now = [0.0]
    budget = LineBudget(3, window_seconds=10.0, clock=lambda: now[0])
    assert [budget.admit(KIND, logging.INFO) for _ in range(3)] == [(True, None)] * 3
    assert [budget.admit(KIND, logging.INFO)[0] for _ in range(5)] == [False] * 5
    assert budget.admit("another kind", logging.INFO) == (True, None)  # its own share
    now[0] = 10.0
    admitted, held = budget.admit(KIND, logging.INFO)  # a new window, and the old count
    assert admitted and held == Held(KIND, 5, logging.INFO, 10.0)
    assert [budget.admit(KIND, logging.WARNING)[0] for _ in range(4)] == [True, True,
                                                                         False, False]
    assert budget.ended() == []  # the window is open
    now[0] = 25.0
    assert budget.ended() == [Held(KIND, 2, logging.WARNING, 15.0)]  # the highest level
    assert budget.ended() == []  # told once
    budget.admit(KIND, logging.INFO)
    for _ in range(3):
        budget.admit(KIND, logging.INFO)
    assert budget.ended(everything=True) == [Held(KIND, 1, logging.INFO, 0.0)]
    unlimited = LineBudget(0)
    assert all(unlimited.admit(KIND, logging.INFO)[0] for _ in range(100))
    budget.admit(KIND, logging.INFO)  # a window that held nothing back ...
    now[0] = 40.0
    assert budget.admit(KIND, logging.INFO) == (True, None)  # ... has nothing to tell
    now[0] = 50.0
    assert budget.ended() == []


def test_the_next_failed_call_of_a_kind_tells_what_its_last_window_held_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The count of a window's held-back lines is written by the first failed call of its
    kind after the window (before the server's periodic look), outside that call: with
    the held calls' ids, not the telling call's."""
    import time

    from services.common.request_ids import current_request_id
    from services.common.rpc import FAILED_CALL_LINES, log_failed_call

    FAILED_CALL_LINES.configure(1)
    monkeypatch.setattr(FAILED_CALL_LINES, "window_seconds", 0.5)

    def failed(request_id: str) -> None:
        token = current_request_id.set(request_id)
        try:
            log_failed_call("Upscale", grpc.StatusCode.INVALID_ARGUMENT, "bad",
                            reason="NOT_AN_IMAGE")
        finally:
            current_request_id.reset(token)

    with server_log(level="info") as log:  # the server's format: ids from the context
        for n in range(3):
            failed(f"held-{n}")
        time.sleep(0.55)  # the window has ended
        failed("teller")
    lines = [(line["msg"], line.get("request_id"), line.get("calls"), line.get("request_ids"))
             for line in _lines(log) if line.get("method") == "Upscale"]
    assert lines == [("call failed", "held-0", None, None),
                     ("failed calls not logged", None, 2, "held-1, held-2"),
                     ("call failed", "teller", None, None)]


def _requests(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value("percept_requests_total", {
        "grpc_service": "percept.v1.SuperResolution", "grpc_method": method,
        "grpc_code": code})
    return value or 0.0


def test_a_flood_of_bad_requests_writes_a_few_lines_and_one_count(
        caplog: pytest.LogCaptureFixture) -> None:
    running = start_in_thread(server_config("superres", warmup=False,
                                            failed_call_log_limit=4))
    before = _requests("Upscale", "INVALID_ARGUMENT")
    stopped = False
    try:
        with server_log(level="info") as log, grpc.insecure_channel(running.target) as channel:
            upscale = superres_pb2_grpc.SuperResolutionStub(channel).Upscale
            for n in range(30):
                with pytest.raises(grpc.RpcError) as error:
                    upscale(superres_pb2.UpscaleRequest(image=b"no image"), timeout=30,
                            metadata=[("x-request-id", f"flood-{n:02d}")])
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError):  # another kind: its own lines
                upscale(superres_pb2.UpscaleRequest(image=b"no image", model="none"),
                        timeout=30)
            _calls_ended(running)
            running.stop()
            stopped = True
        lines = _lines(log)
    finally:
        if not stopped:
            running.stop()
    flood = [line for line in lines if line.get("method") == "Upscale"
             and line.get("code") == "INVALID_ARGUMENT" and line.get("reason") != "NOT_FOUND"]
    written = [line for line in flood if line["msg"] == "call failed"]
    counted = [line for line in flood if line["msg"] == "failed calls not logged"]
    assert len(written) == 4, json.dumps(flood, indent=1)
    assert len(counted) == 1 and counted[0]["calls"] == 26
    assert counted[0]["level"] == "info"
    # the held calls' own ids, the first 20; not the id of a call that happened to tell it
    assert counted[0]["request_ids"] == ", ".join(
        f"flood-{n:02d}" for n in range(4, 24)) + " and 6 more"
    assert "request_id" not in counted[0]
    others = [line for line in lines if line["msg"] == "call failed"
              and line.get("code") == "NOT_FOUND"]
    assert len(others) == 1
    assert _requests("Upscale", "INVALID_ARGUMENT") - before == 30  # metrics count all


def test_errors_of_the_server_are_all_written(caplog: pytest.LogCaptureFixture) -> None:
    """ERROR lines (INTERNAL, a fault of the server's own) are not held back: a client told
    to look for its request id in the log finds it."""
    from services.common.rpc import FAILED_CALL_LINES, log_failed_call

    FAILED_CALL_LINES.configure(2)
    with caplog.at_level(logging.INFO, logger="percept.rpc"):
        for n in range(5):
            log_failed_call("Upscale", grpc.StatusCode.INTERNAL, "a bug",
                            request_id=f"bug-{n}")
            log_failed_call("Upscale", grpc.StatusCode.INVALID_ARGUMENT, "bad",
                            request_id=f"bad-{n}")
    ids = [getattr(r, "request_id", None) for r in caplog.records
           if r.getMessage() == "call failed"]
    assert ids == ["bug-0", "bad-0", "bug-1", "bad-1", "bug-2", "bug-3", "bug-4"]
