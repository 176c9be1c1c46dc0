"""`serve --retain DURATION`: the archive keeps what is younger, in the background.

A thread of its own, on its own connection, runs chatlog.upkeep's bounded retention steps: each
step deletes for about STEP seconds in transactions that hold the write lock a few milliseconds,
then pauses as long, so the server's commits go first and no turn waits on it. It runs at start
and then every EVERY seconds; what it removed is said on the console in one line."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

STEP = 0.2  # seconds of deleting a step
EVERY = 3600.0  # seconds between rounds (sessions end all the time; once an hour is plenty)


def describe(seconds: float) -> str:
    """`90d`, `12h`, `30m`, `45s`: how the banner and the console say a retention period."""
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class Retention:
    """Started by the server once its banner is out; stopped (and joined) when it stops."""

    def __init__(self, path: Path, older_than: float, *, every: float = EVERY, step: float = STEP):
        self.path, self.older_than, self.every, self.step = Path(path), older_than, every, step
        self.rounds = 0  # rounds finished (tests wait on it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, say: Callable[[str], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(say,), name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, say: Callable[[str], None]) -> None:
        import sqlite3

        from chatlog.archive import open_archive
        from chatlog.db import StoreError
        from chatlog.upkeep import Upkeep

        archive = None
        failing = False
        try:
            while not self._stop.is_set():
                sessions = messages = 0
                try:
                    if archive is None:
                        archive = open_archive(self.path, read_only=False)
                    upkeep = Upkeep(archive)
                    while not self._stop.is_set():
                        r = upkeep.retain(self.older_than, self.step)
                        sessions, messages = sessions + r.sessions, messages + r.messages
                        if not r.more or self._stop.wait(self.step):
                            break
                    failing = False
                except (sqlite3.Error, StoreError) as exc:
                    if not failing:  # said once, until a round succeeds again
                        say(f"retention could not run ({exc}); it tries again in {describe(self.every)}")
                    failing = True
                if sessions or messages:
                    say(f"retention: removed {_count(sessions, 'session')} ({_count(messages, 'message')}) "
                        f"that ended over {describe(self.older_than)} ago")
                self.rounds += 1
                self._stop.wait(self.every)
        finally:
            if archive is not None:
                archive.close()


def _count(n: int, what: str) -> str:
    return f"1 {what}" if n == 1 else f"{n:,} {what}s"
