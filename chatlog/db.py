"""Opening the database: checks, pragmas, migrations, error translation, the checkpointer.

Every other module gets its connection from `connect()`, and every sqlite3 error leaves this
package as one `StoreError` worded for the person running the command.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from chatlog import schema

SQLITE_HEADER = b"SQLite format 3\x00"
# The WAL size at which the writer makes it start over (see DB.restart_wal): only a flood of
# messages with no pause for the background checkpointer reaches it.
WAL_RESTART_BYTES = 64 * 1024 * 1024
WAL_SIZE_LIMIT = 8 * 1024 * 1024  # and truncate the file back to this after a restart


class StoreError(Exception):
    """A problem with the database file, worded for the person running the command."""


class StoreFailed(StoreError):
    """The database cannot be written, for good (disk full, read-only, I/O error)."""


class StoreBusy(StoreError):
    """Another process holds the write lock (kept inside the recorder, which waits)."""


class BadQuery(StoreError):
    """A search query that cannot be run, with what was wrong with it."""


_FILE_TROUBLE = ("database", "disk", "locked", "busy", "readonly", "malformed", "corrupt", "unable to open", "no such table")


def describe_error(path: Path, exc: BaseException) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return f"{path} is not a usable chatlog database ({text})"
    if "readonly" in text or "unable to open" in text:
        return f"cannot write the database {path} ({text})"
    return f"database error in {path}: {text}"


class Guard:
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


class DB:
    """One open connection (autocommit: every transaction is explicit) and its file's path."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, read_only: bool = False):
        self.conn = conn
        self.path = path
        self.read_only = read_only
        self.guard = Guard(path)  # stateless: one serves every call
        self.checkpoints = 0  # passes the background checkpointer has made
        self.restart_bytes = WAL_RESTART_BYTES
        self._checkpointer: threading.Event | None = None

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
        self.restart_bytes = restart_bytes
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

    @property
    def checkpointing(self) -> bool:
        return self._checkpointer is not None

    def restart_wal(self) -> None:
        """Under a flood of messages a passive checkpoint never catches the writer, and the WAL
        would grow without bound. So when it has passed the limit, the writer itself (holding no
        transaction, so nothing can starve it) runs a RESTART checkpoint: it catches up and makes
        the next commit begin the WAL again. It costs milliseconds, once per tens of MB."""
        try:
            if os.path.getsize(f"{self.path}-wal") > self.restart_bytes:
                self.conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        except (OSError, sqlite3.Error):
            pass


def checkpoint(conn: sqlite3.Connection) -> None:
    """One pass of the background checkpointer, on its own connection: a passive checkpoint,
    which never blocks the writer. When the writer pauses (at chat pace, between any two
    messages) it completes, and SQLite starts the WAL over at the next commit."""
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except sqlite3.Error:
        pass  # busy or locked this time: the next pass catches up


def connect(path: str | os.PathLike, *, create: bool = True) -> DB:
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
    return DB(conn, path)


def _check_schema(conn: sqlite3.Connection, path: Path) -> list[str] | None:
    """The migrations this file has, after checking it is a chatlog database this version reads."""
    done = schema.applied(conn)
    unknown = [name for name in done or [] if name not in schema.NAMES]
    if unknown:
        raise StoreError(
            f"{path} was written by a newer version of chatlog (schema step {unknown[-1]}); "
            "upgrade chatlog to read it"
        )
    if done is None and conn.execute(
        "SELECT 1 FROM sqlite_master WHERE name IN ('sessions', 'messages')"
    ).fetchone():
        raise StoreError(f"{path} is an SQLite file but not a chatlog database")
    return done


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    done = _check_schema(conn, path)
    if done is not None and len(done) == len(schema.NAMES):
        return
    schema.apply(conn)
