"""Reading the archive: sessions, messages, search, filters, who is recording what.

Read commands open the file with `open_archive`; nothing here is imported by the server's chat
path, and nothing here writes except the search index catching up. Every query returns the small
records of `chatlog.records`. The totals are in chatlog.stats; deleting and backing up in
chatlog.upkeep.
"""

from __future__ import annotations

import os
import re
import sqlite3
from bisect import bisect_left, bisect_right
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

from chatlog import indexer
from chatlog.db import (
    _FILE_TROUBLE,
    DB,
    BadQuery,
    ServerLocks,
    StoreError,
    connect,
    describe_error,
    is_database_file,
    no_room,
    writable,
)
from chatlog.records import HL_END, HL_START, Msg, Session
from chatlog.sanitize import visible
from chatlog.schema import message_count

if TYPE_CHECKING:
    from chatlog.query import Filters

T = TypeVar("T")


# Each value as the type its column promises, whatever a crafted file holds (records.clean_msg too):
# CAST is one cheap step on a value of the right type. A number where text belongs reads as its
# digits, a blob as its bytes (text that is not UTF-8: see Archive.tolerant); text or a blob in
# a number column reads as what SQLite makes of it (0 for `abc`); `default` stands in for NULL.
def sql_text(expr: str, default: str | None = None) -> str:
    cast = f"CAST({expr} AS TEXT)"
    return cast if default is None else f"ifnull({cast}, '{default}')"


def sql_int(expr: str, default: str | None = None) -> str:
    cast = f"CAST({expr} AS INTEGER)"
    return cast if default is None else f"ifnull({cast}, {default})"


def _live_count(sender: str) -> str:
    return (
        f"CASE WHEN sessions.ended_at IS NULL THEN {message_count(sender)} "
        f"ELSE {sql_int(f'sessions.{sender}_messages', '0')} END"
    )


_SESSION_TEXT = {"started_at": "", "kind": "chat", "transport": "tcp"}  # text that cannot be NULL, and its stand-in

# Whether a 1:1 session's client, or any of a room's participants, had a verified handle.
SESSION_VERIFIED = (
    "CASE WHEN sessions.kind = 'room' THEN EXISTS (SELECT 1 FROM participants p WHERE p.session_id = sessions.id "
    f"AND {sql_int('p.verified', '0')} != 0) ELSE {sql_int('sessions.verified', '0')} != 0 END"
)


# Select these from `sessions` (unaliased) to build a Session: the counts of a session still in
# progress are counted live, those of an ended one come from the row.
def _session_column(name: str) -> str:
    if name.endswith("_messages"):
        return _live_count(name.split("_")[0])
    if name == "participants":
        return (
            "CASE WHEN sessions.kind = 'room' THEN (SELECT count(*) FROM participants p "
            "WHERE p.session_id = sessions.id) ELSE 0 END"
        )
    if name == "id":
        return "sessions.id"
    if name == "verified":
        return SESSION_VERIFIED
    if name.endswith("_port"):  # text there (a crafted file) is kept, and shown made visible
        return f"iif(typeof(sessions.{name}) = 'blob', quote(sessions.{name}), sessions.{name})"
    return sql_text(f"sessions.{name}", _SESSION_TEXT.get(name))


SESSION_COLUMNS = ", ".join(map(_session_column, Session.__slots__))  # type: ignore[attr-defined]
VISIBLE = "sessions.deleting = 0"  # a session being deleted is hidden from every read
DELETING = "deleting != 0"
# A message's values, each of its column's type (see sql_text): "id" is the rowid, always an integer.
_MSG_COLUMN = {
    "id": "{t}id", "session_id": sql_int("{t}session_id", "0"), "seq": sql_int("{t}seq", "0"),
    "at": sql_text("{t}at", ""), "sender": sql_text("{t}sender", ""), "handle": sql_text("{t}handle"),
    "text": sql_text("{t}text", ""), "raw": "CAST({t}raw AS BLOB)", "note": sql_text("{t}note"),
    "verified": "({t}verified IS 1)",
    "removed_at": sql_text("{t}removed_at"),
}


def msg_columns(table: str = "") -> str:
    """The `Msg` fields, in order, selected from `messages` (or from its alias `table`)."""
    prefix = f"{table}." if table else "messages."
    return ", ".join(_MSG_COLUMN[name].replace("{t}", prefix) for name in Msg.__slots__)  # type: ignore[attr-defined]


