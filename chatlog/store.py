"""The transcript store: one SQLite file, written through sqlite-utils, read with plain queries.

Nothing above this module writes SQL. Writes are small autocommit transactions (one per event) in
WAL mode, so every message is durable the moment `add_message` returns and readers in other
processes never block the server. Read-only commands open the file without importing sqlite-utils
(it costs ~100 ms) unless a migration is pending.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from chatlog import schema

if TYPE_CHECKING:
    from sqlite_utils import Database

    from chatlog.query import Filters

SQLITE_HEADER = b"SQLite format 3\x00"
# The WAL size at which the writer makes it start over (see Store._restart_wal): only a flood of
# messages with no pause for the background checkpointer reaches it. Checked every N commits.
WAL_RESTART_BYTES = 64 * 1024 * 1024
WAL_CHECK_EVERY = 1000
WAL_SIZE_LIMIT = 8 * 1024 * 1024  # and truncate the file back to this after a restart

class StoreError(Exception):
    """A problem with the database file, worded for the person running the command."""


class BadQuery(StoreError):
    """A search query SQLite's full-text engine cannot parse."""


_FILE_TROUBLE = ("database", "disk", "locked", "busy", "readonly", "malformed", "corrupt", "unable to open", "no such table")

HL_START, HL_END = "\ue000", "\ue001"  # private-use marks around search matches


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value)


@dataclass(slots=True)
class Session:
    id: int
    started_at: str
    served_at: str | None
    ended_at: str | None
    client_host: str | None
    client_port: int | None
    server_host: str | None
    server_port: int | None
    handle: str | None
    end_reason: str | None
    client_messages: int
    server_messages: int

    @property
    def messages(self) -> int:
        return self.client_messages + self.server_messages

    @property
    def duration(self) -> float | None:
        if not self.ended_at:
            return None
        return (parse_iso(self.ended_at) - parse_iso(self.started_at)).total_seconds()

    @property
    def state(self) -> str:
        """How it ended (the end reason), or `in progress` / `waiting`."""
        if self.end_reason is None:
            return "in progress" if self.served_at else "waiting"
        return self.end_reason


@dataclass(slots=True)
class Msg:
    id: int
    session_id: int
    seq: int
    at: str
    sender: str
    handle: str | None
    text: str
    raw: bytes | None
    note: str | None


def _live_count(sender: str) -> str:
    return (
        f"CASE WHEN sessions.ended_at IS NULL THEN (SELECT count(*) FROM messages m "
        f"WHERE m.session_id = sessions.id AND m.sender = '{sender}') "
        f"ELSE sessions.{sender}_messages END"
    )


# Select these from `sessions` (unaliased) to build a Session: the counts of a session still in
# progress are counted live, those of an ended one come from the row.
SESSION_COLUMNS = ", ".join(
    _live_count(name.split("_")[0]) if name.endswith("_messages") else f"sessions.{name}"
    for name in Session.__slots__  # type: ignore[attr-defined]
)
_FINAL_COUNTS = (
    "client_messages = (SELECT count(*) FROM messages m "
    "WHERE m.session_id = sessions.id AND m.sender = 'client'), "
    "server_messages = (SELECT count(*) FROM messages m "
    "WHERE m.session_id = sessions.id AND m.sender = 'server')"
)
MSG_COLUMNS = ", ".join(Msg.__slots__)  # type: ignore[attr-defined]

