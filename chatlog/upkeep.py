"""Upkeep of an archive: deleting sessions (rm, prune), removing messages (rm --message, forget),
retention, and backing it up.

Apart from the archive's reads (chatlog.archive), which never write: these are the tools that
change the file, or copy it whole.

Rows are deleted through sqlite-utils' `Database(conn)` over the connection db.py opened (its
`delete_where` joins our write transaction as a savepoint). The reads do not use it: importing
sqlite_utils takes 85-110 ms here, as long as a whole `chatlog show` of 1,000 messages, and no
read command may get slower; the chat path never imports it.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from chatlog import txn
from chatlog.archive import DELETING, VISIBLE, Archive
from chatlog.db import StoreError, checkpoint, describe_error, no_room

DELETE_BATCH = 1000  # messages (with their search entries) in the first delete transaction
DELETE_HOLD = 0.02  # seconds each later one aims to hold the write lock (its size adapts)
REMOVE_BATCH = 200  # messages made tombstones in one transaction (rm --message, forget)
RETAIN_SESSIONS = 100  # sessions a retention step marks for deletion at most


class Upkeep:
    """Deletes and backups on an open archive's connection."""

    def __init__(self, archive: Archive):
        self.archive = archive
        self.db = archive.db
        self.conn = archive.conn
        self.path: Path = archive.path
        self._tables = None

    @property
    def tables(self):
        """sqlite-utils' view of the same connection (imported only when something is deleted)."""
        if self._tables is None:
            import sqlite_utils

            self._tables = sqlite_utils.Database(self.conn)
        return self._tables

    def delete_sessions(self, ids: list[int], *, batch: int | None = None) -> int:
        """Delete ended sessions with their messages, participants and search entries; returns
        how many of `ids` were deleted.

        A session still in progress is left alone (checked inside the write transaction, so it
        cannot start or resume between the check and the delete). The chosen sessions are first
        marked, which hides them from every read at once; then their messages go in batches of
        about DELETE_HOLD seconds each, each its own transaction, so the server's commits never wait long behind
        a large delete. An interrupted delete (Ctrl-C, a crash) is finished by the next one."""
        batch = batch or DELETE_BATCH
        chosen: list[int] = []
        if ids:
            marks = ", ".join("?" * len(ids))
            with self._write():
                chosen = [
                    r[0]
                    for r in self.conn.execute(
                        f"UPDATE sessions SET deleting = 1 WHERE id IN ({marks}) AND ended_at IS NOT NULL "
                        "RETURNING id",
                        ids,
                    )
                ]
        with self.db.guard:
            pending = [r[0] for r in self.conn.execute(f"SELECT id FROM sessions WHERE {DELETING} ORDER BY id")]
        for session_id in pending:
            self._delete_one(session_id, batch)
        return len(chosen)

    def _delete_one(self, session_id: int, batch: int, deadline: float | None = None) -> tuple[bool, int, int]:
        """Delete a marked session's messages batch by batch, then the session. With a
        `deadline` (perf_counter), stop after the batch that passes it. Returns (whether the
        session is gone, messages deleted, the batch size the next call should start with)."""
        deleted = 0
        while True:
            started = time.perf_counter()
            with self._write():
                n = self.conn.execute(
                    "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE session_id = ? "
                    "ORDER BY session_id, seq LIMIT ?)",
                    (session_id, batch),
                ).rowcount
                deleted += n
                if n < batch:
                    for table, where in (("messages", "session_id = ?"), ("participants", "session_id = ?"),
                                         ("sessions", "id = ?")):
                        self.tables[table].delete_where(where, [session_id])
                    return True, deleted, batch
            # The next batch is sized to hold the lock about DELETE_HOLD, and the lock is left free
            # as long as this one held it, so a writer that was waiting gets in first. Meanwhile
            # what this delete wrote is copied from the WAL into the database (a passive
            # checkpoint takes no lock a writer needs), so the WAL does not grow by the size of
            # the whole delete and the server never has to catch up on it in one go.
            held = max(time.perf_counter() - started, 1e-4)
            batch = max(100, min(20_000, int(batch * DELETE_HOLD / held)))
            paused = time.perf_counter()
            checkpoint(self.conn)
            time.sleep(max(0.0, min(0.05, held) - (time.perf_counter() - paused)))
            if deadline is not None and time.perf_counter() >= deadline:
                return False, deleted, batch

    def retain(self, older_than: float, budget: float, *, now: float | None = None) -> "Retained":
        """One bounded step of retention: delete ended sessions that ended more than
        `older_than` seconds ago (every line in them is older than that), for about `budget`
        seconds (plus at most one batch of about DELETE_HOLD), as delete_sessions does: marked
        first (hidden from every read), then their messages in small transactions. A session
        too big for one step is hidden and finished by the next (or by rm/prune)."""
        from chatlog.records import iso

        deadline = time.perf_counter() + budget
        cutoff = iso(max(0.0, (time.time() if now is None else now) - older_than))
        with self._write():
            self.conn.execute(
                "UPDATE sessions SET deleting = 1 WHERE id IN (SELECT id FROM sessions WHERE started_at < ? "
                "AND ended_at IS NOT NULL AND ended_at < ? AND deleting = 0 ORDER BY started_at LIMIT ?)",
                (cutoff, cutoff, RETAIN_SESSIONS),
            )
        sessions = messages = 0
        batch = DELETE_BATCH
        while True:
            with self.db.guard:
                row = self.conn.execute(f"SELECT id FROM sessions WHERE {DELETING} ORDER BY id LIMIT 1").fetchone()
            if row is None:
                break
            gone, n, batch = self._delete_one(row[0], batch, deadline)
            sessions += gone
            messages += n
            if time.perf_counter() >= deadline:
                break
        with self.db.guard:
            more = self.conn.execute(
                f"SELECT 1 FROM sessions WHERE {DELETING} OR (started_at < ? AND ended_at IS NOT NULL "
                "AND ended_at < ?) LIMIT 1",
                (cutoff, cutoff),
            ).fetchone() is not None
        return Retained(sessions, messages, more)

    # -- tombstones: removing messages, not sessions ----------------------------------------------

    def messages_to_remove(self, ids: list[int]) -> list[tuple[int, int, str | None, str | None]]:
        """Of these message ids, those that exist in a visible session and are not events:
        (id, session id, handle, removed_at) each, removed_at set for one removed already."""
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        with self.db.guard:
            return self.conn.execute(
                f"SELECT m.id, m.session_id, CAST(m.handle AS TEXT), CAST(m.removed_at AS TEXT) FROM messages m "
                f"JOIN sessions ON sessions.id = m.session_id WHERE m.id IN ({marks}) AND m.sender != 'event' "
                f"AND {VISIBLE} ORDER BY m.id",
                ids,
            ).fetchall()

    def said_by(self, handle: str, host: str | None = None) -> list[tuple[int, int]]:
        """(id, session id) of every line a person said and that is not removed yet: in 1:1
        chats with that handle (from `host`, if given), as a room participant with it (in a
        linked room, on another server too: not with `host`, their address is not known here),
        and in any room, said under it by whoever took it later (a participant keeps the name
        they came with)."""
        chat = "SELECT id FROM sessions WHERE handle = ? AND kind != 'room' AND deleting = 0"
        part = "SELECT id FROM participants WHERE handle = ?"
        args: list = [handle]
        if host is not None:
            chat += " AND client_host = ?"
            args.append(host)
        args.append(handle)
        if host is not None:
            part += " AND host = ?"
            args.append(host)
        sql = (
            f"SELECT id, session_id FROM messages WHERE session_id IN ({chat}) AND sender = 'client' "
            "AND removed_at IS NULL "
            f"UNION SELECT m.id, m.session_id FROM messages m JOIN sessions s ON s.id = m.session_id "
            f"WHERE m.participant_id IN ({part}) AND m.sender = 'client' AND m.removed_at IS NULL AND s.deleting = 0"
        )
        # Said under it in a room: by whoever was ever called it there (a join or rename under it,
        # through its own index), and, in a linked room, any line said under it (one from before
        # m018 has no participant). Each its own statement: in one UNION SQLite read the whole
        # messages table, in id order, for the ORDER BY (0.6 s at 2M).
        by_name = ("SELECT m.id, m.session_id FROM messages m JOIN sessions s ON s.id = m.session_id "
                   "WHERE m.participant_id IN (SELECT participant_id FROM messages WHERE sender = 'event' "
                   "AND handle = ? AND participant_id IS NOT NULL{}) AND m.handle = ? AND m.sender = 'client' "
                   "AND m.removed_at IS NULL AND s.deleting = 0")
        if host is None:
            more = [(by_name.format(""), [handle, handle]),
                    ("SELECT m.id, m.session_id FROM messages m JOIN sessions s ON s.id = m.session_id "
                     "WHERE m.origin_server IS NOT NULL AND m.handle = ? AND m.sender = 'client' "
                     "AND m.removed_at IS NULL AND s.deleting = 0", [handle])]
        else:  # by a participant from that address
            more = [(by_name.format(" AND participant_id IN (SELECT id FROM participants WHERE host = ?)"),
                     [handle, host, handle])]
        with self.db.guard:
            found = set(self.conn.execute(sql, args).fetchall())
            for q, q_args in more:
                found.update(self.conn.execute(q, q_args).fetchall())
        return sorted(found)

    def remove_messages(self, ids: list[int], *, batch: int = REMOVE_BATCH) -> int:
        """Make these messages tombstones: text '', raw bytes and note cleared, removed_at set (the
        messages_au trigger takes the old text out of the search index). In transactions of
        `batch` messages, each holding the write lock a few milliseconds, with the lock left free
        between them, so a live server's commits never wait long. Returns how many were removed
        (one removed already, or an event, is left alone)."""
        from chatlog.records import now_iso

        done = 0
        for i in range(0, len(ids), batch):
            chunk = ids[i:i + batch]
            marks = ", ".join("?" * len(chunk))
            started = time.perf_counter()
            with self._write():
                done += self.conn.execute(
                    f"UPDATE messages SET text = '', raw = NULL, note = NULL, removed_at = ? "
                    f"WHERE id IN ({marks}) AND removed_at IS NULL AND sender != 'event'",
                    [now_iso(), *chunk],
                ).rowcount
            if i + batch < len(ids):
                held = time.perf_counter() - started
                checkpoint(self.conn)
                time.sleep(min(0.05, held))
        return done

    @contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction, waiting out a busy database; any failure is one StoreError."""
        with self.db.guard, txn.write_transaction(self.conn, pause=0.002, max_pause=0.05):
            yield

    def backup(self, dest: str | os.PathLike) -> None:
        """A consistent copy through SQLite's online backup API (safe while the server writes),
        made beside `dest` and renamed over it once whole and synced: one that fails (a full
        disk) leaves `dest` as it was, a previous backup too, and nothing beside it. A disk that
        fills is OSError (ENOSPC) for `dest`, not an error of the database read."""
        if self.archive.is_database_file(dest):
            raise StoreError(f"{dest} is the database {self.path} or one of its files; choose another path")
        dest = Path(dest)
        if dest.is_symlink():
            dest = Path(os.path.realpath(dest))  # the file it points to, not the link
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            target = sqlite3.connect(tmp)
            try:
                try:
                    self.conn.backup(target)
                except sqlite3.Error as exc:
                    if no_room(tmp, exc):
                        raise OSError(errno.ENOSPC, "disk is full", str(dest)) from None
                    raise StoreError(describe_error(self.path, exc)) from exc
            finally:
                target.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
        except BaseException:
            for leftover in (tmp, Path(f"{tmp}-journal")):
                leftover.unlink(missing_ok=True)
            raise


@dataclass(frozen=True)
class Retained:
    """What one retention step removed: whole sessions, messages (also of sessions not finished
    yet), and whether there is more to do (call again)."""

    sessions: int
    messages: int
    more: bool


def retain(target: "str | os.PathLike | sqlite3.Connection | Archive", older_than_seconds: float,
           budget_seconds: float = 0.2, *, now: float | None = None) -> Retained:
    """One bounded step of retention, for a server to call in the background every so often
    (`serve --retain 90d`): deletes the ended sessions that ended more than `older_than_seconds`
    ago, for about `budget_seconds`, in transactions that each hold the write lock a few
    milliseconds, so a live chat is never held up. `target`: the database's path (opened and
    closed here), an open sqlite3 connection to it (autocommit, as chatlog.db makes them), or
    an Archive. Returns what it removed; `more` says whether to call again."""
    if isinstance(target, Archive):
        return Upkeep(target).retain(older_than_seconds, budget_seconds, now=now)
    if isinstance(target, sqlite3.Connection):
        from chatlog.db import DB

        path = target.execute("PRAGMA database_list").fetchone()[2]
        return Upkeep(Archive(DB(target, Path(path)))).retain(older_than_seconds, budget_seconds, now=now)
    from chatlog.archive import open_archive

    archive = open_archive(target, read_only=False)
    try:
        return Upkeep(archive).retain(older_than_seconds, budget_seconds, now=now)
    finally:
        archive.close()
