"""The few writes the server makes, in plain SQL: nothing heavy is imported on the chat path.

Each call is one small transaction (autocommit) in WAL mode, so a message is committed (see
docs/reliability.md for what that survives) the moment `add_message` returns. Times come in as
epoch seconds and are stored as UTC ISO text.
"""

from __future__ import annotations

import os
from typing import Callable

from chatlog.db import DB, connect
from chatlog.records import iso
from chatlog.schema import message_count

WAL_CHECK_EVERY = 1000  # commits between looks at the WAL's size (see DB.restart_wal)

_FINAL_COUNTS = (
    f"client_messages = {message_count('client')}, server_messages = {message_count('server')}"
)
_INSERT_MESSAGE = (
    "INSERT INTO messages (session_id, seq, at, sender, handle, text, raw, note) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def open_recorder(path: str | os.PathLike, **kwargs) -> "Recorder":
    """Open (creating it if needed) the database at `path` for the server to write."""
    return Recorder(connect(path, create=True), **kwargs)


class Recorder:
    def __init__(
        self,
        conn_or_db: DB | str | os.PathLike,
        *,
        on_wait: Callable[[float | None], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ):
        self.db = conn_or_db if isinstance(conn_or_db, DB) else connect(conn_or_db, create=True)
        self.conn = self.db.conn
        self.path = self.db.path
        self.on_wait = on_wait
        self.should_stop = should_stop
        self._seq: dict[int, int] = {}
        self._commits = 0

    # -- the server's life -----------------------------------------------------------------------

    def start(self, host: str, port: int, at: float) -> tuple[int, int]:
        """Called once the server listens: closes the sessions an earlier run left open (as
        `interrupted`) and starts the background checkpointer. Returns (server id, orphans)."""
        orphans = self.close_orphans(at)
        self.db.start_checkpointer()
        return 0, orphans

    def close_orphans(self, at: float | None = None) -> int:
        """Sessions left open by a crash or a kill are closed as `interrupted`. Returns how many."""
        with self.db.guard:
            cur = self.conn.execute(
                f"UPDATE sessions SET end_reason = 'interrupted', {_FINAL_COUNTS}, "
                "ended_at = coalesce((SELECT max(m.at) FROM messages m "
                "WHERE m.session_id = sessions.id), served_at, started_at) "
                "WHERE ended_at IS NULL"
            )
        return cur.rowcount

    def close(self) -> None:
        self.db.close()

    # -- sessions --------------------------------------------------------------------------------

    def begin_session(
        self,
        client_host: str,
        client_port: int,
        server_host: str,
        server_port: int,
        at: float,
        *,
        served: bool,
        kind: str = "chat",
    ) -> int:
        when = iso(at)
        with self.db.guard:
            session_id = self.conn.execute(
                "INSERT INTO sessions (started_at, served_at, client_host, client_port, "
                "server_host, server_port) VALUES (?, ?, ?, ?, ?, ?)",
                (when, when if served else None, client_host, client_port, server_host, server_port),
            ).lastrowid
        self._seq[session_id] = 0
        return session_id

    def serve_session(self, session_id: int, at: float) -> None:
        with self.db.guard:
            self.conn.execute("UPDATE sessions SET served_at = ? WHERE id = ?", (iso(at), session_id))

    def set_handle(self, session_id: int, handle: str) -> None:
        with self.db.guard:
            self.conn.execute(
                "UPDATE sessions SET handle = ? WHERE id = ? AND handle IS NULL", (handle, session_id)
            )

    def add_message(
        self,
        session_id: int,
        sender: str,
        handle: str | None,
        text: str,
        raw: bytes | None,
        note: str | None,
        at: float,
        participant: int | None = None,
    ) -> int:
        """Commit one message; returns its sequence number. The hot path: one INSERT, one commit."""
        seq = self._seq.get(session_id)
        seq = (self._last_seq(session_id) if seq is None else seq) + 1
        with self.db.guard:
            self.conn.execute(_INSERT_MESSAGE, (session_id, seq, iso(at), sender, handle, text, raw, note))
        self._seq[session_id] = seq
        self._commits += 1
        if self._commits % WAL_CHECK_EVERY == 0 and self.db.checkpointing:
            self.db.restart_wal()
        return seq

    def end_session(self, session_id: int, reason: str, at: float) -> tuple[int, int]:
        """Record the end and the final counts (unless it had ended already); returns the counts."""
        with self.db.guard:
            self.conn.execute(
                f"UPDATE sessions SET ended_at = ?, end_reason = ?, {_FINAL_COUNTS} "
                "WHERE id = ? AND ended_at IS NULL",
                (iso(at), reason, session_id),
            )
            row = self.conn.execute(
                "SELECT client_messages, server_messages FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
        self._seq.pop(session_id, None)
        return (row[0], row[1]) if row else (0, 0)

    def _last_seq(self, session_id: int) -> int:
        with self.db.guard:
            row = self.conn.execute(
                "SELECT max(seq) FROM messages WHERE session_id = ?", (session_id,)
            ).fetchone()
        return row[0] or 0
