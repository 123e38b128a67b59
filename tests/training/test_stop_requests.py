"""training.loop.stop_requests with real signals: the first Ctrl-C (or SIGTERM) only asks
the loop to stop after its step; a second stops the process at once (README: "a second
Ctrl-C stops at once")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from tests.conftest import REPO
from training.loop import stop_requests

MESSAGE = "stopping after this step; Ctrl-C again to stop now"


def test_a_first_ctrl_c_asks_and_a_second_raises_keyboard_interrupt(
        capsys: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), stop_requests(MESSAGE) as request:
        assert not request and request.signal is None
        # os.kill runs the Python handler of a signal it sends to its own process before
        # it returns
        os.kill(os.getpid(), signal.SIGINT)
        assert request and request.signal == signal.SIGINT
        assert request.exit_code == 128 + signal.SIGINT
        assert capsys.readouterr().err == f"\n{MESSAGE}\n"
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("the second Ctrl-C did not stop at once")  # pragma: no cover
    assert capsys.readouterr().err == ""  # the second prints nothing more
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_the_handlers_are_put_back_when_the_loop_ends() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_requests(MESSAGE) as request:
        assert signal.getsignal(signal.SIGINT) not in before
    assert not request
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_outside_the_main_thread_the_signals_stay_as_they_are() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    def loop() -> None:
        with stop_requests(MESSAGE) as request:
            seen.append((bool(request), signal.getsignal(signal.SIGINT),
                         signal.getsignal(signal.SIGTERM)))

    thread = threading.Thread(target=loop)
    thread.start()
    thread.join(30)
    assert seen == [(False, *before)]


#: A training loop in its own process (a second SIGTERM would end pytest's): the first
#: SIGTERM is noted, the second ends the process by SIGTERM's own default action.
SIGTERM_TWICE = textwrap.dedent(f"""
    import os, signal, sys
    from training.loop import stop_requests

    with stop_requests({MESSAGE!r}) as request:
        os.kill(os.getpid(), signal.SIGTERM)
        print("first noted:", request.signal == signal.SIGTERM, request.exit_code,
              flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        print("still running after the second SIGTERM", flush=True)
    print("left the block", flush=True)
""")


def test_a_second_sigterm_ends_the_process_by_sigterm() -> None:
    finished = subprocess.run([sys.executable, "-c", SIGTERM_TWICE], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == -signal.SIGTERM, finished.stderr
    assert finished.stdout == f"first noted: True {128 + signal.SIGTERM}\n"
    assert finished.stderr == f"\n{MESSAGE}\n"
