"""Defects found by attacking the real programs: each test failed before its fix.

Real `chatlog serve` processes, real loopback sockets, real SQLite files.
"""

import os
import sqlite3
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, recv_until, run_chatlog, wait_until


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
    shown = run_chatlog(db_path, "show", "last", process=True).stdout
    for line in ("amy joined", "bob joined", "bob left", "amy left"):
        assert line in shown, shown
    for fmt in ("txt", "md", "html"):
        out = run_chatlog(db_path, "export", "last", "--format", fmt, process=True).stdout
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
    shown = run_chatlog(db_path, "show", "last", process=True).stdout
    assert "bytes of padding after the previous line" in shown, shown
    assert "\npadding\n" not in shown, shown


# -- the store locked by another process -------------------------------------------------------


def test_a_server_started_on_a_locked_database_says_it_is_waiting(start_server, tmp_path):
    """Starting records the server in the store. With another process holding the write lock
    the server printed its banner ("Connect with ...") and then nothing, accepting nobody, for as
    long as the lock was held: the operator could not tell it was waiting."""
    db = tmp_path / "chat.db"
    from chatlog.recorder import open_recorder

    open_recorder(db).close()  # the file exists, migrated
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        server = start_server(db=db, ready=False)  # not up until the lock is free
        server.wait_for("locked by another process")
        assert server.count("Awaiting client connections") == 0
        holder.execute("ROLLBACK")
        server.wait_for("Awaiting client connections")
    finally:
        holder.close()


# -- options that are numbers but not usable ones ----------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("--idle-timeout", "inf"), ("--idle-timeout", "nan"), ("--idle-timeout", "1e308"),
    ("--first-timeout", "inf"), ("--first-timeout", "nan"), ("--rate", "nan"),
])
def test_serve_refuses_a_timeout_or_rate_that_is_not_a_usable_number(db_path, option, value):
    """`--idle-timeout inf` (or 1e308) passed the range check, and the loop's select() died
    with an OverflowError traceback the moment a client connected; `nan` passed it too and
    silently meant "never"."""
    r = run_chatlog(db_path, "serve", "0", "--bind", "127.0.0.1", option, value, input="", process=True)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith(f"chatlog: Invalid value for '{option}'") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


# -- started with a standard stream closed --------------------------------------------------------


def _run_closed(db, args, close):
    """chatlog ARGS with file descriptor `close` (0 or 1) closed, as `<&-` or `>&-` leave it
    (stdin otherwise an empty pipe: input that has ended)."""
    return subprocess.run(
        [sys.executable, "-m", "chatlog", *args, "--db", str(db)],
        input=b"" if close != 0 else None, stdout=None if close == 1 else subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=ROOT, timeout=30, preexec_fn=lambda: os.close(close),
        env=dict(os.environ, NO_COLOR="1"),
    )


@pytest.fixture
def one_chat(db_path):
    from chatlog.recorder import open_recorder

    r = open_recorder(db_path)
    r.start("h", 1, 1.7e9)
    sid = r.begin_session("10.0.0.1", 5000, "h", 1, 1.7e9, served=True)
    r.add_message(sid, "client", "amy", "hello", None, None, 1.7e9)
    r.end_session(sid, "client-quit", 1.7e9 + 1)
    r.close()
    return db_path


@pytest.mark.parametrize("args", [["sessions"], ["show", "1"], ["export"], ["stats"], ["search", "hello"]])
def test_a_reader_with_stdout_closed_says_so_in_one_line(one_chat, args):
    """With stdout closed Python has sys.stdout = None: every reader died with an
    AttributeError traceback."""
    r = _run_closed(one_chat, args, 1)
    assert r.returncode == 1
    assert r.stderr.decode() == "chatlog: cannot write the output: standard output is closed\n"


def test_export_to_a_file_and_rm_work_with_stdout_closed(one_chat, tmp_path):
    out = tmp_path / "out.txt"
    r = _run_closed(one_chat, ["export", "-o", str(out)], 1)
    assert r.returncode == 0, r.stderr
    assert "amy>hello" in out.read_text()
    r = _run_closed(one_chat, ["rm", "-y", "1"], 1)
    assert r.returncode == 0 and r.stderr.decode() == "deleted 1 session\n"


@pytest.mark.parametrize("room", [False, True])
def test_serve_with_stdin_closed_is_a_server_whose_input_has_ended(db_path, room):
    """`chatlog serve 9999 <&-` died with an AttributeError traceback; a closed stdin is input
    that has ended, as /dev/null is."""
    args = ["serve", "0", "--bind", "127.0.0.1"] + (["--room"] if room else [])
    r = _run_closed(db_path, args, 0)
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr
    assert b"Operator input ended" in r.stdout


def test_serve_with_stdout_closed_runs_without_a_console(db_path):
    """The console thread died with a traceback on stderr at its first line."""
    r = _run_closed(db_path, ["serve", "0", "--bind", "127.0.0.1"], 1)
    assert r.returncode == 0
    assert r.stderr == b""


