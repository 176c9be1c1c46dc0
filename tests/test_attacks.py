"""Defects found by attacking the real programs: each test failed before its fix.

Real `chatlog serve` processes, real loopback sockets, real SQLite files.
"""

import os
import sqlite3
import subprocess
import sys

import pytest
from conftest import ROOT, recv_until, wait_until


def chatlog(db, *args, timeout=30):
    return subprocess.run(
        [sys.executable, "-m", "chatlog", *args, "--db", str(db)],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
        env=dict(os.environ, NO_COLOR="1"),
    )


def join_room(server, handle):
    s = server.connect()
    assert recv_until(s, b"\n").startswith(b"SERVER>*** Welcome to the room")
    s.sendall(f"{handle}>hi\n".encode())
    return s


# -- a room read back: who joined and who left --------------------------------------------------


def test_a_real_room_read_back_says_who_joined_and_who_left(start_server, db_path):
    """The room server records a join as the event text `joined` with the handle beside it; the
    readers showed a bare `joined` / `left`, so nobody could tell who came and went."""
    room = start_server("--room")
    amy = join_room(room, "amy")
    bob = join_room(room, "bob")
    recv_until(amy, b"bob>hi\n")
    bob.sendall(b"\\quit\n")
    room.wait_for(r"bob \(.*\) left")
    amy.close()
    room.wait_for(r"amy \(.*\) left")
    room.say("\\quit")
    room.wait()
    shown = chatlog(db_path, "show", "last").stdout
    for line in ("amy joined", "bob joined", "bob left", "amy left"):
        assert line in shown, shown
    for fmt in ("txt", "md", "html"):
        out = chatlog(db_path, "export", "last", "--format", fmt).stdout
        assert "bob joined" in out and "bob left" in out, (fmt, out)


def test_late_padding_in_a_room_reads_as_a_note_not_as_a_join(start_server, db_path):
    """Padding that trails a line in a later burst is recorded as an `event` named `padding`;
    the readers took every event that was not a leave for a join and dropped its note."""
    room = start_server("--room")
    amy = join_room(room, "amy")
    room.wait_for("amy>hi")
    amy.sendall(b"amy>x\n\0\0")  # a NUL that is not the terminator's: padding starts
    room.wait_for("amy>x")
    amy.sendall(b"junkjunk")  # a later burst of the same padding
    wait_until(lambda: sqlite3.connect(db_path).execute(
        "SELECT count(*) FROM messages WHERE text = 'padding'").fetchone()[0])
    amy.close()
    room.wait_for(r"amy \(.*\) left")
    room.say("\\quit")
    room.wait()
    shown = chatlog(db_path, "show", "last").stdout
    assert "bytes of padding after the previous line" in shown, shown
    assert "\npadding\n" not in shown, shown


# -- the store locked by another process -------------------------------------------------------


class Console:
    """A server's console lines as they come (for a server that is not up yet)."""

    def __init__(self, proc):
        import threading

        self.lines: list[str] = []
        self.proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace"))

    def has(self, needle):
        return any(needle in line for line in self.lines)


def test_a_server_started_on_a_locked_database_says_it_is_waiting(tmp_path):
    """Starting records the server in the store. With another process holding the write lock
    the server printed its banner ("Connect with ...") and then nothing, accepting nobody, for as
    long as the lock was held: the operator could not tell it was waiting."""
    db = tmp_path / "chat.db"
    from chatlog.recorder import open_recorder

    open_recorder(db).close()  # the file exists, migrated
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatlog", "serve", "0", "--db", str(db), "--bind", "127.0.0.1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env=dict(os.environ, NO_COLOR="1", PYTHONUNBUFFERED="1"),
    )
    try:
        console = Console(proc)
        wait_until(lambda: console.has("locked by another process"))
        assert not console.has("Awaiting client connections")
        holder.execute("ROLLBACK")
        wait_until(lambda: console.has("Awaiting client connections"))
    finally:
        holder.close()
        proc.terminate()
        proc.wait(10)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()


# -- options that are numbers but not usable ones ----------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("--idle-timeout", "inf"), ("--idle-timeout", "nan"), ("--idle-timeout", "1e308"),
    ("--first-timeout", "inf"), ("--first-timeout", "nan"), ("--rate", "nan"),
])
def test_serve_refuses_a_timeout_or_rate_that_is_not_a_usable_number(db_path, option, value):
    """`--idle-timeout inf` (or 1e308) passed the range check, and the loop's select() died
    with an OverflowError traceback the moment a client connected; `nan` passed it too and
    silently meant "never"."""
    r = subprocess.run(
        [sys.executable, "-m", "chatlog", "serve", "0", "--bind", "127.0.0.1", "--db", str(db_path), option, value],
        capture_output=True, text=True, cwd=ROOT, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2, r
    assert r.stderr.startswith(f"chatlog: Invalid value for '{option}'") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