_INSERT_MESSAGE = (
    "INSERT INTO messages (session_id, seq, at, sender, handle, text, raw, note) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


class Store:
    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path
        self._db: Database | None = None
        self._seq: dict[int, int] = {}
        self._checkpointer: threading.Event | None = None
        self.checkpoints = 0  # passes the background checkpointer has made
        self._commits = 0
        self._restart_bytes = WAL_RESTART_BYTES
        self._guard_instance = _Guard(path)  # stateless: one serves every call

    @property
    def db(self) -> "Database":
        """The sqlite-utils view of the same connection (imported on first use)."""
        if self._db is None:
            from sqlite_utils import Database

            self._db = Database(self.conn)
        return self._db

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.set()
            try:
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass
        self.conn.close()

    def start_checkpointer(self, interval: float = 0.5, restart_bytes: int = WAL_RESTART_BYTES) -> None:
        """Move WAL checkpoints (which fsync) off the writer's path, into a background thread.

        With SQLite's automatic checkpoints, every ~1000 pages one commit pays for copying the
        WAL into the database and an fsync: milliseconds, on the chat turn. Here the writer only
        appends to the WAL, and a second connection checkpoints passively (never blocking the
        writer) twice a second.
        """
        if self._checkpointer is not None:
            return
        self._restart_bytes = restart_bytes
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self.conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        stop = self._checkpointer = threading.Event()
        path = self.path

        def run() -> None:
            try:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout = 1000")
            except sqlite3.Error:
                return
            try:
                while True:
                    checkpoint(conn)
                    self.checkpoints += 1
                    if stop.wait(interval):
                        break
            finally:
                conn.close()

        threading.Thread(target=run, name="checkpointer", daemon=True).start()

    # -- writing -------------------------------------------------------------------------------

    def close_orphans(self, at: str | None = None) -> int:
        """Sessions left open by a crash or a kill are closed as `interrupted`. Returns how many."""
        at = at or now_iso()
        with self._guard():
            cur = self.conn.execute(
                f"UPDATE sessions SET end_reason = 'interrupted', {_FINAL_COUNTS}, "
                "ended_at = coalesce((SELECT max(m.at) FROM messages m "
                "WHERE m.session_id = sessions.id), served_at, started_at) "
                "WHERE ended_at IS NULL"
            )
        return cur.rowcount

    def begin_session(
        self,
        client: tuple[str, int],
        server: tuple[str, int],
        at: str | None = None,
        *,
        served: bool = False,
    ) -> int:
        at = at or now_iso()
        row = {
            "started_at": at,
            "served_at": at if served else None,
            "client_host": client[0],
            "client_port": client[1],
            "server_host": server[0],
            "server_port": server[1],
        }
        with self._guard():
            session_id = self.db["sessions"].insert(row).last_pk
        self._seq[session_id] = 0
        return session_id

    def serve_session(self, session_id: int, at: str | None = None) -> None:
        with self._guard():
            self.conn.execute(
                "UPDATE sessions SET served_at = ? WHERE id = ?", (at or now_iso(), session_id)
            )

    def add_message(
        self,
        session_id: int,
        sender: str,
        handle: str | None,
        text: str,
        raw: bytes | None = None,
        note: str | None = None,
        at: str | None = None,
    ) -> int:
        """Commit one message; returns its sequence number. The hot path: one INSERT, one commit."""
        seq = self._seq.get(session_id)
        seq = (self.last_seq(session_id) if seq is None else seq) + 1
        with self._guard():
            self.conn.execute(
                _INSERT_MESSAGE,
                (session_id, seq, at or now_iso(), sender, handle, text, raw, note),
            )
        self._seq[session_id] = seq
        self._commits += 1
        if self._commits % WAL_CHECK_EVERY == 0 and self._checkpointer is not None:
            self._restart_wal()
        return seq

    def _restart_wal(self) -> None:
        """Under a flood of messages a passive checkpoint never catches the writer, and the WAL
        would grow without bound. So when it has passed the limit, the writer itself (holding no
        transaction, so nothing can starve it) runs a RESTART checkpoint: it catches up and makes
        the next commit begin the WAL again. It costs milliseconds, once per tens of MB."""
        try:
            if os.path.getsize(f"{self.path}-wal") > self._restart_bytes:
                self.conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        except (OSError, sqlite3.Error):
            pass

    def set_handle(self, session_id: int, handle: str) -> None:
        with self._guard():
            self.conn.execute(
                "UPDATE sessions SET handle = ? WHERE id = ? AND handle IS NULL", (handle, session_id)
            )

    def end_session(self, session_id: int, reason: str, at: str | None = None) -> None:
        with self._guard():
            self.conn.execute(
                f"UPDATE sessions SET ended_at = ?, end_reason = ?, {_FINAL_COUNTS} "
                "WHERE id = ? AND ended_at IS NULL",
                (at or now_iso(), reason, session_id),
            )
        self._seq.pop(session_id, None)

    # -- reading -------------------------------------------------------------------------------

    def session(self, ident: int | str) -> Session | None:
        """A session by id, or the newest one for `last`."""
        if isinstance(ident, str) and ident.lower() == "last":
            sql = f"SELECT {SESSION_COLUMNS} FROM sessions ORDER BY id DESC LIMIT 1"
            args: tuple = ()
        else:
            sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?"
            args = (int(ident),)
        with self._guard():
            row = self.conn.execute(sql, args).fetchone()
        return Session(*row) if row else None

    def messages(self, session_id: int, after_seq: int = 0) -> Iterator[Msg]:
        """A session's messages in order, streamed."""
        with self._guard():
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
        with self._guard():
            return [Session(*row) for row in self.conn.execute(sql, args)]

    def session_ids(self, filters: "Filters") -> list[int]:
        where, args = filter_sql(filters)
        with self._guard():
            return [r[0] for r in self.conn.execute(f"SELECT id FROM sessions WHERE {where} ORDER BY id", args)]

    def message_total(self, filters: "Filters") -> int:
        """How many messages the matching sessions hold (by their counts: no message is read)."""
        where, args = filter_sql(filters)
        with self._guard():
            row = self.conn.execute(
                f"SELECT sum(client_messages + server_messages) FROM sessions WHERE {where}", args
            ).fetchone()
        return row[0] or 0

    def last_seq(self, session_id: int) -> int:
        with self._guard():
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
        with self._guard():
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
            with self._guard():
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
        with self._guard():
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
        with self._guard():
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
        with self._guard():
            target = sqlite3.connect(dest)
            try:
                self.conn.backup(target)
            finally:
                target.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _guard(self):
        return self._guard_instance


class _Guard:
    """Turns sqlite3 errors into one clear StoreError."""

    __slots__ = ("path",)

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, sqlite3.Error):
            raise StoreError(describe_error(self.path, exc)) from exc
        return False


