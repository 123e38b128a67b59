"""services/retries.py: which failures are tried again, and for how long."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from services.common.errors import RETRY_PUSHBACK_KEY
from services.retries import RetriedTooLong, error_reason, pushback_seconds, retrying


class Failed(grpc.RpcError):
    """A failed call as grpc raises it: a status, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, pushback: str | None = None,
                 reason: str | None = None) -> None:
        super().__init__()
        self._code = code
        self._trailers: tuple[tuple[str, str | bytes], ...] = (
            () if pushback is None else ((RETRY_PUSHBACK_KEY, pushback),))
        if reason is not None:  # the rich error model's ErrorInfo, as a percept server sends
            status = status_pb2.Status(code=code.value[0], message=self.details())
            status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason))
            self._trailers += (("grpc-status-details-bin", status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "busy" if self._code == grpc.StatusCode.RESOURCE_EXHAUSTED else "no"

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailers


BUSY = grpc.StatusCode.RESOURCE_EXHAUSTED


def answers(*outcomes: Failed | str, before: Callable[[], None] = lambda: None
            ) -> tuple[Callable[[], str], list[int]]:
    """A call that gives ``outcomes`` in turn (raising the failures); and its try count."""
    tries = [0]

    def call() -> str:
        before()
        outcome = outcomes[min(tries[0], len(outcomes) - 1)]
        tries[0] += 1
        if isinstance(outcome, Failed):
            raise outcome
        return outcome

    return call, tries


def test_the_pushback_is_read_from_the_trailer() -> None:
    assert pushback_seconds(Failed(BUSY, "250")) == 0.25
    assert pushback_seconds(Failed(BUSY)) is None  # a message over the size limit
    assert pushback_seconds(Failed(BUSY, "-1")) is None  # gRFC A6: do not retry
    assert pushback_seconds(Failed(BUSY, "soon")) is None
    assert pushback_seconds(Failed(grpc.StatusCode.INTERNAL, "10")) is None


def test_busy_answers_are_retried_until_one_succeeds() -> None:
    call, tries = answers(Failed(BUSY, "1"), Failed(BUSY, "1"), "done")
    assert retrying(call, patience=10) == "done" and tries[0] == 3


@pytest.mark.parametrize("failure", [Failed(BUSY), Failed(BUSY, "-1"),
                                     Failed(grpc.StatusCode.INVALID_ARGUMENT),
                                     Failed(grpc.StatusCode.DEADLINE_EXCEEDED)])
def test_what_a_retry_would_not_change_is_raised_at_once(failure: Failed) -> None:
    call, tries = answers(failure, "done")
    with pytest.raises(grpc.RpcError) as raised:
        retrying(call, patience=10)
    assert raised.value is failure and tries[0] == 1


@pytest.mark.parametrize("reason", ["SERVER_LOADING", "SERVER_DRAINING"])
def test_a_server_that_says_it_is_not_ready_is_always_retried(reason: str) -> None:
    """Loading its models, or draining (a retry reaches another replica): every command
    asks again; another UNAVAILABLE reason is retried only when asked."""
    failure = Failed(grpc.StatusCode.UNAVAILABLE, reason=reason)
    assert error_reason(failure) == reason
    call, tries = answers(failure, failure, "done")
    assert retrying(call, patience=10, wait=lambda s: None) == "done" and tries[0] == 3
    other = Failed(grpc.StatusCode.UNAVAILABLE, reason="EMBEDDING_SERVICE_UNAVAILABLE")
    call, tries = answers(other, "done")
    with pytest.raises(grpc.RpcError):
        retrying(call, patience=10, wait=lambda s: None)
    assert tries[0] == 1 and error_reason(Failed(grpc.StatusCode.UNAVAILABLE)) is None


def test_unavailable_is_retried_only_when_asked() -> None:
    call, tries = answers(Failed(grpc.StatusCode.UNAVAILABLE), "done")
    assert retrying(call, patience=10, retry_unavailable=True) == "done" and tries[0] == 2
    call, tries = answers(Failed(grpc.StatusCode.UNAVAILABLE), "done")
    with pytest.raises(grpc.RpcError):
        retrying(call, patience=10, retry_unavailable=False)
    assert tries[0] == 1


def test_the_patience_runs_out_saying_how_long_it_retried() -> None:
    call, tries = answers(Failed(BUSY, "50"))
    started = time.monotonic()
    with pytest.raises(RetriedTooLong) as raised:
        retrying(call, patience=0.3)
    assert 0.3 <= time.monotonic() - started < 2.0 and tries[0] >= 3
    assert str(raised.value).startswith("RESOURCE_EXHAUSTED: busy (retried for ")
    assert raised.value.error.code() == BUSY


def test_the_patience_counts_from_the_first_busy_answer_not_the_first_try() -> None:
    """A call that works for longer than the patience before it is answered busy (a long
    stream) is still retried."""
    call, tries = answers(Failed(BUSY, "1"), "done", before=lambda: time.sleep(0.15))
    assert retrying(call, patience=0.1) == "done" and tries[0] == 2


def test_progress_starts_the_patience_again() -> None:
    """Each try of a stream gets further before the server is busy again: it goes on as
    long as it moves, though all the tries together outlast the patience."""
    done = [0]

    def moved() -> None:
        done[0] += 1
        time.sleep(0.05)

    call, tries = answers(*[Failed(BUSY, "1")] * 6, "done", before=moved)
    assert retrying(call, patience=0.1, progress=lambda: done[0]) == "done"
    assert tries[0] == 7
    call, tries = answers(*[Failed(BUSY, "1")] * 6, "done",
                          before=lambda: time.sleep(0.05))  # no progress
    with pytest.raises(RetriedTooLong):
        retrying(call, patience=0.1, progress=lambda: 0)


def test_a_long_pushback_is_waited_in_full_and_a_short_one_grows_to_a_second() -> None:
    waits: list[float] = []
    call, _ = answers(*[Failed(BUSY, "5000")] * 3, "done")
    assert retrying(call, patience=60, wait=waits.append) == "done"
    assert all(5.0 * 0.75 <= w <= 5.0 * 1.25 for w in waits)  # jitter around the 5 s asked
    waits.clear()
    call, _ = answers(*[Failed(BUSY, "100")] * 6, "done")
    assert retrying(call, patience=60, wait=waits.append) == "done"
    assert waits[-1] <= 1.25 and waits[-1] >= 0.75  # doubled from 0.1 s up to the 1 s cap


def test_a_call_that_changes_something_does_not_retry_a_drain() -> None:
    """SERVER_DRAINING also ends a call the drain's grace ran out on, done or not: a
    delete asks again only while the server loads (percept delete would count the images
    it deleted the first time as not found)."""
    drained = Failed(grpc.StatusCode.UNAVAILABLE, reason="SERVER_DRAINING")
    call, tries = answers(drained, "done")
    with pytest.raises(grpc.RpcError):
        retrying(call, patience=10, wait=lambda s: None, not_ready={"SERVER_LOADING"})
    assert tries[0] == 1
    loading = Failed(grpc.StatusCode.UNAVAILABLE, reason="SERVER_LOADING")
    call, tries = answers(loading, "done")
    assert retrying(call, patience=10, wait=lambda s: None,
                    not_ready={"SERVER_LOADING"}) == "done" and tries[0] == 2
