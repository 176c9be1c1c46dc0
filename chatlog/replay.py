"""Playing transcripts back: the replay clock (speed, idle limit, pause) and live following (tail).

The recording (timed console lines from `views.transcript`) is separate from the player, as in
asciinema: the same lines are exported as a cast file.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable, Iterable

from chatlog.render import Renderer, connected_text, ended_text
from chatlog.archive import Archive
from chatlog.records import Session, parse_iso


class Keys:
    """Single key presses from a terminal (cbreak mode, restored on exit): space pauses."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdin
        self.fd = self.stream.fileno()
        self._saved = None

    def __enter__(self):
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc):
        import termios

        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def wait(self, seconds: float | None) -> str | None:
        """Wait up to `seconds` (None: forever) for a key; return it, or None on time-out."""
        ready, _, _ = select.select([self.fd], [], [], seconds)
        if not ready:
            return None
        return os.read(self.fd, 1).decode("utf-8", "replace")


def delays(
    times: Iterable[str], speed: float = 1.0, idle_limit: float | None = None
) -> Iterable[float]:
    """Seconds to wait before each line: the recorded gaps, divided by speed, capped by the idle
    limit (like asciinema's -i)."""
    prev = None
    for t in times:
        now = parse_iso(t)
        gap = 0.0 if prev is None else max(0.0, (now - prev).total_seconds()) / speed
        if idle_limit is not None:
            gap = min(gap, idle_limit)
        prev = now
        yield gap


def play(
    lines: Iterable[tuple[str, str]],
    write: Callable[[str], None],
    *,
    speed: float = 1.0,
    idle_limit: float | None = None,
    instant: bool = False,
    keys: Keys | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Write timed lines with their original rhythm. With `keys`, space pauses and resumes."""
    lines = list(lines)
    for (_, line), gap in zip(lines, delays((t for t, _ in lines), speed, idle_limit), strict=True):
        if not instant and gap > 0:
            if keys is None:
                sleep(gap)
            else:
                _wait_with_pause(keys, gap, write)
        write(line)


def _wait_with_pause(keys: Keys, gap: float, write: Callable[[str], None]) -> None:
    deadline = time.monotonic() + gap
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        key = keys.wait(left)
        if key == " ":
            paused_at = time.monotonic()
            sys.stderr.write("[paused: space to resume]\r")
            sys.stderr.flush()
            while keys.wait(None) != " ":
                pass
            sys.stderr.write(" " * 26 + "\r")
            sys.stderr.flush()
            deadline += time.monotonic() - paused_at


def follow(
    store: Archive,
    r: Renderer,
    session_id: int | None = None,
    poll: float = 0.2,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Print the session in progress (or `session_id`) as the server writes it, then, when
    following the latest, each session after it. Returns when a given session ends."""
    current: Session | None = store.session(session_id if session_id is not None else "last")
    if current is None:
        r.event("Waiting for a session to start...")
    shown_start = False
    seq = 0
    while not stop():
        if current is None:
            current = store.session("last")
            if current is None:
                time.sleep(poll)
                continue
        if not shown_start:
            r.event(f"session {current.id}: " + connected_text(current.client_host, current.client_port))
            shown_start = True
        for m in store.messages(current.id, after_seq=seq):
            r.chat(m.sender, m.handle, m.text)
            seq = m.seq
        fresh = store.session(current.id)
        if fresh is None:  # deleted under us
            return
        if fresh.end_reason:
            for m in store.messages(current.id, after_seq=seq):
                r.chat(m.sender, m.handle, m.text)
                seq = m.seq
            r.event(ended_text(fresh.end_reason, fresh.id, fresh.client_messages, fresh.server_messages))
            if session_id is not None:
                return
            nxt = _next_session(store, current.id, poll, stop)
            if nxt is None:
                return
            current, shown_start, seq = nxt, False, 0
            continue
        time.sleep(poll)


def _next_session(store: Archive, after: int, poll: float, stop: Callable[[], bool]) -> Session | None:
    while not stop():
        s = store.session("last")
        if s is not None and s.id > after:
            return store.session(after + 1) or s
        time.sleep(poll)
    return None
