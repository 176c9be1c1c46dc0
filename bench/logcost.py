"""Logging cost: Recorder.add_message against a plain sqlite3 loop doing the same INSERT, on the same
schema (made by chatlog.db.connect, so the FTS triggers and page size are the same) with the same pragmas
(WAL, synchronous=NORMAL, foreign_keys=ON, SQLite's automatic checkpoints, one autocommit
transaction per message): what is left is the cost of the store's own Python code."""

import sqlite3
import tempfile
import time
from pathlib import Path

from chatlog.db import connect
from chatlog.records import now_iso
from chatlog.recorder import open_recorder


def store_rate(n):
    with tempfile.TemporaryDirectory(prefix="chatlog-bench-") as tmp:
        return _store_rate(Path(tmp) / "s.db", n)


def _store_rate(db, n):
    store = open_recorder(db)
    sid = store.begin_session("127.0.0.1", 1, "127.0.0.1", 2, time.time(), served=True)
    t = time.perf_counter()
    for i in range(n):
        store.add_message(sid, "client", "bob", f"hello there this is message {i}", None, None, time.time())
    rate = n / (time.perf_counter() - t)
    store.close()
    return rate


def sqlite_rate(n):
    with tempfile.TemporaryDirectory(prefix="chatlog-bench-") as tmp:
        return _sqlite_rate(Path(tmp) / "p.db", n)


def _sqlite_rate(db, n):
    connect(db).close()  # the same schema, triggers and page size
    conn = sqlite3.connect(db, isolation_level=None)
    for pragma in ("journal_mode = WAL", "synchronous = NORMAL", "foreign_keys = ON"):
        conn.execute(f"PRAGMA {pragma}")
    conn.execute("INSERT INTO sessions (id, started_at) VALUES (1, ?)", (now_iso(),))
    sql = "INSERT INTO messages (session_id, seq, at, sender, handle, text, raw, note) VALUES (?,?,?,?,?,?,?,?)"
    t = time.perf_counter()
    for i in range(n):
        conn.execute(sql, (1, i + 1, now_iso(), "client", "bob", f"hello there this is message {i}", None, None))
    rate = n / (time.perf_counter() - t)
    conn.close()
    return rate
