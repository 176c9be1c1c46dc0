"""`chatlog serve` end to end: real process, real loopback sockets, real SQLite file."""

import re
import signal
import socket
import struct
import time

import pytest
from conftest import db_dicts, db_rows, ending, recv_until, run_chatlog, wait_until


def messages(db, session=None):
    """The stored messages as dicts (session_id, seq, sender, handle, text, raw, note)."""
    sql = "SELECT session_id, seq, sender, handle, text, raw, note FROM messages"
    if session is not None:
        return db_dicts(db, sql + " WHERE session_id = ? ORDER BY seq", (session,))
    return db_dicts(db, sql + " ORDER BY id")


def session(db, sid):
    (row,) = db_dicts(db, "SELECT * FROM sessions WHERE id = ?", (sid,))
    return row


def test_full_chat_raw_socket(server):
    c = server.connect()
    c.sendall(b"brandon>hello server\n\0")
    server.wait_for(r"^brandon>hello server$")
    server.say("why hello client")
    assert recv_until(c, b"\n") == b"SERVER>why hello client\n"
    c.sendall(b"brandon>how are you\n\0")
    server.wait_for("^brandon>how are you$")
    server.say("good")
    assert recv_until(c, b"\n") == b"SERVER>good\n"
    c.sendall(b"brandon>\\quit\n\0")
    server.wait_for(r"client has quit \(session 1, 2 messages each way\)")
    assert c.recv(100) == b""
    assert [(m["sender"], m["handle"], m["text"]) for m in messages(server.db)] == [
        ("client", "brandon", "hello server"),
        ("server", "SERVER", "why hello client"),
        ("client", "brandon", "how are you"),
        ("server", "SERVER", "good"),
    ]
    s = session(server.db, 1)
    assert (s["handle"], s["end_reason"], s["client_messages"], s["server_messages"]) == ("brandon", "client-quit", 2, 2)
    assert (s["client_host"], s["client_port"], s["server_port"]) == ("127.0.0.1", c.getsockname()[1], server.port)
    assert s["ended_at"]
    assert server.output.index("connected to: 127.0.0.1 port") < server.output.index("brandon>hello")


def test_every_message_is_committed_before_it_is_shown(server):
    c = server.connect()
    c.sendall(b"bob>first\n\0")
    server.wait_for("^bob>first$")
    # the console line is printed after the commit: it must be in the file already
    assert messages(server.db)[0]["text"] == "first"
    server.say("reply")
    recv_until(c, b"\n")
    assert messages(server.db)[1]["text"] == "reply"


def test_server_quit(server):
    c = server.connect()
    c.sendall(b"bob>hi\n\0")
    server.wait_for("^bob>hi$")
    server.say("\\quit")
    assert recv_until(c, b"\\quit\n") == ending("The server closed the chat.")
    assert c.recv(10) == b""
    server.wait_for(r"chat ended by the server \(session 1")
    assert session(server.db, 1)["end_reason"] == "server-quit"
    server.wait_for("Awaiting client connections", start=5)


def test_disconnect_while_operator_types_is_noticed_at_once(server):
    c = server.connect()
    c.sendall(b"bob>hi\n\0")
    server.wait_for("^bob>hi$")
    t0 = time.time()
    c.close()  # the operator has not answered
    server.wait_for(r"client has disconnected \(session 1, 1 from the client, 0 from the server\)")
    s = session(server.db, 1)
    reason, ended = s["end_reason"], s["ended_at"]
    assert reason == "disconnect"
    from datetime import datetime

    assert abs(datetime.fromisoformat(ended).timestamp() - t0) < 2


def test_reset_mid_turn(server):
    c = server.connect()
    c.sendall(b"bob>hi\n\0")
    server.wait_for("^bob>hi$")
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # RST
    server.wait_for("client has disconnected")
    server.say("too late")  # the answer finds nobody; the server carries on
    c2 = server.connect()
    c2.sendall(b"amy>next\n\0")
    server.wait_for("^amy>next$")


