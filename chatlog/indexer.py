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
from typing import Callable

from chatlog import txn

CHUNK = 200  # message ids per transaction: a few ms of the write lock


def index_pending(conn: sqlite3.Connection, chunk: int = CHUNK, *, give_up: Callable[[], bool] = lambda: True) -> int:
    """Index the next messages after `upto` (at most `chunk` ids; 'event' rows are skipped, not
    indexed) and move `upto` past them, in one transaction. Returns how many ids it covered: 0
    when nothing is pending, or when another connection holds the write lock and `give_up()` says
    so (by default at once: the next round does it). The lock is asked for without SQLite's own
    busy timeout, so the server's writes, which do wait in it, go first. `conn` is in autocommit
    mode; other errors are raised."""
    try:
        with txn.write_transaction(conn, lock_timeout_ms=0, should_stop=give_up, pause=0.002):
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
        return n
    except txn.Busy:
        return 0


def pending(conn: sqlite3.Connection, *, searchable: bool = False) -> int:
    """How many of the newest messages the index does not reach yet (events included, unless
    `searchable`: only those a search would find once indexed)."""
    sql = "SELECT count(*) FROM messages WHERE id > (SELECT upto FROM fts_progress)"
    if searchable:
        sql += " AND sender != 'event'"
    return conn.execute(sql).fetchone()[0]


def any_pending(conn: sqlite3.Connection) -> bool:
    """Whether some message is not indexed yet: one row looked at, where `pending` counts them
    all (36 ms at a backlog of 200,000, every half second while a chat is busy)."""
    return conn.execute("SELECT 1 FROM messages WHERE id > (SELECT upto FROM fts_progress) LIMIT 1").fetchone() is not None


def catch_up(conn: sqlite3.Connection, seconds: float, chunk: int = CHUNK, pause: bool = False) -> bool:
    """Index what is pending, chunk by chunk, for at most `seconds`, waiting out a busy database
    in short steps; with `pause`, each chunk is followed by a pause as long as it held the lock,
    so a writer that was waiting goes first. Returns whether messages are left unindexed."""
    deadline = time.monotonic() + seconds

    def out_of_time() -> bool:
        return time.monotonic() >= deadline

    while True:
        started = time.monotonic()
        n = index_pending(conn, chunk, give_up=out_of_time)
        now = time.monotonic()
        if n < chunk:
            left = any_pending(conn)
            if not left or now >= deadline:
                return left
        if now >= deadline:
            return any_pending(conn)
        if pause:
            time.sleep(min(0.05, max(0.001, now - started)))