# -- a database path that is not a regular file ---------------------------------------------------


@pytest.mark.parametrize("args", [
    ["sessions"], ["show", "last"], ["tail"], ["rm", "-y", "1"], ["backup", "copy.db"],
    ["serve", "0", "--bind", "127.0.0.1"],
])
def test_a_fifo_as_the_database_is_refused_not_waited_on(tmp_path, args):
    """Every command hung for ever on `--db` naming a FIFO: reading its header waits for a
    writer that never comes."""
    fifo = tmp_path / "chat.db"
    os.mkfifo(fifo)
    r = subprocess.run(
        [sys.executable, "-m", "chatlog", *args, "--db", str(fifo)],
        capture_output=True, text=True, cwd=tmp_path, timeout=20, stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 1
    assert r.stderr == f"chatlog: {fifo} is not a regular file (a pipe or a device?), not a database file\n"


def test_a_device_as_the_database_is_refused_clearly():
    r = subprocess.run(
        [sys.executable, "-m", "chatlog", "sessions", "--db", os.devnull],
        capture_output=True, text=True, cwd=ROOT, timeout=20,
    )
    assert r.returncode == 1
    assert "is not a regular file" in r.stderr and "I/O error" not in r.stderr


# -- what the server sends stays within the protocol ----------------------------------------------


def test_an_operator_line_with_a_nul_reaches_the_client_whole(server):
    """A piped answer with a NUL in it was sent raw, though the protocol's text has none: every
    tolerant receiver (chatclient included) ends the line at the NUL and drops the rest as
    padding, so the client saw `SERVER>a` of `a<NUL>b and more`."""
    c = server.connect()
    c.sendall(b"amy>hi\n\0")
    server.wait_for("amy>hi")
    server.proc.stdin.write(b"a\0b and more\n")
    server.proc.stdin.flush()
    got = recv_until(c, b"\n")
    assert got == b"SERVER>a\\x00b and more\n"
    texts = [t for (t,) in sqlite3.connect(server.db).execute("SELECT text FROM messages WHERE sender = 'server'")]
    assert texts == ["a\\x00b and more"]


@pytest.mark.parametrize("handle", [b"\xffS", b"S\x1b[2J", b"SERVER\xe2\x80\xae"])
def test_serve_refuses_an_operator_handle_that_is_not_clean_text(db_path, handle):
    """`--handle $'\\xff'` started, then died with a UnicodeEncodeError traceback at the first
    answer, with a client connected; a control character went to old clients raw."""
    r = subprocess.run(
        [sys.executable.encode(), b"-m", b"chatlog", b"serve", b"0", b"--bind", b"127.0.0.1",
         b"--db", bytes(db_path), b"--handle", handle],
        capture_output=True, cwd=ROOT, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2
    assert r.stderr.startswith(b"chatlog: Invalid value for '--handle'") and r.stderr.count(b"\n") == 1


@pytest.mark.parametrize("args, where", [
    ([b"search", b"hel\xfflo"], b"'QUERY...'"),
    ([b"sessions", b"--handle", b"\xff"], b"'--handle'"),
    ([b"export", b"--host", b"\xff"], b"'--host'"),
    ([b"serve", b"0", b"--bind", b"\xff"], b"'--bind'"),
])
def test_an_argument_that_is_not_utf8_is_one_clear_line(one_chat, args, where):
    """Bytes that are not UTF-8 reach Python as lone surrogates: these died with a
    UnicodeEncodeError (or idna UnicodeError) traceback."""
    r = subprocess.run(
        [sys.executable.encode(), b"-m", b"chatlog", *args, b"--db", bytes(one_chat)],
        capture_output=True, cwd=ROOT, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr == b"chatlog: Invalid value for " + where + b": not valid UTF-8\n"


def test_a_file_name_that_is_not_utf8_still_works(one_chat, tmp_path):
    out = bytes(tmp_path) + b"/out\xff.txt"
    r = subprocess.run(
        [sys.executable.encode(), b"-m", b"chatlog", b"export", b"-o", out, b"--db", bytes(one_chat)],
        capture_output=True, cwd=ROOT, timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert b"amy>hello" in open(out, "rb").read()


def test_a_relative_xdg_data_home_is_ignored(tmp_path):
    """The XDG spec says a relative XDG_DATA_HOME is invalid and must be ignored; it was used,
    so the database moved with the directory the command was run from."""
    env = dict(os.environ, XDG_DATA_HOME="relative", HOME=str(tmp_path))
    env.pop("CHATLOG_DB", None)
    r = subprocess.run([sys.executable, "-m", "chatlog", "path"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.stdout == f"{tmp_path}/.local/share/chatlog/chatlog.db\n"


# -- the client started with a standard descriptor closed -----------------------------------------


@pytest.mark.parametrize("closed", [0, 1])
def test_the_client_never_writes_its_screen_into_the_socket(chatclient, closed, fake_server):
    """Started with stdout closed (`>&-`), the socket took descriptor 1 and the client's own
    lines ("Connecting to ...", the handle prompt) were sent to the server as chat; with stdin
    closed it read its keyboard from the socket."""

    def script(peer):
        if closed == 1:
            peer.expect(b"amy>hi\n\0")
            peer.send(b"SERVER>ok\n")
        peer.wait_close()

    fake = fake_server(script)
    r = subprocess.run(
        [str(chatclient), "127.0.0.1", str(fake.port)], input=None if closed == 0 else b"amy\nhi\n",
        stdout=None if closed == 1 else subprocess.PIPE, stderr=subprocess.PIPE, timeout=20,
        preexec_fn=lambda: os.close(closed),
    )
    fake.join()
    assert r.returncode == 0, r.stderr
    assert not fake.received.startswith(b"Connecting"), fake.received
    assert b"What would you like" not in fake.received
    if closed == 1:
        assert fake.received.startswith(b"amy>hi\n\0")
    else:
        assert r.stdout.endswith(b"You left the chat.\n")  # a closed stdin is the end of input


# -- an export written over the files beside the database -----------------------------------------


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-lock"])
def test_an_export_never_replaces_a_file_beside_the_database(server, suffix):
    """`export -f txt -o chat.db-wal` replaced a running server's WAL with a text file: every
    other connection then read pages through the wrong file (the commits not yet checkpointed
    were gone for them, and a writer among them would write into the text). `backup` refused
    such paths already; `export` only refused the database itself."""
    c = server.connect()
    c.sendall(b"amy>remember me\n\0")
    server.wait_for("amy>remember me")
    side = f"{server.db}{suffix}"
    before = os.stat(side).st_ino
    r = run_chatlog(server.db, "export", "-f", "txt", "-o", side, process=True)
    assert r.exit_code == 1
    assert r.stderr == f"chatlog: the export must not overwrite the database or its files ({side})\n"
    assert os.stat(side).st_ino == before  # the very same file, not a new one put in its place
    assert "remember me" in run_chatlog(server.db, "show", "last", process=True).stdout


# -- a room's memory with many clients that never read --------------------------------------------


def test_clients_that_never_read_do_not_multiply_the_rooms_memory(start_server):
    room = start_server("--room", "--per-address", "0", "--rate", "0")

    def rss():
        with open(f"/proc/{room.proc.pid}/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))

    base = rss()
    silent = []
    for _ in range(300):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((room.host, room.port))
        silent.append(s)
    room.wait_for(r"\(300 here\)")
    talker = room.connect()
    recv_until(talker, b"\n")
    line = "talker>" + "\u0001" * 500  # relayed as 2,000 bytes (each \x01 made visible)
    import threading

    peaks = [0]
    done = threading.Event()

    def sample():  # the peak: a client dropped as slow gives its memory back at once
        while not done.is_set():
            peaks.append(rss())
            done.wait(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    talker.sendall("".join(f"{line}{i}\n" for i in range(600)).encode())
    room.wait_for(r"stopped reading", timeout=30)
    done.set()
    sampler.join()
    peak = max(peaks) - base
    for s in silent:
        s.close()
    assert peak < 100e6, f"{peak / 1e6:.0f} MB for 300 clients that never read"


# -- an archive from elsewhere ------------------------------------------------------------------


@pytest.mark.parametrize("args", [["sessions"], ["show", "last"], ["export", "-f", "txt"], ["export", "-f", "md"]])
def test_a_crafted_archive_cannot_drive_the_terminal_through_its_hosts_or_end_reasons(db_path, args):
    """Handles and texts were made visible, but a session's client host and end reason went to
    the screen raw: a database file handed over by someone else could clear the screen or set
    the clipboard through `sessions` or `show`."""
    from chatlog.recorder import open_recorder

    r = open_recorder(db_path)
    r.start("h", 1, 1.7e9)
    for _ in range(2):  # two: an export of several gives each its header
        sid = r.begin_session("10.0.0.1\x1b[2J", 5000, "h", 1, 1.7e9, served=True)
        r.add_message(sid, "client", "amy", "hi", None, None, 1.7e9)
        r.end_session(sid, "client-quit\x1b]52;c;AAAA\x07", 1.7e9 + 1)
    r.close()
    out = run_chatlog(db_path, *args, process=True).stdout
    assert "10.0.0.1\\x1b[2J" in out
    assert "\x1b" not in out and "\x07" not in out


def test_a_crafted_rooms_port_is_made_visible_in_sessions(db_path):
    from chatlog.recorder import open_recorder

    r = open_recorder(db_path)
    r.start("h", 1, 1.7e9)
    sid = r.begin_session(None, None, "h", 1, 1.7e9, served=True, kind="room")
    r.end_session(sid, "server-quit", 1.7e9 + 1)
    r.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE sessions SET server_port = '7\x1b[2J'")  # SQLite keeps text anywhere
    out = run_chatlog(db_path, "sessions", process=True).stdout
    assert "room :7\\x1b[2J" in out and "\x1b" not in out
