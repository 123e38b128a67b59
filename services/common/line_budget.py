"""How many log lines one kind of event may write: a flood of the same failure (a client
that sends the same bad request a thousand times a second) writes its first lines of
each window, and the rest are counted and told in one line when the window ends, while
the metrics count every one.

A kind's window opens with its first line and lasts ``window_seconds``; in it the first
``per_window`` lines are written, the others held back. The count of those held back is
handed out with the kind's first line after the window (:meth:`LineBudget.admit`) or by
:meth:`LineBudget.ended` (the server asks every window, so that a flood that stops is
told too)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

#: The most notes (request ids) a kind's window keeps of the lines it held back.
MAX_NOTES = 20


@dataclass
class _Window:
    opened: float
    written: int = 0
    held: int = 0
    level: int = 0
    notes: list[str] = field(default_factory=list)

    def told(self, kind: Hashable, now: float) -> Held:
        return Held(kind, self.held, self.level, now - self.opened, tuple(self.notes))


@dataclass(frozen=True)
class Held:
    """Lines of one kind held back in a window that has ended."""

    kind: Hashable
    lines: int
    level: int
    seconds: float
    #: the notes of the first :data:`MAX_NOTES` lines held back (their request ids)
    notes: tuple[str, ...] = ()


class LineBudget:
    """Per kind, at most ``per_window`` lines every ``window_seconds`` (0: no limit).
    Safe to call from any thread."""

    def __init__(self, per_window: int, window_seconds: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_window = per_window
        self.window_seconds = window_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[Hashable, _Window] = {}

    def configure(self, per_window: int) -> None:
        """A new share for every kind; the windows open now keep what they counted."""
        with self._lock:
            self.per_window = per_window

    def reset(self) -> None:
        """Forgets every window and what it counted (tests start afresh)."""
        with self._lock:
            self._windows.clear()

    def admit(self, kind: Hashable, level: int, note: str | None = None
              ) -> tuple[bool, Held | None]:
        """Whether a line of ``kind`` may be written now, and the lines of that kind held
        back in its window that ended before this one (to be told first), if any;
        ``note`` (a request id) is kept for a line held back."""
        if self.per_window <= 0:
            return True, None
        now = self._clock()
        with self._lock:
            window = self._windows.get(kind)
            ended = None
            if window is None or now - window.opened >= self.window_seconds:
                if window is not None and window.held:
                    ended = window.told(kind, now)
                window = self._windows[kind] = _Window(now)
            if window.written < self.per_window:
                window.written += 1
                return True, ended
            window.held += 1
            window.level = max(window.level, level)
            if note is not None and len(window.notes) < MAX_NOTES:
                window.notes.append(note)
            return False, ended

    def ended(self, everything: bool = False) -> list[Held]:
        """The held-back lines of the windows that have ended (of every window, with
        ``everything``: the server stops); those windows are closed."""
        now = self._clock()
        held = []
        with self._lock:
            for kind, window in list(self._windows.items()):
                if everything or now - window.opened >= self.window_seconds:
                    del self._windows[kind]
                    if window.held:
                        held.append(window.told(kind, now))
        return held