MSG_COLUMNS = msg_columns()
# For the fast export writers (see export_rows): seq and at typed here (cheap in SQL, and the
# writers print them as they are), the rest as stored (the writers check those themselves).
UNTYPED_MSG_COLUMNS = ", ".join(
    _MSG_COLUMN[name].replace("{t}", "") if name in ("seq", "at", "verified") else name
    for name in Msg.__slots__  # type: ignore[attr-defined]
)
HIGHLIGHT = sql_text(f"highlight(messages_fts, 0, '{HL_START}', '{HL_END}')", "")


SEARCH_CATCH_UP = 2.0  # seconds a search spends at most indexing new messages (normally < 1 s of them)


def _lenient(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def _not_utf8(exc: BaseException | None) -> bool:
    """Whether this (or what caused it) is sqlite3 failing to decode stored text as UTF-8."""
    while exc is not None:
        if isinstance(exc, sqlite3.OperationalError) and "decode" in str(exc):
            return True
        exc = exc.__cause__
    return False


def open_archive(path: str | os.PathLike, *, create: bool = False, read_only: bool | None = None) -> "Archive":
    """Open the database at `path` for reading (and rm/prune/backup). A file that cannot be
    written (read-only media, a read-only backup) is opened read-only unless `read_only=False`:
    every read works, and nothing is written, not even a -shm file when none can be made."""
    if read_only is None:
        read_only = os.path.exists(path) and not writable(path)
    try:
        return Archive(connect(path, create=create, read_only=read_only))
    except StoreError as exc:
        # Its disk full, SQLite cannot make the -shm a WAL database is read through. With no
        # WAL to read (nothing committed that is not in the file yet) the file is read as it is;
        # a write then says the disk is full.
        wal = f"{path}-wal"
        if not no_room(Path(path), exc.__cause__) or (os.path.exists(wal) and os.path.getsize(wal)):
            raise
    return Archive(connect(path, read_only=True, immutable=True))


FETCH = 1024  # an export's messages fetched at a time
_SESSION_OF = itemgetter(1)  # a message row's session id (MSG_COLUMNS and UNTYPED_MSG_COLUMNS alike)


class Archive:
    def __init__(self, db: DB):
        self.db = db
        self.conn = db.conn
        self.path: Path = db.path
        self.unindexed = 0  # messages the last search could not see: not indexed yet

    def close(self) -> None:
        self.db.close()

    # -- text that is not UTF-8 ------------------------------------------------------------------
    # SQLite keeps whatever bytes it is given as TEXT, and sqlite3 refuses to decode bad UTF-8. Read
    # as they are (the fast way) until that happens; from then on this connection decodes every
    # text value leniently, bad bytes escaped (`\xff`), and the read is done again or resumed.

    def _lenient_from_now(self, exc: BaseException) -> None:
        if not _not_utf8(exc) or self.conn.text_factory is _lenient:
            raise exc
        self.conn.text_factory = _lenient

    def tolerant(self, read: Callable[[], T]) -> T:
        """`read()`, done again with lenient decoding if stored text is not UTF-8."""
        try:
            return read()
        except (sqlite3.OperationalError, StoreError) as exc:
            self._lenient_from_now(exc)
        return read()

    def _rows(self, sql: str, args: tuple, resume: Callable[[tuple], tuple]) -> Iterator[tuple]:
        """The rows of `sql`, streamed. If stored text is not UTF-8, the query is run again with
        the arguments `resume(last row read)` (which must select the rows after it)."""
        last = None
        while True:
            try:
                with self.db.guard:
                    cur = self.conn.execute(sql, args)
                for last in cur:
                    yield last
                return
            except (sqlite3.OperationalError, StoreError) as exc:
                try:
                    self._lenient_from_now(exc)
                except sqlite3.Error:
                    raise StoreError(describe_error(self.path, exc)) from exc
                if last is not None:
                    args = resume(last)

    def session(self, ident: int | str) -> Session | None:
        """A session by id, or the newest one for `last`."""
        if isinstance(ident, str) and ident.lower() == "last":
            sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {VISIBLE} ORDER BY id DESC LIMIT 1"
            args: tuple = ()
        else:
            sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ? AND {VISIBLE}"
            args = (int(ident),)
        row = self.tolerant(lambda: self._one(sql, args))
        return Session(*row) if row else None

    def _one(self, sql: str, args: tuple) -> tuple | None:
        with self.db.guard:
            return self.conn.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple | list) -> list[tuple]:
        with self.db.guard:
            return self.conn.execute(sql, args).fetchall()

    def messages(self, session_id: int, after_seq: int = 0) -> Iterator[Msg]:
        """A session's messages in order, streamed."""
        sql = f"SELECT {MSG_COLUMNS} FROM messages WHERE session_id = ? AND seq > ? ORDER BY seq"
        for row in self._rows(sql, (session_id, after_seq), lambda last: (session_id, last[2])):
            yield Msg(*row)

    def sessions(self, filters: "Filters | None" = None, limit: int = 20) -> list[Session]:
        """Newest first. Walks the sessions table by id (start order), never the messages."""
        where, args = filter_sql(filters)
        sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {where} ORDER BY sessions.id DESC"
        if limit:
            sql += f" LIMIT {min(int(limit), 2**63 - 1)}"
        return [Session(*row) for row in self.tolerant(lambda: self._all(sql, args))]

    def sessions_after(self, after: int, limit: int = 100) -> list[Session]:
        """The sessions with an id above `after`, oldest first (what `tail` has not seen yet)."""
        sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id > ? AND {VISIBLE} ORDER BY id LIMIT ?"
        return [Session(*row) for row in self.tolerant(lambda: self._all(sql, (after, limit)))]

    def before_last(self, session_id: int, lines: int) -> tuple[int, dict[str, int]]:
        """Where a session's last `lines` messages begin: the sequence number before them, and
        how many of the messages up to it each sender said (so an ending still counts them all)."""
        with self.db.guard:
            row = self.conn.execute(
                "SELECT seq FROM messages WHERE session_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
                (session_id, lines),
            ).fetchone()
            if row is None:
                return 0, {}
        counts = dict(self.tolerant(lambda: self._all(
            "SELECT CAST(sender AS TEXT), count(*) FROM messages WHERE session_id = ? AND seq <= ? GROUP BY sender",
            (session_id, row[0]),
        )))
        return row[0], counts

    def said_upto(self, session_id: int, seq: int) -> tuple[str | None, dict[str, int]]:
        """The time of a session's message `seq`, and how many messages each sender said up to
        it (where a reader that has shown them picks up)."""
        row = self.tolerant(lambda: self._one(
            f"SELECT {sql_text('at')} FROM messages WHERE session_id = ? AND seq = ?", (session_id, seq)))
        counts = dict(self.tolerant(lambda: self._all(
            "SELECT CAST(sender AS TEXT), count(*) FROM messages WHERE session_id = ? AND seq <= ? GROUP BY sender",
            (session_id, seq),
        )))
        return (row[0] if row else None), counts

    def session_ids(self, filters: "Filters") -> list[int]:
        where, args = filter_sql(filters)
        with self.db.guard:
            return [r[0] for r in self.conn.execute(f"SELECT id FROM sessions WHERE {where} ORDER BY id", args)]

    def message_total(self, filters: "Filters") -> int:
        """How many messages the matching sessions hold (by their counts: no message is read)."""
        where, args = filter_sql(filters)
        with self.db.guard:
            row = self.conn.execute(
                f"SELECT sum({_live_count('client')} + {_live_count('server')}) FROM sessions WHERE {where}", args
            ).fetchone()
        return row[0] or 0

    def search(
        self,
        query: str,
        *,
        raw: bool = False,
        handle: str | None = None,
        since: str | None = None,
        until: str | None = None,
        session: int | None = None,
        limit: int = 20,
        best: bool = False,
        count: bool = False,
    ) -> "list[tuple[Msg, str]] | int":
        """Messages matching `query`, newest (or best) first, each with its text marked up:
        matches between HL_START and HL_END. With `count`, only how many match (all of them).

        `query` is what a person types (see `fts_query`): words, "an exact phrase", prefix*;
        with `raw` it is SQLite FTS5 syntax (AND, OR, NOT, NEAR). `since`/`until` are stored-
        format times (`until` excluded). A query that cannot run is one BadQuery line.

        The newest messages are indexed first (a running server indexes them in the background,
        about every half second); in an archive that cannot be written they are not, and
        `self.unindexed` says how many messages the search could not see."""
        fts = query if raw else fts_query(query)
        if not fts.strip():
            raise BadQuery("empty search query")
        self.unindexed = self.catch_up_index()
        clauses, args = ["messages_fts MATCH ?"], [fts]
        if handle is not None:
            clauses.append("m.handle = ?")
            args.append(handle)
        if session is not None:
            clauses.append("m.session_id = ?")
            args.append(session)
        if since is not None:
            clauses.append("m.at >= ?")
            args.append(since)
        if until is not None:
            clauses.append("m.at < ?")
            args.append(until)
        with self.db.guard:
            hidden = self.conn.execute(f"SELECT 1 FROM sessions WHERE {DELETING} LIMIT 1").fetchone()
        if hidden:
            clauses.append(f"m.session_id NOT IN (SELECT id FROM sessions WHERE {DELETING})")
        where = " AND ".join(clauses)
        source = "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid"
        if count and len(clauses) == 1:  # the index alone knows: no message row is read
            sql = "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH ?"
        elif count:
            sql = f"SELECT count(*) {source} WHERE {where}"
        else:
            order = "messages_fts.rank" if best else "messages_fts.rowid DESC"
            sql = (
                f"SELECT {msg_columns('m')}, "
                f"{HIGHLIGHT} "
                f"{source} WHERE {where} ORDER BY {order}"
            )
            if limit:
                sql += f" LIMIT {min(int(limit), 2**63 - 1)}"
        try:
            try:
                rows = self.conn.execute(sql, args).fetchall()
            except sqlite3.OperationalError as exc:
                self._lenient_from_now(exc)
                rows = self.conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            # FTS5 reports a bad query as an OperationalError too: anything that is not about the
            # file itself is about the query, and is worded for the person who typed it.
            text = str(exc)
            if not any(word in text for word in _FILE_TROUBLE):
                raise BadQuery(bad_query_line(query, text)) from None
            raise StoreError(describe_error(self.path, exc)) from exc
        except sqlite3.DatabaseError as exc:
            raise StoreError(describe_error(self.path, exc)) from exc
        if count:
            return rows[0][0]
        return [(Msg(*row[:-1]), row[-1]) for row in rows]

    def catch_up_index(self, seconds: float = SEARCH_CATCH_UP) -> int:
        """Index the messages the search index does not reach yet (for at most `seconds`, and
        only when the archive can be written); returns how many searchable ones are still left."""
        try:
            if not self.db.read_only:
                indexer.catch_up(self.conn, seconds)
            return indexer.pending(self.conn, searchable=True)
        except sqlite3.Error:
            # Cannot be written after all (a full disk, a read-only mount): search what is indexed.
            try:
                return indexer.pending(self.conn, searchable=True)
            except sqlite3.Error as exc:
                raise StoreError(describe_error(self.path, exc)) from exc

    def export_rows(self, ids: list[int], *, typed: bool = True) -> Iterator[tuple[Session, Iterator[tuple]]]:
        """Each chosen session with its messages as plain tuples (in `Msg` field order), streamed
        by walking two cursors side by side: sessions by id, and messages by (session_id, seq)
        over the same id range. Two queries in all, however many sessions. With `typed=False`
        the messages are as stored, values of the wrong type included (the fastest way, for a
        writer that checks them itself: see records.clean_msg)."""
        columns = MSG_COLUMNS if typed else UNTYPED_MSG_COLUMNS
        if not ids:
            return
        chosen = set(ids)
        lo, hi = min(ids), max(ids)
        if len(chosen) * 4 < hi - lo + 1:
            # A sparse choice (one handle's sessions among many): the walk would read and drop
            # the messages of every session in between, so each one is read by its index instead.
            yield from self._export_each(sorted(chosen), columns)
            return
        sessions = self._rows(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id > ? AND id <= ? AND {VISIBLE} ORDER BY id",
            (lo - 1, hi), lambda last: (last[0], hi),
        )
        walk = f"SELECT {columns} FROM messages WHERE session_id BETWEEN ? AND ? ORDER BY session_id, seq"
        with self.db.guard:
            rows = self.conn.execute(walk, (lo, hi))
        walk_on = f"SELECT {columns} FROM messages WHERE (session_id, seq) > (?, ?) AND session_id <= ? ORDER BY session_id, seq"

        def resume(exc: Exception, last: tuple | None) -> Iterator[tuple]:
            # Text that is not UTF-8 (see _rows): the walk goes on after the last row read. Not
            # a generator around the cursor: this is the hot loop of a large export.
            try:
                self._lenient_from_now(exc)
            except sqlite3.Error:
                raise StoreError(describe_error(self.path, exc)) from exc
            with self.db.guard:
                if last is None:
                    return self.conn.execute(walk, (lo, hi))
                return self.conn.execute(walk_on, (last[1], last[2], hi))

        buf: list = []  # rows fetched and not yet handed on: buf[at:]
        at = 0
        last: tuple | None = None  # the last row fetched (a resumed walk goes on after it)

        def fill() -> bool:
            """The next rows, FETCH at a time (False at the end). A batch whose decoding failed
            is read again, leniently, after the last row of the one before."""
            nonlocal rows, buf, at, last
            while True:
                try:
                    buf = rows.fetchmany(FETCH)
                except sqlite3.OperationalError as exc:
                    rows = resume(exc, last)
                    continue
                at = 0
                if buf:
                    last = buf[-1]
                return bool(buf)

        def messages_of(session_id: int) -> Iterator[tuple]:
            nonlocal at
            while at < len(buf) or fill():
                start = bisect_left(buf, session_id, at, key=_SESSION_OF)  # (skipped sessions' rows)
                end = bisect_right(buf, session_id, start, key=_SESSION_OF)
                at = end
                if start < end:
                    yield from buf[start:end]
                if end < len(buf):  # the next session's rows follow: this one is done
                    return

        for srow in sessions:
            if srow[0] not in chosen:
                continue
            msgs = messages_of(srow[0])
            yield Session(*srow), msgs
            for _ in msgs:  # whatever the writer did not read
                pass

    # -- incremental export ----------------------------------------------------------------------

    after_id_sql = "SELECT {columns} FROM messages WHERE id > ? AND id <= ? ORDER BY id"

    @contextmanager
    def snapshot(self) -> Iterator[int]:
        """One read transaction, for an incremental export: everything read inside it sees the
        same committed state, and what it yields is the newest message id in that state. A row
        committed later (even one whose transaction began before) has a higher id, so an export
        that goes up to this id and the next that starts after it miss nothing between them."""
        with self.db.guard:
            self.conn.execute("BEGIN")
            try:
                row = self.conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        try:
            yield row[0]
        finally:
            with self.db.guard:
                if self.conn.in_transaction:
                    self.conn.execute("COMMIT")

    def export_after(self, after_id: int, upto: int, chosen: set[int] | None, *, typed: bool = True
                     ) -> Iterator[tuple[Session, Iterator[tuple]]]:
        """The messages with ids in (after_id, upto], in id order, as (session, its messages)
        pairs, one pair for each run of consecutive messages of one session (a live room and a
        chat interleave). `chosen`: only these sessions (None: all). A range scan of the rowid."""
        columns = MSG_COLUMNS if typed else UNTYPED_MSG_COLUMNS
        rows = self._rows(self.after_id_sql.format(columns=columns), (after_id, upto), lambda last: (last[0], upto))
        sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ? AND {VISIBLE}"
        known: dict[int, Session | None] = {}
        pending = [next(rows, None)]

        def run_of(session_id: int) -> Iterator[tuple]:
            row = pending[0]
            while row is not None and row[1] == session_id:
                yield row
                row = next(rows, None)
            pending[0] = row

        while pending[0] is not None:
            session_id = pending[0][1]
            if session_id not in known:
                found = self.tolerant(lambda: self._one(sql, (session_id,)))  # noqa: B023 (called at once)
                known[session_id] = Session(*found) if found else None
            s = known[session_id]
            msgs = run_of(session_id)
            if s is not None and (chosen is None or session_id in chosen):
                yield s, msgs
            for _ in msgs:  # whatever the writer did not read, or a session left out
                pass

    def room_addresses(self, session_id: int) -> dict[int, tuple[str, int]]:
        """A room's lines, by sequence number: the address of the participant who said each."""
        rows = self.tolerant(lambda: self._all(
            f"SELECT m.seq, {sql_text('p.host')}, {sql_int('p.port')} FROM messages m "
            # (another linked server's participant has no address here: their own server has it)
            "JOIN participants p ON p.id = m.participant_id WHERE m.session_id = ? AND p.host IS NOT NULL",
            (session_id,),
        ))
        return {seq: (host, port) for seq, host, port in rows}

    def _export_each(self, ids: list[int], columns: str) -> Iterator[tuple[Session, Iterator[tuple]]]:
        sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ? AND {VISIBLE}"
        msgs = f"SELECT {columns} FROM messages WHERE session_id = ? AND seq > ? ORDER BY seq"
        for session_id in ids:
            row = self.tolerant(lambda: self._one(sql, (session_id,)))  # noqa: B023 (called at once)
            if row is None:  # deleted meanwhile
                continue
            yield Session(*row), self._rows(msgs, (session_id, -(2**63)), lambda last: (last[1], last[2]))

    # -- liveness --------------------------------------------------------------------------------

    def held(self, ids: list[int]) -> dict[int, str]:
        """Of these sessions, those still being recorded by a running server: id -> who holds
        it (`pid P on HOST`). A session left open by a server that died is not held."""
        if not ids:
            return {}
        marks = ", ".join("?" * len(ids))
        rows = self.tolerant(lambda: self._all(
            f"SELECT s.id, s.server_id, v.pid, v.hostname FROM sessions s "
            f"LEFT JOIN servers v ON v.id = s.server_id WHERE s.id IN ({marks}) AND s.ended_at IS NULL",
            ids,
        ))
        if not rows:
            return {}
        locks = ServerLocks(self.path, create=False)
        try:
            # The host name comes from the file, which may have been made anywhere: made visible.
            return {
                sid: f"pid {pid} on {visible(str(host))}" for sid, server, pid, host in rows if locks.alive(server)
            }
        finally:
            locks.close()

    # -- backing up ------------------------------------------------------------------------------

    def is_database_file(self, path: str | os.PathLike) -> bool:
        """Whether `path` is this database or one of the files beside it (-wal, -shm, -journal,
        -lock), however spelt: writing there would destroy the archive."""
        return is_database_file(path, self.path)