def test_second_client_waits_and_is_served_with_nothing_lost(server):
    a = server.connect()
    a.sendall(b"alice>first\n\0")
    server.wait_for("^alice>first$")
    b = server.connect()
    server.wait_for(r"127.0.0.1 port \d+ is waiting \(1 in the queue\)")
    b.sendall(b"bob>i was waiting\n\0")  # said while waiting: committed, shown when served
    # its answer, for now, is its place in the queue (a turn-based client reads once per line)
    assert recv_until(b, b"\n") == b"SERVER>*** Waiting: 1 ahead of you. Your chat begins when they are done.\n"
    wait_until(lambda: len(messages(server.db)) == 2)
    server.say("hi alice")
    assert recv_until(a, b"\n") == b"SERVER>hi alice\n"
    a.sendall(b"alice>\\quit\n\0")
    server.wait_for(r"client has quit \(session 1")
    server.wait_for(r"connected to: 127.0.0.1 port %d" % b.getsockname()[1])
    server.wait_for("^bob>i was waiting$")
    b.sendall(b"bob>still there?\n\0")
    server.wait_for("^bob>still there\\?$")
    server.say("hi bob")
    # "your chat has begun" rides in the same write as the first answer
    assert recv_until(b, b"hi bob\n") == b"SERVER>*** Your chat has begun.\nSERVER>hi bob\n"
    assert [(m["seq"], m["sender"], m["handle"], m["text"]) for m in messages(server.db, 2)] == [
        (1, "client", "bob", "i was waiting"),
        (2, "client", "bob", "still there?"),
        (3, "server", "SERVER", "hi bob"),
    ]
    queued = session(server.db, 2)
    assert queued["served_at"] > queued["started_at"]


def test_queue_full_is_told_busy_and_recorded(start_server):
    server = start_server("--max-waiting", "1")
    a = server.connect()
    a.sendall(b"a>hi\n\0")
    server.wait_for("^a>hi$")
    b = server.connect()
    server.wait_for("is waiting")
    c = server.connect()
    data = recv_until(c, b"\\quit\n")
    assert data == ending("The server is busy; try again later.")
    assert c.recv(10) == b""
    server.wait_for(r"refused 127.0.0.1 port \d+: the queue is full \(1 may wait\)")
    # a refusal is counted per address and minute, not a session of its own
    assert db_rows(server.db, "SELECT count(*) FROM sessions") == [(2,)]
    b.close()
    a.close()


def test_idle_client_is_dropped_and_next_served(start_server):
    server = start_server("--idle-timeout", "0.5")
    idle = server.connect()
    nxt = server.connect()
    server.wait_for("is waiting")
    assert recv_until(idle, b"\\quit\n", timeout=5) == ending("No message for 0.5 s: timed out.")
    server.wait_for(r"client timed out after 0.5s on its turn \(session 1")
    assert session(server.db, 1)["end_reason"] == "timeout"
    nxt.sendall(b"n>hello\n\0")
    server.wait_for("^n>hello$")


def test_trickling_client_is_dropped_after_the_idle_timeout(start_server):
    server = start_server("--idle-timeout", "0.6")
    c = server.connect()
    c.sendall(b"t>hi\n\0")
    server.wait_for("^t>hi$")
    server.say("go on")
    recv_until(c, b"\n")
    start = time.monotonic()
    c.settimeout(0.05)
    got = b""
    for ch in b"slowly typed forever":  # one byte every 50 ms, never a newline... but quiet < 150ms
        try:
            c.sendall(bytes([ch]))
            got += c.recv(100)
        except TimeoutError:
            pass
        except OSError:
            break
        if b"\\quit" in got:
            break
    server.wait_for("client timed out", timeout=5)
    assert time.monotonic() - start < 3
    assert session(server.db, 1)["end_reason"] == "timeout"


