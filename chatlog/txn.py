"""Writing through a busy database: the one place that waits for SQLite's write lock.

The recorder (the server's writes), the archive's upkeep (rm, prune) and the search indexer all
write to a file other processes write to as well. Each statement that meets a busy database
(SQLITE_BUSY or SQLITE_LOCKED: a delete, a backup, another writer) is tried again after a short
pause until it goes through, or until the caller's `should_stop()` says to give up (`Busy`).
`write_transaction` takes the write lock first (BEGIN IMMEDIATE, waited for the same way), so
nothing inside it can meet a busy database: in WAL mode the holder of the write lock is never
refused.

Plain sqlite3, nothing else imported: the server's chat path and its checkpointer thread use it.
Errors other than a busy database are raised as they are; each caller words them for its reader.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from typing import Callable, Iterator

NOTICE_AFTER = 1.5  # seconds of waiting before `on_wait(seconds, False)` is called


class Busy(Exception):
    """The write lock was not had: `should_stop()` said to stop waiting after `waited` seconds."""

    def __init__(self, waited: float):
        super().__init__(f"the database was busy for {waited:.1f} s")
        self.waited = waited


def is_busy(exc: BaseException) -> bool:
    """Another connection holds the lock: worth waiting for."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED
    return "locked" in str(exc) or "busy" in str(exc)


def execute(
    conn: sqlite3.Connection,
    sql: str,
    args: tuple | list = (),
    *,
    should_stop: Callable[[], bool] | None = None,
    on_wait: Callable[[float, bool], None] | None = None,
    notice_after: float = NOTICE_AFTER,
    pause: float = 0.001,
    max_pause: float | None = None,
) -> sqlite3.Cursor:
    """Run one statement, waiting out a busy database.

    Between tries it sleeps `pause`, doubling up to `max_pause` (default: no backoff). Once the
    wait passes `notice_after` seconds, `on_wait(seconds, False)` is called once, and
    `on_wait(seconds, True)` when the statement has gone through. While `should_stop()` is true
    a busy database raises `Busy`. Any other error is raised as it is."""
    started = told = None
    delay = pause
    ceiling = pause if max_pause is None else max_pause
    while True:
        try:
            cur = conn.execute(sql, args)
        except sqlite3.Error as exc:
            if not is_busy(exc):
                raise
            now = time.monotonic()
            started = started or now
            if should_stop is not None and should_stop():
                raise Busy(now - started) from None
            if told is None and now - started >= notice_after:
                told = now
                if on_wait is not None:
                    on_wait(now - started, False)
            time.sleep(delay)
            delay = min(delay * 2, ceiling)
            continue
        if told is not None and on_wait is not None:
            on_wait(time.monotonic() - started, True)
        return cur


@contextmanager
def write_transaction(
    conn: sqlite3.Connection, *, lock_timeout_ms: int | None = None, **wait
) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on `conn` (in autocommit mode), both waited for as `execute`
    waits (`wait`: its keyword arguments); on any error inside, ROLLBACK and re-raise.

    `lock_timeout_ms`: SQLite's own busy timeout for the BEGIN alone (0: each try fails at once,
    so `should_stop` is asked between tries; the connection's timeout is put back after)."""
    if lock_timeout_ms is None:
        execute(conn, "BEGIN IMMEDIATE", **wait)
    else:
        saved = conn.execute("PRAGMA busy_timeout").fetchone()[0]
        conn.execute(f"PRAGMA busy_timeout = {int(lock_timeout_ms)}")
        try:
            execute(conn, "BEGIN IMMEDIATE", **wait)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(saved)}")
    try:
        yield conn
        execute(conn, "COMMIT", **wait)
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise
