"""The search index, kept in the background: new messages are added to `messages_fts` in small
chunks, never on the chat path (schema m008). Plain SQL on whatever connection is given;
nothing heavy is imported, as the server's checkpointer thread runs it.

`fts_progress.upto` is how far the index reaches: every non-event message with id <= upto is
indexed, none above it. Each chunk is one short BEGIN IMMEDIATE transaction that indexes the next
rows and moves `upto`, so a writer never waits more than a few milliseconds behind it.
"""

from __future__ import annotations

import sqlite3
import time

CHUNK = 200  # message ids per transaction: a few ms of the write lock


def _busy(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED
    return "locked" in str(exc) or "busy" in str(exc)


def index_pending(conn: sqlite3.Connection, chunk: int = CHUNK) -> int:
    """Index the next messages after `upto` (at most `chunk` ids; 'event' rows are skipped, not
    indexed) and move `upto` past them, in one transaction. Returns how many ids it covered: 0
    when nothing is pending, or when another connection holds the write lock (never waited for:
    the next round does it). `conn` is in autocommit mode; other errors are raised."""
    timeout = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if _busy(exc):
            return 0
        raise
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout)}")
    try:
        upto = conn.execute("SELECT upto FROM fts_progress").fetchone()[0]
        n, last = conn.execute(
            "SELECT count(*), max(id) FROM (SELECT id FROM messages WHERE id > ? ORDER BY id LIMIT ?)",
            (upto, max(1, int(chunk))),
        ).fetchone()
        if n:
            conn.execute(
                "INSERT INTO messages_fts (rowid, text) SELECT id, text FROM messages "
                "WHERE id > ? AND id <= ? AND sender != 'event'",
                (upto, last),
            )
            conn.execute("UPDATE fts_progress SET upto = ?", (last,))
        conn.execute("COMMIT")
        return n
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def pending(conn: sqlite3.Connection, *, searchable: bool = False) -> int:
    """How many of the newest messages the index does not reach yet (events included, unless
    `searchable`: only those a search would find once indexed)."""
    sql = "SELECT count(*) FROM messages WHERE id > (SELECT upto FROM fts_progress)"
    if searchable:
        sql += " AND sender != 'event'"
    return conn.execute(sql).fetchone()[0]


def catch_up(conn: sqlite3.Connection, seconds: float, chunk: int = CHUNK, pause: bool = False) -> int:
    """Index what is pending, chunk by chunk, for at most `seconds`, waiting out a busy database
    in short steps; with `pause`, each chunk is followed by a pause as long as it held the lock,
    so a writer that was waiting goes first. Returns how many messages are left unindexed."""
    deadline = time.monotonic() + seconds
    while True:
        started = time.monotonic()
        n = index_pending(conn, chunk)
        now = time.monotonic()
        if n < chunk:
            left = pending(conn)
            if left == 0 or now >= deadline:
                return left
            if n == 0:
                time.sleep(0.002)  # busy: another writer holds the lock
                continue
        if now >= deadline:
            return pending(conn)
        if pause:
            time.sleep(min(0.05, max(0.001, now - started)))
