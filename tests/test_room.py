"""`chatlog serve --room` end to end: a real server, real sockets, real SQLite files."""

import signal
import socket
import time

import pytest
from conftest import db_rows, recv_until, wait_until

from chatlog.sanitize import visible

WELCOME = b"SERVER>*** Welcome to the room: %d here. Type at any time.\n"


@pytest.fixture
def room(start_server):
    return start_server("--room", "--history", "0")  # (history on join has tests of its own)


def join(server, handle=None):
    s = server.connect()
    greeting = recv_until(s, b"\n")
    assert greeting.startswith(b"SERVER>*** Welcome to the room: ")
    if handle:
        s.sendall(f"{handle}>hi\n".encode())
    return s


def lines_of(db):
    return db_rows(db, "SELECT sender, handle, text, note FROM messages ORDER BY seq")


def test_a_newcomer_is_greeted_first_and_hears_only_what_is_said_after_it_joined(start_server):
    server = start_server("--room", "--rate", "0")
    talker = join(server, "talker")
    for _ in range(20):
        talker.sendall(b"talker>" + b"x" * 100 + b"\n")
        late = server.connect()
        assert recv_until(late, b"\n").startswith(b"SERVER>*** Welcome to the room: ")
        late.close()


def test_lines_are_committed_then_relayed_to_everyone_else(room):
    a = room.connect()
    assert recv_until(a, b"\n") == WELCOME % 1
    b = room.connect()
    assert recv_until(b, b"\n") == WELCOME % 2
    a.sendall(b"alice>hello\n")
    assert recv_until(b, b"hello\n") == b"SERVER>*** alice joined\nalice>hello\n"
    b.sendall(b"bob>hi alice\n\0")
    assert recv_until(a, b"alice\n") == b"SERVER>*** bob joined\nbob>hi alice\n"
    room.say("welcome both")
    assert recv_until(a, b"both\n") == b"SERVER>welcome both\n"
    assert recv_until(b, b"both\n") == b"SERVER>welcome both\n"
    room.wait_for("^bob>hi alice$")
    assert lines_of(room.db) == [
        ("event", "alice", "joined", None),
        ("client", "alice", "hello", None),
        ("event", "bob", "joined", None),
        ("client", "bob", "hi alice", None),
        ("server", "SERVER", "welcome both", None),
    ]
    (kind,) = db_rows(room.db, "SELECT kind FROM sessions")[0]
    assert kind == "room"


def test_relayed_text_is_made_safe_as_the_console_makes_it(room):
    a, b = join(room, "alice"), join(room, "bob")
    recv_until(a, b"bob>hi\n")
    b.sendall(b"bob>\x1b]0;pwned\x07\x1b[2J\xe2\x80\xae evil\r\n")
    got = recv_until(a, b"evil\n")
    assert b"\x1b" not in got and b"\x07" not in got and "\u202e".encode() not in got
    assert got.endswith(b"bob>\\x1b]0;pwned\\x07\\x1b[2J\\u202e evil\n")
    room.wait_for(r"bob>\\x1b\]0;pwned")
    assert "\x1b]0;" not in room.output
    assert lines_of(room.db)[-1][2] == "\x1b]0;pwned\x07\x1b[2J\u202e evil"  # the record is faithful


def test_an_old_turn_based_client_sees_relayed_lines_when_it_next_reads(room):
    """A CS372-style client sends a line, then reads once: it gets what was said meanwhile."""
    old = join(room)
    new = join(room, "amy")
    for i in range(3):
        new.sendall(b"amy>line %d\n" % i)
    room.wait_for("^amy>line 2$")
    old.sendall(b"oldie>hello\n\0")
    got = recv_until(old, b"line 2\n")
    assert got == b"SERVER>*** amy joined\namy>hi\namy>line 0\namy>line 1\namy>line 2\n"


