"""The few writes the server makes, in plain SQL: nothing heavy is imported on the chat path.

Each call is one small transaction (autocommit) in WAL mode, so a message is committed (see
docs/reliability.md for what that survives) the moment `add_message` returns; `transaction()`
groups several calls into one. Times come in as epoch seconds and are stored as UTC ISO text.

A busy database (another process writing: a delete, a backup, a migration) is waited for, in
short steps so signals stay responsive: after WAIT_NOTICE seconds `on_wait(seconds, False)` is
called once, and `on_wait(seconds, True)` when the write has gone through (seconds: the whole
wait). Nothing is lost. While
`should_stop()` is true the waiting ends with `StoreFailed`, as does any write that fails for
good (disk full, read-only file, I/O error), with one line saying so.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from chatlog import indexer, txn
from chatlog.db import DB, ServerLocks, StoreFailed, connect, failure_line, hostname
from chatlog.records import iso
from chatlog.schema import message_count

WAL_CHECK_EVERY = 1000  # commits between looks at the WAL's size (see DB.restart_wal)
WAIT_NOTICE = 1.5  # seconds of waiting on a busy database before the operator is told
BUSY_TIMEOUT_MS = 50  # SQLite's own wait per attempt: short, so a signal is handled promptly
CLOSE_INDEX_SECONDS = 10.0  # at most this long indexing what is pending when the server stops
RAW_KEEP = 1024  # bytes of a message's raw form kept; the rest is counted in its note

_FINAL_COUNTS = (
    f"client_messages = {message_count('client')}, server_messages = {message_count('server')}"
)


def stream_position(conn: sqlite3.Connection, room: str) -> int:
    """How far `room`'s stream is committed in this archive: `room_links.last_seq`, or the stream
    sequence of the room's newest line if later. A stream message that brought one line is
    recorded by that line alone (one INSERT, committed on its own: it carries its sequence), and
    the position written down after it at most once a second while lines come (LINK_POSITION_EVERY)
    and as the room ends; anything else moves it in the transaction that records it."""
    row = conn.execute("SELECT last_seq FROM room_links WHERE room = ?", (room,)).fetchone()
    last = row[0] if row else 0
    for (sid,) in conn.execute("SELECT id FROM sessions WHERE kind = 'room' AND room = ? ORDER BY id DESC",
                               (room,)).fetchall():
        row = conn.execute("SELECT stream_seq FROM messages WHERE session_id = ? AND stream_seq IS NOT NULL "
                           "ORDER BY seq DESC LIMIT 1", (sid,)).fetchone()
        if row is not None:
            return max(last, row[0])
    return last


# A message's id is never one a deleted message had (m013: SQLite alone would give the newest
# deleted id again, and an incremental export's cursor, already past it, would skip the new one).
_NEXT_ID = "max(coalesce((SELECT max(id) FROM {t}), 0), (SELECT upto FROM id_floors WHERE name = '{t}')) + 1"
_INSERT_MESSAGE = (
    "INSERT INTO messages (id, session_id, seq, at, sender, handle, text, raw, note, participant_id, verified) "
    f"VALUES ({_NEXT_ID.format(t='messages')}, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# A pass's few messages (a 1:1 turn: the line and its answer) in one statement, committed on its
# own as one: the first takes the next id, each next one NULL, which SQLite makes max(id) + 1.
# (no participant: a 1:1 chat's; the NULL written here, not bound: binding None costs an adaptation)
_VALUES = "(?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)"
_INSERT_ROWS = (
    "INSERT INTO messages (id, session_id, seq, at, sender, handle, text, raw, note, participant_id, verified) "
    f"VALUES ({_NEXT_ID.format(t='messages')}, " + _VALUES[1:]
)
ROWS_AT_ONCE = 8  # at most this many messages in one such statement
# The same after a message this connection committed on its own (`Recorder._last_id`): SQLite's
# own id (NULL: max(id) + 1) is above every id ever deleted while that message still stands,
# since deleting it would have raised the floor to it. So only the floor is read, not `messages`,
# which in its own INSERT makes SQLite copy the rows aside first (an ephemeral table: 16 us of a
# 1:1 turn's 100 in the server, measured). Once the floor has reached it (it, or a newer one,
# was deleted), the first id is text: the statement fails as a datatype mismatch, changing
# nothing, and the rows go in by the rule above.
_INSERT_ROWS_AFTER = _INSERT_ROWS.replace(
    _NEXT_ID.format(t="messages"),
    "CASE WHEN (SELECT upto FROM id_floors WHERE name = 'messages') < ? THEN NULL ELSE 'stale' END",
)
# A row without raw bytes or a note (nearly every one) has its NULLs in the text, not bound.
_PLAIN = "(?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?)"


@functools.cache  # (at most 2 ** (ROWS_AT_ONCE + 1) - 2 texts; a 1:1 chat uses one or two)
def _rows_sql(shape: tuple[bool, ...]) -> tuple[str, str]:
    """The statement's text, plain and after (`_INSERT_ROWS_AFTER`), for rows each with its raw
    bytes and note bound (True) or plain (False), made once: the statement cache is keyed by it."""
    first, *more = [(_VALUES if kept else _PLAIN)[1:] for kept in shape]
    tail = "".join(", (NULL, " + v for v in more)
    return (_INSERT_ROWS.removesuffix(_VALUES[1:]) + first + tail,
            _INSERT_ROWS_AFTER.removesuffix(_VALUES[1:]) + first + tail)
# A busy pass's messages take the ids after the first, given in one go (the transaction holds
# the write lock, so nobody else takes one meanwhile).
_FIRST_ID = f"SELECT {_NEXT_ID.format(t='messages')}"
_INSERT_MESSAGES = (
    "INSERT INTO messages (id, session_id, seq, at, sender, handle, text, raw, note, participant_id, verified) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# A run of one client's plain lines of a linked room, a row each (`add_linked_lines`)
_INSERT_LINKED_LINES = (
    "INSERT INTO messages (id, session_id, seq, at, sender, handle, text, participant_id, verified, "
    "origin_server, origin_id, stream_seq) VALUES (?, ?, ?, ?, 'client', ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (origin_server, origin_id) WHERE origin_server IS NOT NULL DO NOTHING"
)
# A run of one client's plain lines said at one time, in one statement: their texts as one JSON
# array, each row's id and seq the first ones plus its place in it. Binding one array instead of
# eleven values a row (executemany) took 512-row transactions from 5.4 to 2.4 us a row, with
# messages' indexes and foreign keys as they are.
_INSERT_LINES = (
    "INSERT INTO messages (id, session_id, seq, at, sender, handle, text, participant_id, verified) "
    "SELECT ?1 + key, ?2, ?3 + key, ?4, 'client', ?5, value, ?6, ?7 FROM json_each(?8)"
)


def _kept(raw: bytes | None, note: str | None) -> tuple[bytes | None, str | None]:
    """Of a message's raw bytes the first RAW_KEEP are kept, and the note says how many more came."""
    if raw is not None and len(raw) > RAW_KEEP:
        cut = f"raw bytes cut at {RAW_KEEP}; {len(raw) - RAW_KEEP} more received"
        return raw[:RAW_KEEP], f"{note}; {cut}" if note else cut
    return raw, note