def checkpoint(conn: sqlite3.Connection) -> None:
    """One pass of the background checkpointer, on its own connection: a passive checkpoint,
    which never blocks the writer. When the writer pauses (at chat pace, between any two
    messages) it completes, and SQLite starts the WAL over at the next commit."""
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except sqlite3.Error:
        pass  # busy or locked this time: the next pass catches up


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


def describe_error(path: Path, exc: BaseException) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return f"{path} is not a usable chatlog database ({text})"
    if "readonly" in text or "unable to open" in text:
        return f"cannot write the database {path} ({text})"
    return f"database error in {path}: {text}"


def open_store(path: str | os.PathLike, *, create: bool = True) -> Store:
    """Open (creating if allowed) the database at `path`, upgrading its schema if needed."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise StoreError(f"no chatlog database at {path} (nothing has been recorded yet)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        except OSError as exc:
            if not (isinstance(exc, FileExistsError) and path.is_file()):
                raise StoreError(f"cannot create the database {path}: {exc.strerror}") from exc
    elif path.is_dir():
        raise StoreError(f"{path} is a directory, not a database file")
    try:
        with open(path, "rb") as f:
            header = f.read(16)
    except OSError as exc:
        raise StoreError(f"cannot read the database {path}: {exc.strerror}") from exc
    if header and header != SQLITE_HEADER:
        raise StoreError(f"{path} is not a chatlog database (not an SQLite file)")
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(describe_error(path, exc)) from exc
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        if not header:
            # A new file: small pages, because every message is its own commit and a commit
            # writes each page it touches whole into the WAL (measured: 40 KB a message with
            # 4 KiB pages, 11 KB with 1 KiB pages, and ~30% less time).
            conn.execute("PRAGMA page_size = 1024")
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(describe_error(path, exc)) from exc
    except StoreError:
        conn.close()
        raise
    return Store(conn, path)


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlite_migrations'"
    ).fetchone()
    applied: list[str] = []
    if has_table:
        applied = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM _sqlite_migrations WHERE migration_set = ?",
                (schema.MIGRATION_SET,),
            )
        ]
    unknown = [name for name in applied if name not in schema.NAMES]
    if unknown:
        raise StoreError(
            f"{path} was written by a newer version of chatlog (schema step {unknown[-1]}); "
            "upgrade chatlog to read it"
        )
    if len(applied) == len(schema.NAMES):
        return
    if not has_table and conn.execute(
        "SELECT 1 FROM sqlite_master WHERE name IN ('sessions', 'messages')"
    ).fetchone():
        raise StoreError(f"{path} is an SQLite file but not a chatlog database")
    from sqlite_utils import Database

    schema.apply(Database(conn))