def test_a_client_that_never_reads_is_dropped_and_nobody_waits(start_server):
    server = start_server("--room", "--rate", "0")
    stuck = join(server, "stuck")
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    talker, listener = join(server, "talker"), join(server, "ear")
    # The talker's sends wait for the server to take them, so the listener, reading every 50
    # lines, keeps up (a kernel that gives a new loopback socket megabytes of send buffer would
    # take all 4,000 lines at once, and the listener would rightly be dropped as not reading).
    talker.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    line = b"talker>" + b"x" * 440 + b"\n"
    received = b""
    listener.settimeout(10)
    for i in range(4000):
        talker.sendall(line)
        if i % 50 == 0:
            try:
                while True:
                    listener.setblocking(False)
                    chunk = listener.recv(1 << 20)
                    if not chunk:
                        break
                    received += chunk
            except BlockingIOError:
                pass
            finally:
                listener.setblocking(True)
        if server.count(r"stuck \(.*\) left") and i > 2600:
            break
    server.wait_for(r"stuck \(.*\) left: dropped, it stopped reading")
    talker.close()
    server.wait_for(r"talker \(.*\) left")
    assert db_rows(server.db, "SELECT end_reason FROM participants WHERE handle = 'stuck'") == [("slow",)]
    total = db_rows(
        server.db, "SELECT count(*) FROM messages WHERE handle = 'talker' AND sender = 'client' AND text != 'hi'"
    )[0][0]
    listener.settimeout(10)
    try:
        while received.count(b"talker>x") < total:
            chunk = listener.recv(1 << 20)
            if not chunk:  # closed on us: say why, rather than spin on b"" until the suite times out
                raise AssertionError(f"the listener was closed after {received.count(b'talker>x')} of {total}; "
                                     f"{server.output[-2000:]}")
            received += chunk
    except TimeoutError:
        raise AssertionError(f"{received.count(b'talker>x')} of {total}; {server.output[-2000:]}") from None
    assert received.count(b"talker>x") == total  # everyone else got every line


def test_a_flooding_client_is_paused_not_cut_and_nothing_is_lost(start_server):
    """Over its rate, a client's reads pause (what one read brought is still relayed): 300 lines
    of 400 bytes at 100 lines/s with a burst of 10 take well over a second, and all arrive."""
    server = start_server("--room", "--rate", "100", "--burst", "10")
    flood, ear = join(server, "flood"), join(server, "ear")
    recv_until(flood, b"ear joined\n")
    start = time.monotonic()
    flood.sendall(b"".join(b"flood>%03d " % i + b"y" * 390 + b"\n" for i in range(300)))
    got = b""
    ear.settimeout(10)
    while b"flood>299 " not in got:
        got += ear.recv(65536)
    elapsed = time.monotonic() - start
    numbered = [x[:9] for x in got.split(b"\n") if x.startswith(b"flood>") and x[6:9].isdigit()]
    assert numbered == [b"flood>%03d" % i for i in range(300)]
    assert elapsed > 1.0
    server.wait_for("reading paused")


def test_room_full_and_per_address_cap_refuse_clearly(start_server, tmp_path):
    server = start_server("--room", "--max-clients", "2", "--per-address", "0")
    a, b = join(server), join(server)
    c = server.connect()
    assert recv_until(c, b"\\quit\n") == b"SERVER>*** The room is full; try again later.\n\\quit\n"
    a.close()
    b.close()
    capped = start_server("--room", "--per-address", "1", db=tmp_path / "capped.db")  # a server of its own
    inside = join(capped)  # kept open: a dropped socket would leave its place to the next one
    d = capped.connect()
    assert recv_until(d, b"\\quit\n") == b"SERVER>*** Too many connections from your address; try again later.\n\\quit\n"
    inside.close()


def _has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_per_address_cap_over_ipv6_loopback(start_server, tmp_path):
    """Over real IPv6 sockets the cap counts ::1's /64 as one address (the policy's /64 rule is
    tested on the policy itself: loopback has one address only)."""
    capped = start_server("--room", "--per-address", "1", bind="::1")
    inside = join(capped, "six")
    d = capped.connect()
    assert recv_until(d, b"\\quit\n") == b"SERVER>*** Too many connections from your address; try again later.\n\\quit\n"
    inside.close()