_WORD = re.compile(r'"([^"]*)"?|(\S+)')


def fts_query(text: str) -> str:
    """What a person types, as an FTS5 query: each word must appear (quoted, so hyphens,
    apostrophes and operators are searched for, not parsed); "words in quotes" must appear as
    that phrase; a word ending in * matches any word it begins."""
    parts = []
    for m in _WORD.finditer(text):
        phrase, word = m.group(1), m.group(2)
        if phrase is not None:
            if phrase.strip():
                parts.append('"' + phrase.replace('"', '""') + '"')
            continue
        prefix = word.endswith("*") and len(word.rstrip("*")) > 0
        word = word.rstrip("*") if prefix else word
        if word.strip("*"):
            parts.append('"' + word.replace('"', '""') + '"' + (" *" if prefix else ""))
    return " ".join(parts)


def bad_query_line(query: str, sqlite_text: str) -> str:
    """SQLite's complaint about a search query, said in terms of the query."""
    if "no such column" in sqlite_text:
        name = sqlite_text.split(":", 1)[-1].strip()
        why = f"'{name}:' looks like a column filter; put the word in quotes to search for it"
    elif "unterminated string" in sqlite_text:
        why = "a quote is not closed"
    elif "syntax error near" in sqlite_text:
        near = sqlite_text.split("near", 1)[-1].strip()
        why = f"it cannot be read near {near} (AND, OR, NOT and NEAR need words on both sides)"
    elif "unknown special query" in sqlite_text:
        why = "a '*' must follow a word"
    else:
        why = "it is not valid search syntax"
    return f"invalid search query {query!r}: {why}"


