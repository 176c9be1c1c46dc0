"""Opening the database: checks, pragmas, migrations, error translation, the checkpointer.

Every other module gets its connection from `connect()`, and every sqlite3 error leaves this
package as one `StoreError` worded for the person running the command.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import threading
import time
from pathlib import Path
from urllib.parse import quote_from_bytes

from chatlog import indexer, schema, txn

SQLITE_HEADER = b"SQLite format 3\x00"
# The WAL size at which the writer makes it start over (see DB.restart_wal): only a flood of
# messages with no pause for the background checkpointer reaches it.
# Binding None, a bool or bytes as a statement's parameter made Python's sqlite3 look for a way
# to adapt it (PEP 246) every time, and fail: an AttributeError made and dropped each, about a
# microsecond a value, ~5 us of a 1:1 turn's commit and half of a five-value INSERT's time.
# Registered adapters are looked up first, and each of these gives the value SQLite is given
# anyway (None as NULL, a bool as its integer, bytes as themselves: `bytes(b) is b`).
sqlite3.register_adapter(type(None), {}.get)
sqlite3.register_adapter(bool, int)
sqlite3.register_adapter(bytes, bytes)

WAL_RESTART_BYTES = 64 * 1024 * 1024
WAL_SIZE_LIMIT = 8 * 1024 * 1024  # and truncate the file back to this after a restart
INDEX_WHEN_IDLE = 0.05  # seconds without a commit before the search index is caught up in full


class StoreError(Exception):
    """A problem with the database file, worded for the person running the command."""


class StoreFailed(StoreError):
    """The database cannot be written, for good (disk full, read-only, I/O error)."""


class BadQuery(StoreError):
    """A search query that cannot be run, with what was wrong with it."""


_FILE_TROUBLE = ("database", "disk", "locked", "busy", "readonly", "malformed", "corrupt", "unable to open", "no such table")


# What a failed write means, by SQLite's primary result code, for the one line a person reads.
_FATAL = {
    3: "permission denied",  # SQLITE_PERM
    8: "the file is read-only",  # SQLITE_READONLY
    10: "I/O error",  # SQLITE_IOERR
    11: "the file is corrupt",  # SQLITE_CORRUPT
    13: "disk is full",  # SQLITE_FULL
    14: "cannot open the file",  # SQLITE_CANTOPEN
    26: "not an SQLite database",  # SQLITE_NOTADB
}
# A FIFO as the database hung every command (reading its header waits for a writer for ever);
# a device (/dev/null) failed deep inside SQLite.
NOT_A_FILE = "{path} is not a regular file (a pipe or a device?), not a database file"
SIDE_FILES = ("-wal", "-shm", "-journal", "-lock")


def failure_line(path: Path, exc: BaseException) -> str:
    """`cannot write the database X: disk is full`: one line for a write that failed for good."""
    code = getattr(exc, "sqlite_errorcode", None)
    why = _FATAL.get(code & 0xFF) if code is not None else None
    if why is None:
        text = str(exc)
        why = "disk is full" if "full" in text else text
    return f"cannot write the database {path}: {why}"


def _has_sqlite_header(path: Path) -> bool:
    """Only once SQLite has refused the file: then no connection of ours holds locks on it
    that closing this descriptor could drop (see connect)."""
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_HEADER
    except OSError:
        return True


# What SQLite says when there is no room on the disk: for a write, or for the -shm file that a
# WAL database is read through (even a read makes it, 32 KiB, if it is not there yet).
_NO_ROOM = frozenset(("SQLITE_FULL", "SQLITE_IOERR_SHMSIZE", "SQLITE_IOERR_SHMOPEN", "SQLITE_IOERR_SHMMAP",
                      "SQLITE_IOERR_WRITE", "SQLITE_READONLY"))
FULL_BELOW = 64 * 1024  # bytes free on a disk that is, for SQLite's side files, full


def no_room(path: Path, exc: BaseException | None) -> bool:
    """Whether `exc` failed for want of room on the disk `path` is on (that disk has less than
    FULL_BELOW bytes free)."""
    if getattr(exc, "sqlite_errorname", None) not in _NO_ROOM:
        return False
    try:
        st = os.statvfs(path.parent if str(path.parent) else ".")
    except OSError:
        return False
    return not st.f_flag & os.ST_RDONLY and st.f_bavail * st.f_frsize < FULL_BELOW  # (read-only media: none free)


def describe_error(path: Path, exc: BaseException) -> str:
    text = str(exc)
    if no_room(path, exc):
        return f"cannot write the database {path}: disk is full"
    if text == "file is not a database" and not _has_sqlite_header(path):
        return f"{path} is not a chatlog database (not an SQLite file)"
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


def is_database_file(candidate: str | os.PathLike, db_path: str | os.PathLike) -> bool:
    """Whether writing to `candidate` would write over the database at `db_path` or one of the
    files SQLite keeps beside it (-wal, -shm, -journal) or our -lock, however the path is spelt:
    relative, with `..`, through symbolic links, or as a hard link to the same file."""
    targets = []
    for db in {os.path.realpath(db_path), os.path.abspath(db_path)}:  # through a link, and not
        targets += [db] + [db + suffix for suffix in SIDE_FILES]
    if os.path.realpath(candidate) in targets or os.path.abspath(candidate) in targets:
        return True
    try:
        st = os.stat(candidate)
    except OSError:
        return False
    for target in targets:
        try:
            other = os.stat(target)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino):
            return True
    return False


class ServerLocks:
    """The liveness of servers, by a lock that dies with its process.

    A running server holds a write lock on byte `id` of the sidecar file DB-lock. The locks are
    open-file-description locks (Linux), so a check made from any process, the server's own
    included, never disturbs them; a kill -9 releases them at once. Elsewhere classic POSIX locks
    are used, which cannot see a lock held by the checking process itself.
    """

    _OFD = hasattr(fcntl, "F_OFD_SETLK")
    SETLK = getattr(fcntl, "F_OFD_SETLK", fcntl.F_SETLK)
    GETLK = getattr(fcntl, "F_OFD_GETLK", fcntl.F_GETLK)
    _FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid

    def __init__(self, db_path: Path, *, create: bool):
        self.path = f"{db_path}-lock"
        self.fd: int | None = None
        try:
            if create:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            else:
                self.fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            self.fd = None  # no lock file: no server ever ran here (or it cannot be read)

    def _flock(self, kind: int, server_id: int) -> bytes:
        return struct.pack(self._FLOCK, kind, os.SEEK_SET, server_id, 1, 0)

    def hold(self, server_id: int) -> None:
        if self.fd is None:
            raise OSError(f"cannot open {self.path}")
        fcntl.fcntl(self.fd, self.SETLK, self._flock(fcntl.F_WRLCK, server_id))

    def alive(self, server_id: int | None) -> bool:
        if self.fd is None or server_id is None:
            return False
        try:
            got = fcntl.fcntl(self.fd, self.GETLK, self._flock(fcntl.F_WRLCK, server_id))
        except OSError:
            return False
        return struct.unpack(self._FLOCK, got)[0] != fcntl.F_UNLCK

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def hostname() -> str:
    return os.uname().nodename  # what socket.gethostname() returns, without importing socket


def _uri_path(path: Path) -> str:
    """A file path as the path of an SQLite `file:` URI: its bytes percent-encoded, so any name
    works (one that is not UTF-8 too)."""
    return quote_from_bytes(os.fsencode(path.absolute()), safe="/")


def read_only_uri(path: Path, immutable: bool = False) -> str:
    """The URI that opens `path` without writing a byte: SQLite's `mode=ro`, plus `immutable=1`
    when the directory cannot be written and there is no WAL (no writer can be running then,
    and SQLite could not make the -shm it needs), or when asked (`immutable`)."""
    parent = path.parent if str(path.parent) else Path(".")
    immutable = immutable or (not os.access(parent, os.W_OK | os.X_OK) and not os.path.exists(f"{path}-wal"))
    return f"file:{_uri_path(path)}?mode=ro" + ("&immutable=1" if immutable else "")


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
        self.last_write = 0.0  # when the writer last committed (time.monotonic)

    def wrote(self) -> None:
        """The writer committed (the checkpointer indexes at full speed only when it pauses)."""
        self.last_write = time.monotonic()

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
        writer) twice a second. Before each checkpoint it adds the new messages to the search
        index (chatlog.indexer), in chunks of a few milliseconds each. When the chat has paused,
        it also begins the WAL again itself (`begin_wal_again`), so the next line does not.
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
                conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")  # (as the writer's: see begin_wal_again)
            except sqlite3.Error:
                return
            begun = 0.0  # when this thread last began the WAL again
            try:
                while True:
                    # While the chat is busy (a commit in the last INDEX_WHEN_IDLE seconds), one
                    # chunk a pass: the backlog moves, and the chat's commits almost never wait
                    # on it. When it pauses, as people do, the rest.
                    busy = time.monotonic() - self.last_write < INDEX_WHEN_IDLE
                    left = index_some(conn, 0.0 if busy else interval)
                    done = checkpoint(conn)
                    now = time.monotonic()
                    if done and self.last_write > begun and now - self.last_write >= INDEX_WHEN_IDLE:
                        begin_wal_again(conn)  # (the writer has committed since: not our own write again)
                        begun = now
                    self.checkpoints += 1
                    if stop.wait(interval if busy or not left else 0):
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


def index_some(conn: sqlite3.Connection, seconds: float) -> bool:
    """The background checkpointer's indexing: what is pending, for at most `seconds`, each chunk
    its own short transaction followed by a pause as long, so the server's commits go first.
    Returns whether messages are left to index (False too when it could not: the next pass tries)."""
    try:
        return indexer.catch_up(conn, seconds, pause=True)
    except sqlite3.Error:
        return False  # a store that cannot be written: the server's own writes report it


def checkpoint(conn: sqlite3.Connection) -> bool:
    """One pass of the background checkpointer, on its own connection: a passive checkpoint,
    which never blocks the writer. When the writer pauses (at chat pace, between any two
    messages) it completes, and SQLite starts the WAL over at the next commit. Returns whether
    it completed (every frame of a WAL that has some is in the database now)."""
    try:
        busy, log, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except sqlite3.Error:
        return False  # busy or locked this time: the next pass catches up
    return busy == 0 and 0 < log == done


def begin_wal_again(conn: sqlite3.Connection) -> None:
    """After a checkpoint that completed: the first commit after it begins the WAL again, writing
    its header anew and syncing it (fdatasync, whatever `synchronous`), and past
    journal_size_limit truncating the file. Left to the writer, that is the next line's
    commit: at chat pace nearly every line's (0.15 ms here, 10x the commit itself; milliseconds
    on a slow disk). Here a one-row write (its own table's, m019) takes it on, in the
    background, when the lock is free at once (never waiting: else the writer is busy, and pays
    it later)."""
    try:
        with txn.write_transaction(conn, lock_timeout_ms=0, should_stop=lambda: True):
            conn.execute("UPDATE wal_begun SET n = n + 1 WHERE rowid = (SELECT min(rowid) FROM wal_begun)")
    except (txn.Busy, sqlite3.Error):
        pass


def connect(
    path: str | os.PathLike,
    *,
    create: bool = True,
    read_only: bool = False,
    fsync: bool = False,
    immutable: bool = False,
) -> DB:
    """Open (creating if allowed) the database at `path`, upgrading its schema if needed.

    `read_only`: write nothing at all and never migrate (for archives on read-only media, read
    only files, backups). `fsync`: each commit is synced to disk (synchronous=FULL), so it
    survives a power loss too, not only a crash of the process (see docs/reliability.md)."""
    path = Path(path)
    if read_only:
        return _connect_read_only(path, immutable)
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
    elif not path.is_file():
        raise StoreError(NOT_A_FILE.format(path=path))
    elif not os.access(path, os.W_OK):
        raise StoreFailed(f"cannot write the database {path}: the file is read-only")
    elif not writable(path):
        raise StoreFailed(
            f"cannot write the database {path}: its directory is read-only (SQLite keeps its -wal and -shm files there)"
        )
    # Never open() the file to look at it: closing any descriptor of it drops every POSIX lock
    # this process holds on it, a live server's SQLite connections' too, and another process
    # may then checkpoint and reset the WAL under them (a corrupt database: `serve --retain`
    # opening the archive beside the server did that). SQLite itself says "not a database".
    if not os.access(path, os.R_OK):
        raise StoreError(f"cannot read the database {path}: Permission denied")
    header = os.path.getsize(path) > 0
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
        conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(describe_error(path, exc)) from exc
    except StoreError:
        conn.close()
        raise
    return DB(conn, path)


def writable(path: str | os.PathLike) -> bool:
    """Whether the file (and its directory, where SQLite keeps the -wal and -shm) can be written."""
    path = Path(path)
    return os.access(path, os.W_OK) and os.access(path.parent if str(path.parent) else ".", os.W_OK | os.X_OK)


def _connect_read_only(path: Path, immutable: bool = False) -> DB:
    """Open without writing a byte: SQLite's `mode=ro`, plus `immutable=1` when the directory
    cannot be written and there is no WAL (no writer can be running then, and SQLite could not
    make the -shm it needs). A pending migration is an error, never applied."""
    if not path.exists():
        raise StoreError(f"no chatlog database at {path} (nothing has been recorded yet)")
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a database file")
    if not path.is_file():
        raise StoreError(NOT_A_FILE.format(path=path))
    if not os.access(path, os.R_OK):  # (never open() it: see connect)
        raise StoreError(f"cannot read the database {path}: Permission denied")
    if os.path.getsize(path) == 0:
        raise StoreError(f"{path} is not a chatlog database (not an SQLite file)")
    try:
        conn = sqlite3.connect(read_only_uri(path, immutable), uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA query_only = 1")
        done = _check_schema(conn, path)
    except sqlite3.Error as exc:
        raise StoreError(describe_error(path, exc)) from exc
    if done is None or len(done) < len(schema.NAMES):
        conn.close()
        missing = [n for n in schema.NAMES if n not in (done or [])]
        raise StoreError(
            f"{path} needs a schema upgrade ({missing[0]}) and cannot be written here; "
            "open it once with write access (any chatlog command) or use a newer backup"
        )
    return DB(conn, path, read_only=True)


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