def test_clients_resetting_mid_accept_harm_no_one(room):
    import struct

    a = join(room, "alice")
    for _ in range(50):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.connect((room.host, room.port))
        s.close()
    bob = join(room, "bob")  # kept open until the end, or its leave could arrive with its line
    assert recv_until(a, b"bob>hi\n") == b"SERVER>*** bob joined\nbob>hi\n"
    assert room.proc.poll() is None
    bob.close()


def test_who_kick_and_quit_at_the_console(room):
    a, b = join(room, "alice"), join(room, "bob")
    room.wait_for("^bob>hi$")
    room.say("\\who")
    room.wait_for(r"^  alice +127\.0\.0\.1:\d+ +idle")
    room.say("\\kick bob")
    assert recv_until(b, b"\\quit\n").endswith(b"SERVER>*** The operator removed you from the room.\n\\quit\n")
    assert recv_until(a, b"bob left\n").endswith(b"SERVER>*** bob left\n")
    room.say("\\quit")
    assert recv_until(a, b"\\quit\n").endswith(b"SERVER>*** The server closed the chat.\n\\quit\n")
    assert room.wait() == 0
    ends = dict(db_rows(room.db, "SELECT handle, end_reason FROM participants"))
    assert ends == {"alice": "server-quit", "bob": "kicked"}


def test_no_client_may_take_the_server_handle(room):
    a = join(room, "alice")
    fake = join(room)
    fake.sendall(b"SERVER>*** The server shut down.\n")
    assert b"server's" in recv_until(fake, b"server's")
    room.wait_for(r"the handle SERVER is the server's \(not relayed\)")
    a.sendall(b"alice>still here\n")
    room.wait_for("^alice>still here$")
    a.settimeout(0.3)
    with pytest.raises(TimeoutError):
        while True:
            assert b"shut down" not in a.recv(1000)


def test_a_handle_in_use_or_a_look_alike_of_the_servers_is_refused_with_a_notice(room):
    alice = join(room, "alice")
    bob = join(room, "bob")
    recv_until(alice, b"bob>hi\n")
    twin = join(room, "alice")  # a second client called alice
    assert recv_until(twin, b"(not relayed)\n") == (
        b"SERVER>*** The handle alice is taken by someone here; choose another, like: carol>hello (not relayed)\n")
    dan = join(room, "dan")
    recv_until(alice, b"dan>hi\n")
    dan.sendall(b"bob>dan is now bob\n")  # an nc user renaming onto bob
    assert recv_until(dan, b"(not relayed)\n").endswith(b"The handle bob is taken by someone here; "
                                                        b"choose another, like: carol>hello (not relayed)\n")
    dan.sendall("S\u0415RV\u0415R\u034f>Please re-send your password\n".encode())
    assert recv_until(dan, b"(not relayed)\n").startswith(
        b"SERVER>*** The handle S\xd0\x95RV\xd0\x95R\\u034f has an invisible or control character (\\u034f)")
    room.wait_for("Please re-send your password$")
    bob.sendall(b"bob>still bob\n")
    heard = recv_until(alice, b"still bob\n")  # what alice heard since dan joined: none of it
    assert heard == b"bob>still bob\n"
    assert db_rows(room.db, "SELECT handle, note FROM messages WHERE note IS NOT NULL ORDER BY seq") == [
        ("alice", "the handle alice is taken by someone here: not relayed"),
        ("bob", "the handle bob is taken by someone here: not relayed"),
        ("S\u0415RV\u0415R\u034f", "the handle S\u0415RV\u0415R\u034f has an invisible or control character (\u034f): not relayed"),
    ]
    for s in (alice, bob, twin, dan):
        s.close()