@pytest.mark.parametrize(
    "sent,expected",
    [
        (b"bob> no newline at all", [("bob", "no newline at all")]),
        (b"bob>crlf\r\n", [("bob", "crlf")]),
        (b"bob> padded\0" + b"\xde\xad\xbe\xef" * 120, [("bob", "padded")]),
        (b"bob> zeros\n".ljust(550, b"\0"), [("bob", "zeros")]),
        (b"just nc text\n", [(None, "just nc text")]),
        (b"bob>one\nbob>two\n", [("bob", "one"), ("bob", "two")]),
        ("bob>caf\u00e9 \U0001f600\n".encode(), [("bob", "caf\u00e9 \U0001f600")]),
        (b"bob>\xff\xfe bad\n\0", [("bob", "\ufffd\ufffd bad")]),
        (b"bob>\n\0", [("bob", "")]),
    ],
)
def test_tolerant_framing(server, sent, expected):
    c = server.connect()
    c.sendall(sent)
    wait_until(lambda: len(messages(server.db)) >= len(expected))
    got = messages(server.db)
    assert [(m["handle"], m["text"]) for m in got] == expected
    canonical = [f"{h}>{t}\n\0".encode() for h, t in expected]
    for m, canon in zip(got, canonical, strict=True):
        # raw is stored exactly when the bytes differ from the canonical form
        if m["raw"] is not None:
            assert m["raw"] != canon


def test_raw_bytes_keep_everything(server):
    sent = b"bob> padded\0" + b"\xde\xad" * 100
    c = server.connect()
    c.sendall(sent)
    wait_until(lambda: messages(server.db))
    assert messages(server.db)[0]["raw"] == sent


def test_byte_at_a_time_and_split_multibyte(server):
    c = server.connect()
    data = "bob>h\u00e9llo\n\0".encode()
    for i in range(len(data)):
        c.send(data[i : i + 1])
        time.sleep(0.002)
    server.wait_for("^bob>h\u00e9llo$")


def test_nc_user_attributed_to_last_handle(server):
    c = server.connect()
    c.sendall(b"bob>hi\n")
    server.wait_for("^bob>hi$")
    server.say("yes?")
    recv_until(c, b"\n")
    c.sendall(b"no prefix now\n")
    server.wait_for("^bob>no prefix now$")
    assert messages(server.db)[-1]["handle"] == "bob"


def test_hostile_text_is_inert_on_the_console(server):
    c = server.connect()
    c.sendall("bob>\x1b[2J\x1b]0;pwn\x07[bold]x[/] \u202e\n\0".encode())
    line = server.wait_for("^bob>")
    assert "\x1b" not in server.output and "\x07" not in server.output
    assert line == "bob>\\x1b[2J\\x1b]0;pwn\\x07[bold]x[/] \\u202e"
    assert messages(server.db)[0]["text"] == "\x1b[2J\x1b]0;pwn\x07[bold]x[/] \u202e"


def test_overlong_line_ends_the_session_and_memory_stays_bounded(server):
    c = server.connect()
    chunk = b"x" * 65536
    try:
        for _ in range(160):  # 10 MiB, no newline
            c.sendall(chunk)
    except OSError:
        pass
    server.wait_for(r"client dropped for a line that is too long \(session 1")
    (text, note), = db_rows(server.db, "SELECT text, note FROM messages")
    assert len(text) == 8192 and note.startswith("line cut at 8192 bytes")
    assert session(server.db, 1)["end_reason"] == "overlong"
    status = open(f"/proc/{server.proc.pid}/status").read()
    rss_kb = int(status.split("VmRSS:")[1].split()[0])
    assert rss_kb < 200_000


def test_operator_line_over_500_characters_is_refused(server):
    c = server.connect()
    c.sendall(b"bob>hi\n\0")
    server.wait_for("^bob>hi$")
    server.say("x" * 501)
    server.wait_for(r"message too long \(501 characters, at most 500\); not sent")
    server.say("short")
    assert recv_until(c, b"\n") == b"SERVER>short\n"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_closes_the_session_cleanly(server, sig):
    c = server.connect()
    c.sendall(b"bob>hi\n\0")
    server.wait_for("^bob>hi$")
    server.signal(sig)
    assert server.wait() == 0
    assert recv_until(c, b"\\quit\n") == ending("The server shut down.")
    assert session(server.db, 1)["end_reason"] == "shutdown"
    assert f"Server stopped ({sig.name})" in server.output
    assert "Traceback" not in server.stderr_text()


