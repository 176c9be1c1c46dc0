"""Reading the archive: sessions, messages, search, stats, filters; deleting and backing up.

Read commands open the file with `open_archive`; nothing here is imported by the server's chat
path. Every query returns the small records of `chatlog.records`.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from chatlog.db import _FILE_TROUBLE, DB, BadQuery, StoreError, connect, describe_error
from chatlog.records import HL_END, HL_START, Msg, Session
from chatlog.schema import message_count

if TYPE_CHECKING:
    from chatlog.query import Filters


def _live_count(sender: str) -> str:
    return f"CASE WHEN sessions.ended_at IS NULL THEN {message_count(sender)} ELSE sessions.{sender}_messages END"


# Select these from `sessions` (unaliased) to build a Session: the counts of a session still in
# progress are counted live, those of an ended one come from the row.
SESSION_COLUMNS = ", ".join(
    _live_count(name.split("_")[0]) if name.endswith("_messages") else f"sessions.{name}"
    for name in Session.__slots__  # type: ignore[attr-defined]
)
MSG_COLUMNS = ", ".join(Msg.__slots__)  # type: ignore[attr-defined]


def open_archive(path: str | os.PathLike, *, create: bool = False) -> "Archive":
    """Open the database at `path` for reading (and rm/prune/backup)."""
    return Archive(connect(path, create=create))


class Archive:
    def __init__(self, db: DB):
        self.db = db
        self.conn = db.conn
        self.path: Path = db.path

    def close(self) -> None:
        self.db.close()

    def session(self, ident: int | str) -> Session | None:
        """A session by id, or the newest one for `last`."""
        if isinstance(ident, str) and ident.lower() == "last":
            sql = f"SELECT {SESSION_COLUMNS} FROM sessions ORDER BY id DESC LIMIT 1"
            args: tuple = ()
        else:
            sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?"
            args = (int(ident),)
        with self.db.guard:
            row = self.conn.execute(sql, args).fetchone()
        return Session(*row) if row else None

    def messages(self, session_id: int, after_seq: int = 0) -> Iterator[Msg]:
        """A session's messages in order, streamed."""
        with self.db.guard:
            cur = self.conn.execute(
                f"SELECT {MSG_COLUMNS} FROM messages WHERE session_id = ? AND seq > ? ORDER BY seq",
                (session_id, after_seq),
            )
        for row in cur:
            yield Msg(*row)

    def sessions(self, filters: "Filters | None" = None, limit: int = 20) -> list[Session]:
        """Newest first. Walks the sessions table by id (start order), never the messages."""
        where, args = filter_sql(filters)
        sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {where} ORDER BY sessions.id DESC"
        if limit:
            sql += f" LIMIT {min(int(limit), 2**63 - 1)}"
        with self.db.guard:
            return [Session(*row) for row in self.conn.execute(sql, args)]

    def session_ids(self, filters: "Filters") -> list[int]:
        where, args = filter_sql(filters)
        with self.db.guard:
            return [r[0] for r in self.conn.execute(f"SELECT id FROM sessions WHERE {where} ORDER BY id", args)]

    def message_total(self, filters: "Filters") -> int:
        """How many messages the matching sessions hold (by their counts: no message is read)."""
        where, args = filter_sql(filters)
        with self.db.guard:
            row = self.conn.execute(
                f"SELECT sum(client_messages + server_messages) FROM sessions WHERE {where}", args
            ).fetchone()
        return row[0] or 0

    def last_seq(self, session_id: int) -> int:
        with self.db.guard:
            row = self.conn.execute(
                "SELECT max(seq) FROM messages WHERE session_id = ?", (session_id,)
            ).fetchone()
        return row[0] or 0

    def search(
        self,
        fts: str,
        *,
        handle: str | None = None,
        since: str | None = None,
        limit: int = 20,
        best: bool = False,
    ) -> list[tuple[Msg, str]]:
        """Messages matching an FTS5 query, newest (or best) first, each with its text marked
        up by `highlight()`: matches between HL_START and HL_END."""
        clauses, args = ["messages_fts MATCH ?"], [fts]
        if handle is not None:
            clauses.append("m.handle = ?")
            args.append(handle)
        if since is not None:
            clauses.append("m.at >= ?")
            args.append(since)
        order = "messages_fts.rank" if best else "messages_fts.rowid DESC"
        cols = ", ".join(f"m.{c}" for c in Msg.__slots__)  # type: ignore[attr-defined]
        sql = (
            f"SELECT {cols}, highlight(messages_fts, 0, '{HL_START}', '{HL_END}') "
            f"FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
            f"WHERE {' AND '.join(clauses)} ORDER BY {order}"
        )
        if limit:
            sql += f" LIMIT {min(int(limit), 2**63 - 1)}"
        try:
            rows = self.conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            # FTS5 reports a bad query as an OperationalError too ("fts5: syntax error near",
            # "unterminated string", "no such column: x", "unknown special query"...): anything
            # that is not about the file itself is about the query.
            text = str(exc)
            if not any(word in text for word in _FILE_TROUBLE):
                raise BadQuery(f"invalid search query {fts!r}: {text}") from exc
            raise StoreError(describe_error(self.path, exc)) from exc
        except sqlite3.DatabaseError as exc:
            raise StoreError(describe_error(self.path, exc)) from exc
        return [(Msg(*row[:-1]), row[-1]) for row in rows]

    def export_rows(self, ids: list[int]) -> Iterator[tuple[Session, Iterator[tuple]]]:
        """Each chosen session with its messages as plain tuples (in `Msg` field order), streamed
        by walking two cursors side by side: sessions by id, and messages by (session_id, seq)
        over the same id range. Two queries in all, however many sessions."""
        if not ids:
            return
        chosen = set(ids)
        lo, hi = min(ids), max(ids)
        if len(chosen) * 4 < hi - lo + 1:
            # A sparse choice (one handle's sessions among many): the walk would read and drop
            # the messages of every session in between, so each one is read by its index instead.
            yield from self._export_each(sorted(chosen))
            return
        with self.db.guard:
            sessions = self.conn.execute(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id BETWEEN ? AND ? ORDER BY id", (lo, hi)
            )
            rows = self.conn.execute(
                f"SELECT {MSG_COLUMNS} FROM messages WHERE session_id BETWEEN ? AND ? "
                "ORDER BY session_id, seq",
                (lo, hi),
            )
        pending = [next(rows, None)]

        def messages_of(session_id: int) -> Iterator[tuple]:
            row = pending[0]
            while row is not None and row[1] < session_id:  # messages of skipped sessions
                row = next(rows, None)
            while row is not None and row[1] == session_id:
                yield row
                row = next(rows, None)
            pending[0] = row

        for srow in sessions:
            if srow[0] not in chosen:
                continue
            msgs = messages_of(srow[0])
            yield Session(*srow), msgs
            for _ in msgs:  # whatever the writer did not read
                pass

    def _export_each(self, ids: list[int]) -> Iterator[tuple[Session, Iterator[tuple]]]:
        for session_id in ids:
            with self.db.guard:
                row = self.conn.execute(
                    f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,)
                ).fetchone()
                if row is None:  # deleted meanwhile
                    continue
                rows = self.conn.execute(
                    f"SELECT {MSG_COLUMNS} FROM messages WHERE session_id = ? ORDER BY seq",
                    (session_id,),
                )
            yield Session(*row), rows

    def stats(self) -> dict:
        q = self.conn.execute
        with self.db.guard:
            sessions, handles, hosts = q(
                "SELECT count(*), count(DISTINCT handle), count(DISTINCT client_host) FROM sessions"
            ).fetchone()
            messages = q("SELECT count(*) FROM messages").fetchone()[0]
            avg = q(
                "SELECT avg((julianday(ended_at) - julianday(started_at)) * 86400) FROM sessions "
                "WHERE ended_at IS NOT NULL"
            ).fetchone()[0]
            busiest = q(
                "SELECT handle, count(*) AS n, sum(client_messages + server_messages) AS m "
                "FROM sessions WHERE handle IS NOT NULL GROUP BY handle ORDER BY m DESC, n DESC LIMIT 5"
            ).fetchall()
            reasons = q(
                "SELECT coalesce(end_reason, 'in progress'), count(*) FROM sessions GROUP BY 1 ORDER BY 2 DESC"
            ).fetchall()
            first, last = q("SELECT min(started_at), max(started_at) FROM sessions").fetchone()
        return {
            "sessions": sessions,
            "messages": messages,
            "handles": handles,
            "hosts": hosts,
            "average_session_seconds": round(avg, 3) if avg is not None else None,
            "first_session": first,
            "last_session": last,
            "busiest_handles": [{"handle": h, "sessions": n, "messages": m} for h, n, m in busiest],
            "end_reasons": {r: n for r, n in reasons},
        }

    def delete_sessions(self, ids: list[int]) -> int:
        """Delete ended sessions with their messages (and, by trigger, their search entries).

        A session still in progress is left alone: the server is writing to it, and its next
        message would fail the foreign key. Checked inside the write transaction, so a session
        cannot start or resume between the check and the delete."""
        if not ids:
            return 0
        marks = ", ".join("?" * len(ids))
        ended = f"SELECT id FROM sessions WHERE id IN ({marks}) AND ended_at IS NOT NULL"
        with self.db.guard:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.execute(f"DELETE FROM messages WHERE session_id IN ({ended})", ids)
                n = self.conn.execute(f"DELETE FROM sessions WHERE id IN ({ended})", ids).rowcount
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return n

    def backup(self, dest: Path) -> None:
        """A consistent copy through SQLite's online backup API (safe while the server writes)."""
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        with self.db.guard:
            target = sqlite3.connect(dest)
            try:
                self.conn.backup(target)
            finally:
                target.close()


def filter_sql(f: "Filters | None") -> tuple[str, list]:
    """The WHERE conditions on `sessions` for a set of filters, and their parameters."""
    if f is None:
        return "1", []
    clauses: list[str] = []
    args: list = []
    if f.ids:
        clauses.append(f"sessions.id IN ({', '.join('?' * len(f.ids))})")
        args += list(f.ids)
    for column, value, op in (
        ("handle", f.handle, "="),
        ("client_host", f.host, "="),
        ("started_at", f.since, ">="),
        ("started_at", f.until, "<"),
    ):
        if value is not None:
            clauses.append(f"sessions.{column} {op} ?")
            args.append(value)
    if f.ended_only:
        clauses.append("sessions.ended_at IS NOT NULL")
    return (" AND ".join(clauses) or "1"), args