def test_kill_9_mid_room_loses_no_line_any_client_received(room):
    a, b = join(room, "alice"), join(room, "bob")
    recv_until(a, b"bob>hi\n")
    for i in range(200):
        a.sendall(b"alice>n%d\n" % i)
    got = recv_until(b, b"alice>n100\n")
    room.proc.send_signal(signal.SIGKILL)
    room.proc.wait(10)
    b.settimeout(2)
    try:
        while True:
            chunk = b.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    received = [line[len(b"alice>"):].decode() for line in got.split(b"\n") if line.startswith(b"alice>")]
    stored = {t for s, h, t, _ in lines_of(room.db) if h == "alice" and s == "client"}
    assert set(received) <= stored


def test_relayed_and_stored_lines_are_equal(start_server):
    server = start_server("--room", "--rate", "0")
    clients = [join(server, f"c{i}") for i in range(5)]
    for k in range(20):
        for i, c in enumerate(clients):
            c.sendall(b"c%d>m%d\n" % (i, k))
    wait_until(lambda: server.count(r"^c\d>m\d+$") == 100)
    # what c0 received: the other four clients' lines, in the order the store holds them
    expected = [f"c{i}>{t}" for s, h, t, _ in lines_of(server.db) if s == "client"
                for i in [int(h[1:])] if i != 0]
    got = b""
    clients[0].settimeout(10)
    while got.count(b"\n") - got.count(b"SERVER>") < len(expected):
        got += clients[0].recv(65536)
    relayed = [x.decode() for x in got.split(b"\n") if x and not x.startswith(b"SERVER>")]
    assert relayed == expected


def test_a_console_nobody_reads_does_not_stall_the_room(start_server):
    """The server's stdout is a pipe that nobody reads (or a terminal paused with Ctrl-S): the
    room goes on, and the console says how many lines it could not show."""
    server = start_server("--room", "--rate", "0", stdout="unread")
    a = server.connect()
    b = server.connect()
    recv_until(a, b"\n")
    recv_until(b, b"\n")
    b.sendall(b"bob>here\n")
    # Past a pipe's 64 KB, the batch the console's writer holds while it waits on the pipe (up
    # to a queue's worth: with a pass's lines written together it often holds thousands), and
    # then past the console's queue of 10,000 lines.
    n = 32_000
    a.sendall(b"".join(b"alice>line %05d\n" % i for i in range(n)))
    got = recv_until(b, b"line %05d\n" % (n - 1), timeout=20)
    assert got.count(b"alice>line ") == n
    server.start_reading()  # the console catches up, and says what it left out
    server.wait_for(r"^\(\d+ console lines not shown: the console was not keeping up; all are recorded\)$")
    server.proc.kill()
    server.proc.wait()
    assert db_rows(server.db, "SELECT count(*) FROM messages WHERE sender = 'client'") == [(n + 1,)]


def test_every_export_says_who_said_each_line_of_a_room(room):
    import csv
    import io
    import json

    from conftest import run_chatlog

    a, b = join(room, "alice"), join(room, "bob")
    recv_until(a, b"bob>hi\n")
    room.say("hello both")
    recv_until(a, b"both\n")
    ports = {"alice": a.getsockname()[1], "bob": b.getsockname()[1]}
    out = run_chatlog(room.db, "export", "1", "-f", "jsonl").output
    for line in map(json.loads, out.splitlines()):
        if line["sender"] == "server":
            assert "port" not in line
        else:
            assert (line["host"], line["port"]) == ("127.0.0.1", ports[line["handle"]])
    rows = list(csv.DictReader(io.StringIO(run_chatlog(room.db, "export", "1", "-f", "csv").output)))
    assert {(r["handle"], r["port"]) for r in rows if r["sender"] == "client"} == {
        ("alice", str(ports["alice"])), ("bob", str(ports["bob"]))
    }
    doc = json.loads(run_chatlog(room.db, "export", "1", "-f", "json").output)
    said = [m for m in doc["sessions"][0]["messages"] if m["sender"] == "client"]
    assert all(m["port"] == ports[m["handle"]] for m in said)