def test_sigint_while_idle(server):
    server.signal(signal.SIGINT)
    assert server.wait() == 0


def test_end_of_operator_input_quits_and_stops(server):
    c = server.connect()
    c.sendall(b"bob>hi\n\0")
    server.wait_for("^bob>hi$")
    server.end_input()
    assert recv_until(c, b"\\quit\n") == ending("The server closed the chat.")
    assert server.wait() == 0
    assert session(server.db, 1)["end_reason"] == "server-quit"


def test_piped_script_of_answers(start_server):
    """printf 'hi\\nbye\\n' | chatlog serve PORT: one answer per turn, in order."""
    server = start_server()
    server.say("hi")
    server.say("bye")
    server.end_input()
    c = server.connect()
    replies = []
    for text in (b"one", b"two", b"three"):
        c.sendall(b"bob>" + text + b"\n\0")
        replies.append(recv_until(c, b"\n" if text != b"three" else b"\\quit\n"))
    assert replies == [b"SERVER>hi\n", b"SERVER>bye\n", ending("The server closed the chat.")]
    assert server.wait() == 0
    assert "SERVER>hi" in server.lines and "SERVER>bye" in server.lines


def test_restart_closes_orphans_as_interrupted(start_server, tmp_path):
    db = tmp_path / "k.db"
    first = start_server(db=db)
    c = first.connect()
    c.sendall(b"bob>hi\n\0")
    first.wait_for("^bob>hi$")
    first.proc.kill()
    first.proc.wait()
    second = start_server(db=db)
    second.wait_for(r"closed 1 session left open by a server that stopped unexpectedly, as interrupted", start=0)
    assert session(db, 1)["end_reason"] == "interrupted"


def test_restart_on_the_same_port_at_once(start_server, tmp_path):
    first = start_server()
    c = first.connect()
    c.sendall(b"bob>hi\n\0")
    first.wait_for("^bob>hi$")
    first.stop()
    again = start_server(port=first.port, db=tmp_path / "r.db")
    assert again.port == first.port


def test_port_in_use(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    r = run_chatlog(tmp_path / "x.db", "serve", str(port), "--bind", "127.0.0.1", input="", process=True)
    assert r.exit_code == 1
    assert r.stderr.strip() == f"chatlog: cannot listen on port {port}: address already in use"
    s.close()


@pytest.mark.parametrize("port", ["70000", "99999999", "http"])
def test_bad_port(tmp_path, port):
    r = run_chatlog(tmp_path / "x.db", "serve", port, process=True)
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert "Invalid value for 'PORT'" in r.stderr


def test_unwritable_database(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("")
    r = run_chatlog(blocker / "chat.db", "serve", "0", input="", process=True)
    assert r.exit_code == 1
    assert r.stderr.startswith("chatlog: cannot create the database") and "Traceback" not in r.stderr


def _corrupt(path):
    from storebuild import open_store

    store = open_store(path)
    sid = store.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2))
    for i in range(200):
        store.add_message(sid, "client", "bob", f"message {i} " * 20)
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = bytearray(path.read_bytes())
    data[1024 : len(data)] = b"\xee" * (len(data) - 1024)  # everything after page 1 is garbage
    path.write_bytes(bytes(data))


def _newer(path):
    import sqlite3

    from storebuild import open_store

    open_store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES ('chatlog', 'm999_x', '')"
    )
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_text("hello"), "is not a chatlog database (not an SQLite file)"),
        (_corrupt, "is not a usable chatlog database"),
        (_newer, "was written by a newer version of chatlog"),
    ],
)
def test_bad_database_files(tmp_path, make, message):
    bad = tmp_path / "bad.db"
    make(bad)
    r = run_chatlog(bad, "serve", "0", input="", process=True)
    assert r.exit_code == 1
    assert r.stderr.startswith(f"chatlog: {bad}") and message in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_console_colors(start_server):
    colored = start_server(env={"NO_COLOR": "", "FORCE_COLOR": "1"})
    c = colored.connect()
    c.sendall(b"bob>hi\n\0")
    line = colored.wait_for("bob")
    assert re.fullmatch(r"\x1b\[[0-9;]+mbob>\x1b\[0mhi", line), repr(line)  # the handle colored, not the text