def open_recorder(path: str | os.PathLike, *, fsync: bool = False, **kwargs) -> "Recorder":
    """Open (creating it if needed) the database at `path` for the server to write."""
    return Recorder(connect(path, create=True, fsync=fsync), **kwargs)


class Recorder:
    def __init__(
        self,
        conn_or_db: DB | str | os.PathLike,
        *,
        on_wait: Callable[[float, bool], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ):
        self.db = conn_or_db if isinstance(conn_or_db, DB) else connect(conn_or_db, create=True)
        self.conn = self.db.conn
        self.path = self.db.path
        self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self.on_wait = on_wait
        self.should_stop = should_stop
        self.server_id: int | None = None
        self._locks: ServerLocks | None = None
        self._seq: dict[int, int] = {}
        self._commits = 0
        self._in_tx = False
        self._last_id: int | None = None  # the newest message committed here on its own, by id
        try:  # SQLite's JSON functions (built in since 3.38; an older build may lack them)
            self._json = self.conn.execute("SELECT json_array_length('[1]')").fetchone()[0] == 1
        except sqlite3.Error:
            self._json = False

    # -- the one way anything is written ---------------------------------------------------------

    def _run(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        """Run one statement, waiting out a busy database; a lasting failure is StoreFailed.
        SQLite's own wait (BUSY_TIMEOUT_MS) polls the lock densely; no backoff on top of it,
        or a writer would sleep through the gaps a batched delete leaves."""
        try:
            return txn.execute(
                self.conn, sql, args, should_stop=self.should_stop, on_wait=self.on_wait, notice_after=WAIT_NOTICE
            )
        except (txn.Busy, sqlite3.Error) as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: BaseException) -> StoreFailed:
        if isinstance(exc, txn.Busy):
            return StoreFailed(
                f"cannot write the database {self.path}: another process has held it "
                f"locked for {exc.waited:.1f} s"
            )
        return StoreFailed(failure_line(self.path, exc))

    @contextmanager
    def transaction(self) -> Iterator["Recorder"]:
        """Everything inside is one transaction. The write lock is taken first (BEGIN IMMEDIATE,
        waited for like any write), so nothing inside can meet a busy database: in WAL mode the
        holder of the write lock is never refused. On an error all of it is rolled back, the
        sequence numbers with it. Nested uses join the outer one."""
        if self._in_tx:
            yield self
            return
        saved = dict(self._seq)
        self._in_tx = True
        try:
            with txn.write_transaction(
                self.conn, should_stop=self.should_stop, on_wait=self.on_wait, notice_after=WAIT_NOTICE
            ):
                yield self
        except (txn.Busy, sqlite3.Error) as exc:
            self._seq = saved
            raise self._failure(exc) from None
        except BaseException:
            self._seq = saved
            raise
        finally:
            self._in_tx = False
        self._committed()

    def _committed(self) -> None:
        self.db.wrote()
        self._commits += 1
        if self._commits % WAL_CHECK_EVERY == 0 and self.db.checkpointing:
            self.db.restart_wal()

    # -- the server's life -----------------------------------------------------------------------

    def start(self, host: str, port: int, at: float) -> tuple[int, int]:
        """Called once the server listens: records this server and takes its liveness lock,
        closes the sessions left open by servers no longer alive (as `interrupted`; a live
        server's sessions are left alone), and starts the background checkpointer (which also
        indexes for search what a server killed before it could left unindexed).
        Returns (server id, orphans closed)."""
        self._locks = ServerLocks(self.path, create=True)
        if self._locks.fd is None:
            raise StoreFailed(f"cannot write the database {self.path}: cannot create {self._locks.path}")
        with self.transaction():
            self.server_id = self._run(
                "INSERT INTO servers (pid, hostname, host, port, started_at) VALUES (?, ?, ?, ?, ?)",
                (os.getpid(), hostname(), host, port, iso(at)),
            ).lastrowid
            try:
                self._locks.hold(self.server_id)
            except OSError as exc:
                raise StoreFailed(
                    f"cannot write the database {self.path}: cannot lock {self._locks.path} ({exc.strerror})"
                ) from None
            orphans = self._close_orphans()
        self.db.start_checkpointer()
        return self.server_id, orphans

    def _close_orphans(self) -> int:
        owners = [r[0] for r in self._run("SELECT DISTINCT server_id FROM sessions WHERE ended_at IS NULL")]
        dead = [o for o in owners if o is None or not (o == self.server_id or self._locks.alive(o))]
        if not dead:
            return 0
        n = 0
        for owner in dead:
            n += self._run(
                f"UPDATE sessions SET end_reason = 'interrupted', {_FINAL_COUNTS}, "
                "ended_at = coalesce((SELECT max(m.at) FROM messages m "
                "WHERE m.session_id = sessions.id), served_at, started_at) "
                "WHERE ended_at IS NULL AND server_id IS ?",
                (owner,),
            ).rowcount
            self._run(
                "UPDATE participants SET left_at = coalesce(left_at, (SELECT ended_at FROM sessions s "
                "WHERE s.id = participants.session_id)), end_reason = coalesce(end_reason, 'interrupted') "
                "WHERE left_at IS NULL AND session_id IN (SELECT id FROM sessions WHERE server_id IS ? "
                "AND end_reason = 'interrupted')",
                (owner,),
            )
        return n

    def close_orphans(self, at: float | None = None) -> int:
        """Close every session whose server is not alive (without starting a server)."""
        if self._locks is None:
            self._locks = ServerLocks(self.path, create=True)
        with self.transaction():
            return self._close_orphans()

    def close(self) -> None:
        """Index every message still pending (see chatlog.indexer), so a server that stops leaves
        a complete search index; record the stop; close."""
        try:
            indexer.catch_up(self.conn, CLOSE_INDEX_SECONDS)
        except sqlite3.Error:
            pass  # a store that cannot be written: the next start, or a search, catches up
        if self.server_id is not None:
            try:
                self._run("UPDATE servers SET stopped_at = ? WHERE id = ?", (iso(time.time()), self.server_id))
            except StoreFailed:
                pass
        self.db.close()
        if self._locks is not None:
            self._locks.close()  # the liveness lock goes last: nothing of ours is open now

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
        room: str | None = None,
    ) -> int:
        when = iso(at)
        session_id = self._run(
            "INSERT INTO sessions (id, started_at, served_at, client_host, client_port, "
            f"server_host, server_port, server_id, kind, room) VALUES ({_NEXT_ID.format(t='sessions')}, "
            "?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (when, when if served else None, client_host, client_port, server_host, server_port,
             self.server_id, kind, room),
        ).lastrowid
        if not self._in_tx:
            self._committed()
        self._seq[session_id] = 0
        return session_id

    def set_link(self, table: str, row_id: int, link) -> None:
        """How a session's client (table 'sessions') or a participant ('participants') is
        connected, when not by plain TCP (an `events.Link`)."""
        assert table in ("sessions", "participants")
        self._run(
            f"UPDATE {table} SET transport = ?, tls_version = ?, tls_cipher = ?, cert_fingerprint = ? WHERE id = ?",
            (link.transport, link.version, link.cipher, link.fingerprint, row_id),
        )

    def set_verified(self, table: str, row_id: int) -> None:
        """Its handle is bound to the certificate it presented."""
        assert table in ("sessions", "participants")
        self._run(f"UPDATE {table} SET verified = 1 WHERE id = ?", (row_id,))

    def bindings(self) -> dict[str, str]:
        """Every handle bound to a certificate: handle -> fingerprint."""
        return dict(self._run("SELECT handle, fingerprint FROM identities").fetchall())

    def bind(self, skeleton: str, handle: str, fingerprint: str, at: float) -> None:
        """Bind a handle to a certificate (or note that the bound certificate used it again)."""
        when = iso(at)
        self._run(
            "INSERT INTO identities (handle, skeleton, fingerprint, first_seen, last_seen) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (skeleton) DO UPDATE SET last_seen = excluded.last_seen, sessions = sessions + 1 "
            "WHERE fingerprint = excluded.fingerprint",
            (handle, skeleton, fingerprint, when, when),
        )

    def forget_handle(self, handle: str) -> int:
        return self._run("DELETE FROM identities WHERE handle = ?", (handle,)).rowcount

    def serve_session(self, session_id: int, at: float) -> None:
        self._run("UPDATE sessions SET served_at = ? WHERE id = ?", (iso(at), session_id))

    def set_handle(self, session_id: int, handle: str) -> None:
        self._run("UPDATE sessions SET handle = ? WHERE id = ? AND handle IS NULL", (handle, session_id))

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
        verified: bool = False,
    ) -> int:
        """Commit one message; returns its sequence number. The hot path: one INSERT, one commit.
        Of its raw bytes the first RAW_KEEP are kept, and the note says how many more came."""
        raw, note = _kept(raw, note)
        seq = self._seq.get(session_id)
        seq = (self._last_seq(session_id) if seq is None else seq) + 1
        self._run(_INSERT_MESSAGE, (session_id, seq, iso(at), sender, handle, text, raw, note, participant, verified))
        self._seq[session_id] = seq
        if not self._in_tx:
            self._committed()
        return seq

    def add_message_rows(self, rows: list[tuple]) -> list[int]:
        """A few messages, of any sessions, in one INSERT (at most ROWS_AT_ONCE): committed on
        its own, all or none, outside `transaction()`. Rows of (session_id, sender, handle, text,
        raw, note, at, verified), in order; returns their sequence numbers."""
        assert 0 < len(rows) <= ROWS_AT_ONCE
        seqs, args, last, shape = [], [], {}, []
        for session_id, sender, handle, text, raw, note, at, verified in rows:
            seq = last.get(session_id) or self._seq.get(session_id)
            seq = (self._last_seq(session_id) if seq is None else seq) + 1
            last[session_id] = seq
            if raw is None and note is None:
                args += (session_id, seq, iso(at), sender, handle, text, 1 if verified else 0)
                shape.append(False)
            else:
                raw, note = _kept(raw, note)
                args += (session_id, seq, iso(at), sender, handle, text, raw, note, 1 if verified else 0)
                shape.append(True)
            seqs.append(seq)
        full, after = _rows_sql(tuple(shape))
        if self._in_tx or self._last_id is None:
            cur = self._run(full, args)
        else:
            cur = self._run_after(after, args, full)
        self._seq.update(last)
        if self._in_tx:
            self._last_id = None  # (the transaction may yet be rolled back)
        else:
            self._last_id = cur.lastrowid
            self._committed()
        return seqs

    def _run_after(self, sql: str, args: list, fallback: str) -> sqlite3.Cursor:
        """`sql` with `_last_id` first; `fallback` if that message no longer stands (see
        _INSERT_ROWS_AFTER)."""
        try:
            return txn.execute(
                self.conn, sql, (self._last_id, *args), should_stop=self.should_stop, on_wait=self.on_wait,
                notice_after=WAIT_NOTICE,
            )
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorname", None) != "SQLITE_MISMATCH":
                raise self._failure(exc) from None
        except txn.Busy as exc:
            raise self._failure(exc) from None
        self._last_id = None
        return self._run(fallback, args)

    def add_messages(self, session_id: int, rows: list[tuple]) -> None:
        """Many messages of one session in one statement (inside a transaction): rows of
        (sender, handle, text, raw, note, at, participant, verified), in order. A room's busy pass."""
        seq = self._seq.get(session_id)
        seq = self._last_seq(session_id) if seq is None else seq
        params = []
        next_id = self._run(_FIRST_ID).fetchone()[0]
        for sender, handle, text, raw, note, at, participant, verified in rows:
            if raw is not None and len(raw) > RAW_KEEP:
                cut = f"raw bytes cut at {RAW_KEEP}; {len(raw) - RAW_KEEP} more received"
                note = f"{note}; {cut}" if note else cut
                raw = raw[:RAW_KEEP]
            seq += 1
            params.append((next_id, session_id, seq, iso(at), sender, handle, text, raw, note, participant, verified))
            next_id += 1
        self._run_many(_INSERT_MESSAGES, params)
        self._seq[session_id] = seq

    def add_lines(self, session_id: int, handle: str, lines: list[tuple[str, float]], participant: int | None,
                  verified: bool) -> None:
        """A run of one client's plain lines (printable ASCII, no raw form, no note), rows of
        (text, at), in order, inside a transaction: what `add_messages` would write, in one
        statement for each stretch said at one time (a read's lines share theirs)."""
        if not self._json:
            self.add_messages(session_id, [("client", handle, text, None, None, at, participant, verified)
                                           for text, at in lines])
            return
        assert self._in_tx, "add_lines runs inside transaction()"
        seq = self._seq.get(session_id)
        seq = self._last_seq(session_id) if seq is None else seq
        next_id = self._run(_FIRST_ID).fetchone()[0]
        i, n = 0, len(lines)
        while i < n:
            at = lines[i][1]
            j = i + 1
            while j < n and lines[j][1] == at:
                j += 1
            texts = json.dumps([text for text, _ in lines[i:j]])
            self._run(_INSERT_LINES, (next_id, session_id, seq + 1, iso(at), handle, participant, verified, texts))
            next_id += j - i
            seq += j - i
            i = j
        self._seq[session_id] = seq

    def _run_many(self, sql: str, params: list[tuple]) -> None:
        """executemany inside a transaction (which holds the write lock: never busy)."""
        assert self._in_tx, "add_messages runs inside transaction()"
        try:
            self.conn.executemany(sql, params)
        except sqlite3.Error as exc:
            raise StoreFailed(failure_line(self.path, exc)) from None

    def end_session(self, session_id: int, reason: str, at: float) -> tuple[int, int]:
        """Record the end and the final counts (unless it had ended already); returns the counts."""
        row = self._run(
            f"UPDATE sessions SET ended_at = coalesce(ended_at, ?), end_reason = coalesce(end_reason, ?), "
            f"{_FINAL_COUNTS} WHERE id = ? RETURNING client_messages, server_messages",
            (iso(at), reason, session_id),
        ).fetchone()
        self._seq.pop(session_id, None)
        return (row[0], row[1]) if row else (0, 0)

    def add_refusal(self, host: str, reason: str, at: float) -> int:
        """Count a refused connection; returns how many from this host for this reason in this
        minute, this one included (so the caller can stop reporting a flood)."""
        when = iso(at)
        return self._run(
            "INSERT INTO refusals (host, reason, minute, count, first_at, last_at) VALUES (?, ?, ?, 1, ?, ?) "
            "ON CONFLICT (host, reason, minute) DO UPDATE SET count = count + 1, last_at = excluded.last_at "
            "RETURNING count",
            (host, reason, when[:16], when, when),
        ).fetchone()[0]

    # -- rooms -----------------------------------------------------------------------------------

    def add_participant(self, session_id: int, host: str, port: int, at: float) -> int:
        return self._run(
            "INSERT INTO participants (session_id, host, port, joined_at) VALUES (?, ?, ?, ?)",
            (session_id, host, port, iso(at)),
        ).lastrowid

    def set_participant_origin(self, participant_id: int, server: str, key: str) -> None:
        """A linked room's participant: the server they are on and their key there."""
        self._run("UPDATE participants SET origin_server = ?, origin_key = ? WHERE id = ?", (server, key, participant_id))

    def add_remote_participant(self, session_id: int, server: str, key: str, handle: str | None, at: float) -> int:
        """A linked room's participant on another server (no address here: that server has it)."""
        return self._run(
            "INSERT INTO participants (session_id, handle, joined_at, origin_server, origin_key) VALUES (?, ?, ?, ?, ?)",
            (session_id, handle, iso(at), server, key),
        ).lastrowid

    def reopen_participant(self, participant_id: int, handle: str | None) -> None:
        """A participant on another server is in the room again (back after being taken for
        gone, or joined again under another name)."""
        self._run("UPDATE participants SET handle = coalesce(?, handle), left_at = NULL, end_reason = NULL WHERE id = ?",
                  (handle, participant_id))

    def set_participant_handle(self, participant_id: int, handle: str) -> None:
        self._run("UPDATE participants SET handle = ? WHERE id = ?", (handle, participant_id))

    def end_participant(self, participant_id: int, reason: str, at: float) -> None:
        self._run(
            "UPDATE participants SET left_at = ?, end_reason = ? WHERE id = ? AND left_at IS NULL",
            (iso(at), reason, participant_id),
        )

    def add_event(self, session_id: int, participant_id: int, text: str, at: float) -> int:
        """A join or leave in a room, in order with the messages (sender 'event', not searchable)."""
        handle = self._run("SELECT handle FROM participants WHERE id = ?", (participant_id,)).fetchone()
        return self.add_message(
            session_id, "event", handle[0] if handle else None, text, None, None, at, participant_id
        )

    def room_history(self, room: str, n: int) -> list[tuple[str, str, str | None, str]]:
        """The last `n` lines people said in the room named `room`, over every run of it, oldest
        first, as (at, sender, handle, text): client and operator lines that were relayed (not
        joins or leaves, not lines kept back with a note that says `not relayed`). Read one
        session at a time, newest first, each backwards along its (session, seq) index, so a
        join costs a few rows however long the room's record is."""
        out: list[tuple[str, str, str | None, str]] = []
        if n <= 0:
            return out
        sessions = self._run(
            "SELECT id FROM sessions WHERE room = ? AND deleting = 0 ORDER BY id DESC", (room,)
        ).fetchall()
        for (sid,) in sessions:
            rows = self._run(
                "SELECT at, sender, handle, text FROM messages WHERE session_id = ? "
                "AND sender IN ('client', 'server') AND (note IS NULL OR note NOT LIKE '%not relayed%') "
                "ORDER BY seq DESC LIMIT ?",
                (sid, n - len(out)),
            ).fetchall()
            out += rows
            if len(out) >= n:
                break
        out.reverse()
        return out

    # -- a room linked through a broker (chatlog.link) -------------------------------------------

    def node_uid(self) -> str:
        """This archive's stable identity (schema m014): every line it originates carries it."""
        return self._run("SELECT uid FROM node WHERE id = 1").fetchone()[0]

    def room_open_elsewhere(self, room: str) -> tuple[int, int | None] | None:
        """(pid, port) of another server alive now that has `room` open in this archive (None:
        none). Two servers of one archive in one linked room would share its stream position
        and write every line twice into one file."""
        for server, pid, port in self._run(
            "SELECT DISTINCT s.server_id, v.pid, v.port FROM sessions s JOIN servers v ON v.id = s.server_id "
            "WHERE s.kind = 'room' AND s.room = ? AND s.ended_at IS NULL AND s.server_id != ?",
            (room, self.server_id),
        ).fetchall():
            if self._locks is not None and self._locks.alive(server):
                return pid, port
        return None

    def link_resume(self, room: str, stream: str) -> int:
        """The last stream sequence of `room` committed here (0: none yet), written down as the
        room's position again (see `stream_position`)."""
        self._run("INSERT INTO room_links (room, stream) VALUES (?, ?) ON CONFLICT (room) DO NOTHING", (room, stream))
        seq = stream_position(self.conn, room)
        self.link_advance(room, seq)
        return seq

    def link_advance(self, room: str, seq: int) -> None:
        """`room`'s stream is committed up to `seq` (with what it brought: same transaction)."""
        self._run("UPDATE room_links SET last_seq = ? WHERE room = ? AND last_seq < ?", (seq, room, seq))

    def add_linked(self, session_id: int, sender: str, handle: str | None, text: str, raw: bytes | None,
                   note: str | None, at: float, participant: int | None, verified: bool,
                   origin_server: str, origin_id: str, stream_seq: int | None) -> int | None:
        """One line of a linked room, with its origin and stream sequence; None if this archive
        has it already (a line is its origin: the same line is never recorded twice). A line
        kept here alone (`stream_seq` None) that the stream brings after all gets its sequence,
        and the stream's note in place of the one that said it was not relayed."""
        if raw is not None and len(raw) > RAW_KEEP:
            cut = f"raw bytes cut at {RAW_KEEP}; {len(raw) - RAW_KEEP} more received"
            note = f"{note}; {cut}" if note else cut
            raw = raw[:RAW_KEEP]
        seq = self._seq.get(session_id)
        seq = (self._last_seq(session_id) if seq is None else seq) + 1
        added = self._run(
            "INSERT INTO messages (id, session_id, seq, at, sender, handle, text, raw, note, participant_id, verified, "
            f"origin_server, origin_id, stream_seq) VALUES ({_NEXT_ID.format(t='messages')}, "
            "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (origin_server, origin_id) WHERE origin_server IS NOT NULL DO NOTHING",
            (session_id, seq, iso(at), sender, handle, text, raw, note, participant, verified,
             origin_server, origin_id, stream_seq),
        ).rowcount
        if not added:
            if stream_seq is not None:  # relayed after all: its note is the stream's, not "not relayed",
                # and its place in the session is where the stream put it, after what the stream
                # brought before it (committed here after the line was kept), as on every archive
                # (its id stays: an export's cursor has passed it once already)
                moved = self._run(
                    "UPDATE messages SET stream_seq = ?, note = ?, seq = ? WHERE origin_server = ? AND origin_id = ? "
                    "AND stream_seq IS NULL AND session_id = ?",
                    (stream_seq, note, seq, origin_server, origin_id, session_id)).rowcount
                if moved:
                    self._seq[session_id] = seq
                else:  # (kept in an earlier session of the room: it stays there)
                    self._run("UPDATE messages SET stream_seq = ?, note = ? WHERE origin_server = ? AND origin_id = ? "
                              "AND stream_seq IS NULL", (stream_seq, note, origin_server, origin_id))
            return None
        self._seq[session_id] = seq
        if not self._in_tx:
            self._committed()
        return seq

    def add_linked_lines(self, session_id: int, handle: str, lines: list, participant: int | None, verified: bool,
                         origin_server: str, origin_ids: list[str], stream_seq: int) -> None:
        """A run of one client's plain lines of a linked room (no raw form, no note), rows of
        (text, at) with their origin ids, in order, inside a transaction: what `add_linked` would
        write for each, in one statement. Should this archive have any of them already (a
        publication the stream brought twice), none is written so, and each goes through
        `add_linked`, which leaves out what is here."""
        assert self._in_tx, "add_linked_lines runs inside transaction()"
        if len(lines) == 1:  # (a paced room's line: one INSERT, as ever)
            (text, at), = lines
            self.add_linked(session_id, "client", handle, text, None, None, at, participant, verified,
                            origin_server, origin_ids[0], stream_seq)
            return
        seq = self._seq.get(session_id)
        seq = self._last_seq(session_id) if seq is None else seq
        next_id = self._run(_FIRST_ID).fetchone()[0]
        rows = [(next_id + i, session_id, seq + 1 + i, iso(at), handle, text, participant, verified, origin_server, oid,
                 stream_seq) for i, ((text, at), oid) in enumerate(zip(lines, origin_ids, strict=True))]
        self._run("SAVEPOINT linked_lines")
        try:
            added = self.conn.executemany(_INSERT_LINKED_LINES, rows).rowcount
        except sqlite3.Error as exc:
            raise StoreFailed(failure_line(self.path, exc)) from None
        if added == len(rows):
            self._run("RELEASE linked_lines")
            self._seq[session_id] = seq + len(rows)
            return
        self._run("ROLLBACK TO linked_lines")
        self._run("RELEASE linked_lines")
        for (text, at), oid in zip(lines, origin_ids, strict=True):
            self.add_linked(session_id, "client", handle, text, None, None, at, participant, verified,
                            origin_server, oid, stream_seq)

    def _last_seq(self, session_id: int) -> int:
        row = self._run("SELECT max(seq) FROM messages WHERE session_id = ?", (session_id,)).fetchone()
        return row[0] or 0