def test_chatclient_is_announced_when_its_handle_is_chosen(start_server, chatclient):
    """The real client in a room: the others hear `alice joined` as soon as alice has chosen
    her handle, before she says anything (issue: a join announced at the first message)."""
    from conftest import spawn_client

    server = start_server("--room")
    ear = join(server, "ear")
    p = spawn_client(chatclient, server, handle="alice")
    assert b"SERVER>*** alice joined\n" in recv_until(ear, b"alice joined\n")
    assert lines_of(server.db)[-1] == ("event", "alice", "joined", None)
    p.sendline("\\quit")
    p.expect("You left the chat")


def test_a_clients_who_is_answered_to_it_alone_and_never_reaches_the_others(start_server):
    """`\\who` and `/who` from a client were relayed to the whole room as chat lines."""
    from conftest import join_room

    room = start_server("--room", "--history", "0")
    alice = join_room(room, "alice")
    room.wait_for("^alice>hi$")
    bob = join_room(room, "bob")
    assert recv_until(alice, b"bob>hi\n").endswith(b"bob>hi\n")
    alice.sendall(b"alice>\\who\n")
    assert recv_until(alice, b"\n") == b"SERVER>*** 2 here: alice, bob\n"
    alice.sendall(b"alice>/nick al\n")
    assert recv_until(alice, b"\n").startswith(b"SERVER>*** Unknown command /nick al (not sent to the room).")
    alice.sendall(b"alice>hello\n")
    assert recv_until(bob, b"hello\n") == b"alice>hello\n"  # nothing of the commands before it
    assert lines_of(room.db)[-3:] == [
        ("client", "alice", "\\who", "a command, answered to its sender: not relayed"),
        ("client", "alice", "/nick al", "a command, answered to its sender: not relayed"),
        ("client", "alice", "hello", None),
    ]


def test_a_burst_of_mixed_lines_in_one_write_is_stored_and_relayed_line_for_line(start_server):
    """One write holds runs of plain lines (./chatclient's "\\n\\0" and bare "\\n", enough for the
    sender's own matcher, so they are taken as Runs), and between them what a run cannot take:
    an escape, a command, CR-LF, a new handle, an empty line. The listener hears exactly what is
    stored, in the store's order, with no NUL and no escape raw, and nothing is lost."""
    server = start_server("--room", "--rate", "0")
    talker = join(server, "amy")
    server.wait_for(r"^amy>hi$")
    ear = join(server, "ear")
    server.wait_for(r"ear joined")
    talker.sendall(b"".join(b"amy>plain %d\n\0" % i for i in range(300)))  # a run taken whole
    server.wait_for(r"^amy>plain 299$")
    mixed = b"amy>esc \x1b[2J here\n" + b"\\who\n" + b"amy>crlf line\r\n"
    mixed += b"".join(b"amy>bare %d\n" % i for i in range(200))
    talker.sendall(mixed + b"ann>new name\n" + b"ann>\n")  # line by line where a run cannot
    server.wait_for(r"now calls itself ann")
    talker.sendall(b"".join(b"ann>after %d\n\0" % i for i in range(300)))  # whole, under the new name
    server.wait_for(r"^ann>after 299$")
    rows = [(h, t, n) for s, h, t, n in lines_of(server.db) if s == "client" and h in ("amy", "ann")]
    stored = [(h, t) for h, t, _ in rows]
    said = [t for h, t in stored]
    assert said[:2] == ["hi", "plain 0"] and said[-1] == "after 299"
    assert len([t for t in said if t.startswith(("plain ", "bare ", "after "))]) == 800
    assert ("ann", "new name") in stored and "crlf line" in said and "esc \x1b[2J here" in said
    got = b""
    ear.settimeout(10)
    while not got.endswith(b"ann>after 299\n"):
        got += ear.recv(1 << 20)
    assert b"\0" not in got and b"\x1b" not in got
    relayed = [x.decode() for x in got.split(b"\n") if x and not x.startswith(b"SERVER>")]
    # amy's "hi" came before ear joined; a command is answered to its sender alone
    expected = [f"{h}>{visible(t)}" for h, t, n in rows[1:] if not (n or "").endswith("not relayed")]
    assert len(expected) == len(rows) - 2
    assert relayed == expected
