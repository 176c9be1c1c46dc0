"""The one store builder the tests share: named rows written through the real recorder (the
server's own write path) into a real SQLite file, with the archive's reads on the same object.

Addresses are (host, port) pairs and times are stored-format strings (or omitted: now), which
keeps fixtures readable; they are handed to the recorder as it is called by the server.
"""

from __future__ import annotations

import sqlite3
import time

from chatlog import indexer, schema
from chatlog.archive import Archive
from chatlog.db import connect
from chatlog.records import iso, parse_iso
from chatlog.recorder import Recorder


def _ts(at: str | float | None) -> float:
    if at is None:
        return time.time()
    if isinstance(at, str):
        return parse_iso(at).timestamp()
    return at


class Built(Archive):
    def __init__(self, path, *, create=True, **kwargs):
        super().__init__(connect(path, create=create))
        self.rec = Recorder(self.db, **kwargs)

    def begin_session(self, client, server, at=None, *, served=False, kind="chat"):
        return self.rec.begin_session(client[0], client[1], server[0], server[1], _ts(at), served=served, kind=kind)

    def serve_session(self, session_id, at=None):
        self.rec.serve_session(session_id, _ts(at))

    def set_handle(self, session_id, handle):
        self.rec.set_handle(session_id, handle)

    def add_message(self, session_id, sender, handle, text, raw=None, note=None, at=None, participant=None,
                    verified=False):
        return self.rec.add_message(session_id, sender, handle, text, raw, note, _ts(at), participant, verified)

    def add_lines(self, session_id, sender, handle, count, at=None, text="line %d"):
        """`count` messages `text % i` (i from 0), in one INSERT done by SQLite itself: the big
        fixtures (tens of thousands of messages) in a fraction of a second, not a commit each."""
        with self.rec.transaction():
            self.conn.execute(
                "INSERT INTO messages (session_id, seq, at, sender, handle, text) "
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?) "
                "SELECT ?, (SELECT coalesce(max(seq), 0) FROM messages WHERE session_id = ?) + 1 + i, ?, ?, ?, "
                "printf(?, i) FROM n",
                [count, session_id, session_id, iso(_ts(at)), sender, handle, text],
            )
            self.rec._seq.pop(session_id, None)  # the recorder reads the next number afresh

    def end_session(self, session_id, reason, at=None):
        return self.rec.end_session(session_id, reason, _ts(at))

    def close_orphans(self, at=None):
        return self.rec.close_orphans(_ts(at))

    def close(self):
        """Index what is pending, as a server does when it stops (`self.db.close()` does not)."""
        indexer.catch_up(self.conn, 10)
        super().close()


def open_store(path, **kwargs) -> Built:
    return Built(path, **kwargs)


def bulky(path, sessions: int, lines: int = 1000):
    """An archive at `path` big enough to fill a small disk: `sessions` ended chats of `lines`
    long-ish lines each (20 of 1,000 are over 1 MB)."""
    s = open_store(path)
    for i in range(sessions):
        sid = s.begin_session((f"10.0.0.{i}", 5000), ("127.0.0.1", 9999), served=True)
        s.add_lines(sid, "client", "amy", lines, text="a line long enough to fill a small disk soon %d")
        s.end_session(sid, "client-quit")
    s.close()
    return path


def schema_before(path, migration: str) -> sqlite3.Connection:
    """An archive as it was before `migration` (e.g. "m014"), made by the real migrations up to
    it; an autocommit connection to it, to write its rows as that schema had them."""
    conn = sqlite3.connect(path, isolation_level=None)
    saved = list(schema.MIGRATIONS)
    try:
        schema.MIGRATIONS[:] = [fn for fn in saved if fn.__name__ < migration]
        schema.apply(conn)
    finally:
        schema.MIGRATIONS[:] = saved
    return conn