def filter_sql(f: "Filters | None") -> tuple[str, list]:
    """The WHERE conditions on `sessions` for a set of filters, and their parameters."""
    if f is None:
        return VISIBLE, []
    clauses: list[str] = [VISIBLE]
    args: list = []
    if f.ids:
        clauses.append(f"sessions.id IN ({', '.join('?' * len(f.ids))})")
        args += list(f.ids)
    if f.handle is not None:  # a 1:1 chat's handle, a room's participant's, or a name said under in a room
        clauses.append(  # (each subquery reads an index: a room's events under the name, linked lines)
            "(sessions.handle = ? OR sessions.id IN (SELECT session_id FROM participants WHERE handle = ?) "
            "OR sessions.id IN (SELECT session_id FROM messages WHERE sender = 'event' AND handle = ?) "
            "OR sessions.id IN (SELECT session_id FROM messages WHERE origin_server IS NOT NULL AND handle = ?))"
        )
        args += [f.handle, f.handle, f.handle, f.handle]
    for column, value, op in (
        ("client_host", f.host, "="),
        ("started_at", f.since, ">="),
        ("started_at", f.until, "<"),
    ):
        if value is not None:
            clauses.append(f"sessions.{column} {op} ?")
            args.append(value)
    if f.before is not None:
        clauses.append("sessions.id < ?")
        args.append(f.before)
    if f.ended_only:
        clauses.append("sessions.ended_at IS NOT NULL")
    if f.verified:
        clauses.append(f"({SESSION_VERIFIED})")
    if f.kind is not None:
        clauses.append(f"{sql_text('sessions.kind', 'chat')} = ?")
        args.append(f.kind)
    return " AND ".join(clauses), args