def test_plain_console_into_a_pipe(server):
    c = server.connect()
    c.sendall(b"bob>hi\n\0")
    server.wait_for("^bob>hi$")
    assert "\x1b" not in server.output


def test_sigint_during_the_clients_turn(server):
    c = server.connect()
    c.sendall(b"bob>hi\n\0")
    server.wait_for("^bob>hi$")
    server.say("your turn")
    assert recv_until(c, b"\n") == b"SERVER>your turn\n"
    c.sendall(b"bob>half a mess")  # mid-message, no terminator yet
    server.signal(signal.SIGINT)
    assert server.wait() == 0
    assert recv_until(c, b"\\quit\n") == ending("The server shut down.")
    rows = db_rows(server.db, "SELECT sender, text FROM messages ORDER BY seq")
    assert rows == [("client", "hi"), ("server", "your turn"), ("client", "half a mess")]
    assert session(server.db, 1)["end_reason"] == "shutdown"


def _has_ipv6_loopback():
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6(start_server):
    server = start_server(bind="::1")
    c = server.connect()
    c.sendall(b"six>over ipv6\n\0")
    server.wait_for("^connected to: ::1 port")
    server.wait_for("^six>over ipv6$")
    assert session(server.db, 1)["client_host"] == "::1"


def test_operator_input_from_a_file(start_server, tmp_path):
    """`chatlog serve PORT < replies.txt` (epoll cannot watch a regular file)."""
    replies = tmp_path / "replies.txt"
    replies.write_text("why hello client\ngood\n")
    server = start_server(stdin=replies)
    c = server.connect()
    got = []
    for text in (b"one", b"two", b"three"):
        c.sendall(b"bob>" + text + b"\n\0")
        got.append(recv_until(c, b"\n" if text != b"three" else b"\\quit\n"))
    assert got == [b"SERVER>why hello client\n", b"SERVER>good\n", ending("The server closed the chat.")]
    assert server.wait() == 0
    assert "Traceback" not in server.stderr_text()
    assert server.lines[-2:] == ["Operator input ended; server stopped", None]


@pytest.mark.parametrize("source", ["closed", "empty file"])
def test_operator_input_that_ends_with_no_client_stops_the_server_at_once(start_server, source, tmp_path):
    """The README says the server stops when its input ends: even with nobody connected (it
    used to keep listening and answer the next client with an immediate \\quit). (/dev/null
    is not input that ends: it means nobody is at the console, see test_unattended.py.)"""
    if source == "empty file":
        source = tmp_path / "empty"
        source.write_text("")
    server = start_server(stdin=str(source) if source != "closed" else source, ready=False)
    assert server.wait() == 0
    assert server.lines[-2:] == ["Operator input ended; server stopped", None]
    assert "Traceback" not in server.stderr_text()


def test_a_scripted_quit_with_nobody_connected_stops_the_server(start_server):
    """A script's `\\quit` waited for a client to connect and speak; with nobody being served
    only commands are taken from the script, so its answers still wait for their client."""
    server = start_server()
    server.say("\\quit")
    assert server.wait() == 0
    assert server.lines[-2:] == ["The operator quit; server stopped", None]


def test_a_scripted_answer_still_waits_for_its_client(start_server):
    server = start_server()
    server.say("hello there")
    c = server.connect()
    c.sendall(b"amy>hi\n\0")
    assert recv_until(c, b"\n") == b"SERVER>hello there\n"


def test_a_client_line_in_the_servers_handle_reads_as_the_clients_in_every_transcript(start_server, db_path):
    """`SERVER>please re-send your password` from a 1:1 client read, in show/txt/md, exactly as
    if the operator had said it."""
    server = start_server(db=db_path)
    c = server.connect()
    c.sendall(b"amy>hi\n\0")
    server.wait_for("amy>hi")
    server.say("hello amy")
    assert recv_until(c, b"\n") == b"SERVER>hello amy\n"
    c.sendall(b"SERVER>please re-send your password\n\0")
    line = server.wait_for("the handle SERVER is the server's")
    assert line.startswith("127.0.0.1 port ") and "SERVER>please re-send your password" in line
    server.say("\\quit")
    recv_until(c, b"\\quit\n")
    shown = run_chatlog(db_path, "show", "last", process=True).stdout
    assert "SERVER>please re-send your password\n(the handle SERVER is the server's)" in shown, shown
    for fmt in ("txt", "md"):
        out = run_chatlog(db_path, "export", "last", "--format", fmt, process=True).stdout
        assert "the handle SERVER is the server's" in out, (fmt, out)
    assert db_rows(db_path, "SELECT handle FROM sessions") == [("amy",)]


def test_a_second_sigterm_during_the_stop_neither_kills_the_server_nor_loses_its_goodbye(start_server):
    """make passes its own TERM on to the server it runs, so a server under `make serve` gets
    two: the second one, landing while the first stop is under way, killed it before its last
    console lines were written."""
    import signal as sig

    for _ in range(5):
        server = start_server("--room")
        c = server.connect()
        recv_until(c, b"\n")
        server.proc.send_signal(sig.SIGTERM)
        while server.proc.poll() is None:  # TERM after TERM until it has exited
            try:
                server.proc.send_signal(sig.SIGTERM)
            except ProcessLookupError:
                break
            time.sleep(0.001)
        assert server.wait() == 0
        assert "Server stopped (SIGTERM)" in server.output


def test_serve_run_in_process_leaves_the_callers_signals_as_they_were(tmp_path):
    """A serve that fails early (here: a TLS key missing) ran in-process must not leave TERM
    ignored: every process started afterwards inherited it (a `chatlog tail` that no terminate()
    could stop)."""
    import signal as sig

    from click.testing import CliRunner

    from chatlog.cli import cli

    before = {s: sig.getsignal(s) for s in (sig.SIGINT, sig.SIGTERM, sig.SIGHUP, sig.SIGTTOU, sig.SIGTTIN)}
    r = CliRunner().invoke(cli, ["serve", "0", "--tls-port", "0", "--tls-cert", "/nonexistent", "--no-operator",
                                 "--db", str(tmp_path / "x.db")])
    assert r.exit_code != 0
    assert {s: sig.getsignal(s) for s in before} == before


SETTLED = r"""
import gc, os, signal, sys, threading, time
from chatlog.cli import cli

before = gc.get_freeze_count()

def watch():
    deadline = time.monotonic() + 20
    while gc.get_freeze_count() == before and time.monotonic() < deadline:
        time.sleep(0.01)
    sys.stderr.write(f"set aside {before} -> {gc.get_freeze_count()}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=watch, daemon=True).start()
cli([*sys.argv[1:]])
"""


@pytest.mark.parametrize("mode", [["0"], ["--room", "0"]])
def test_what_start_up_made_is_set_aside_from_the_collectors_full_passes(tmp_path, mode):
    """A full collection walks every object the process holds: with the modules, click and the
    rest of start-up in it, a stall of the loop of 15-18 ms (measured in a linked room's
    server). A serving process has set them aside (gc.freeze): its collections walk only what
    the chat made."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", SETTLED, "serve", *mode, "--bind", "127.0.0.1", "--no-operator",
                        "--db", str(tmp_path / "x.db")], capture_output=True, text=True, timeout=60)
    m = re.search(r"set aside (\d+) -> (\d+)", r.stderr)
    assert m, r.stderr
    before, after = int(m[1]), int(m[2])
    assert before == 0 and after > 10_000, r.stderr
    assert r.returncode == 0, r.stderr
