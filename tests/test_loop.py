"""The loop in-process: a real listening socket, real client sockets, a real temporary store, a
console on a pipe, stepped one pass at a time, so what one pass may take, hold and commit is
checked exactly (and fast: no server process).

These are the bounded-work rules of docs/architecture.md: a pass takes at most PASS_LINES lines
from all clients together, never more than the policy's allowance from one (the rest stays in
the kernel), commits in chunks of PENDING_CHUNK, and a stop reads nothing a paused client was
refused."""

import os
import socket
import sqlite3
import time

import pytest
from conftest import wait_until

from chatlog import modes, server
from chatlog.events import Started
from chatlog.operator import Console
from chatlog.recorder import open_recorder
from chatlog.render import Renderer
from chatlog.transport import listen


class Harness:
    def __init__(self, tmp_path, room=True, **options):
        self.db = tmp_path / "loop.db"
        self.recorder = open_recorder(self.db)
        if room:
            opts = dict(handle="SERVER", max_clients=100, per_address=0, rate=20, burst=100)
            opts.update(options)
            self.mode = modes.room_mode(self.recorder, **opts)
        else:
            self.mode = modes.chat_mode(self.recorder, handle="SERVER", idle_timeout=300, first_timeout=30,
                                        max_waiting=5, per_address=None)
        self.sockets = listen("127.0.0.1", 0, backlog=64)
        self.port = self.sockets[0].getsockname()[1]
        self.out_r, out_w = os.pipe()
        os.set_blocking(self.out_r, False)
        self.stream = os.fdopen(out_w, "w")
        self.in_r, self.in_w = os.pipe()
        self.stdin = os.fdopen(self.in_r, "r")
        self.console = Console(self.stream)
        self.loop = server._prepare(self.mode, self.sockets, Renderer(self.stream, color=False), self.stdin,
                                    self.console, "127.0.0.1")
        self.loop._watch_listeners(True)
        self.loop._feed(Started(time.time()))
        self.loop._carry_out()
        self.clients = []
        self.output = ""

    def step(self, n=1):
        for _ in range(n):
            self.loop.console.flush()
            self.loop._pass()

    def join(self, handle):
        s = socket.create_connection(("127.0.0.1", self.port))
        self.clients.append(s)
        self.step_until(lambda: len(self.loop.clients) == len(self.clients))
        s.sendall(f"{handle}>hi\n".encode())
        self.step_until(lambda: self.count(handle=handle) >= 1)
        return s

    def delivered(self, nbytes: int) -> None:
        """Wait until the kernel holds `nbytes` not yet read on the server's side of the clients'
        connections (what a pass may take is then what is checked, not how fast loopback is)."""
        import fcntl
        import struct
        import termios

        def waiting() -> int:
            return sum(struct.unpack("i", fcntl.ioctl(c.io.sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
                       for c in self.loop.clients.values())

        wait_until(lambda: waiting() >= nbytes)

    def reset_seen(self, conn: int) -> None:
        """Wait until the server's side of a connection has had its reset (poll says so; nothing
        is read, so the loop still finds it)."""
        import select

        p = select.poll()
        p.register(self.loop.clients[conn].io.sock, select.POLLIN)
        wait_until(lambda: any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0)))

    def step_until(self, predicate, passes=2000):
        for _ in range(passes):
            if predicate():
                return
            self.step()
        raise AssertionError("condition not met in time")

    def count(self, handle=None):
        conn = sqlite3.connect(self.db)
        try:
            if handle is None:
                return conn.execute("SELECT count(*) FROM messages WHERE sender = 'client'").fetchone()[0]
            return conn.execute("SELECT count(*) FROM messages WHERE sender = 'client' AND handle = ?",
                                (handle,)).fetchone()[0]
        finally:
            conn.close()

    def read_console(self):
        self.loop.console.flush()
        try:
            while chunk := os.read(self.out_r, 65536):
                self.output += chunk.decode()
        except BlockingIOError:
            pass
        return self.output

    def close(self):
        for s in self.clients:
            s.close()
        self.loop.stopping = "test"
        if not self.loop.finished:
            self.step()
        self.loop.acceptor.close()
        self.loop.watch.close()
        import threading

        done = threading.Event()

        def drain():  # a console that stalls is the thread's to wait out: read what it writes
            while not done.is_set():
                try:
                    os.read(self.out_r, 1 << 20)
                except BlockingIOError:
                    time.sleep(0.005)
                except OSError:
                    return

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        self.console.close()
        done.set()
        reader.join()
        self.recorder.close()
        os.close(self.in_w)
        for f in (self.stdin, self.stream):
            try:
                f.close()
            except OSError:
                pass
        os.close(self.out_r)


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(**kw):
        h = Harness(tmp_path, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_one_pass_takes_at_most_pass_lines_from_everyone_and_leaves_the_rest_in_the_kernel(harness):
    h = harness(rate=0)
    floods = [h.join(f"f{i}") for i in range(4)]
    before = h.count()
    for s in floods:
        s.sendall(b"\n" * 5_000)
    h.delivered(20_000)
    h.step()
    taken = h.count() - before
    assert 0 < taken <= server.SHARED_LINES  # several with input: they share the smaller bound
    assert len(h.loop.pending) == 0  # everything taken was carried out in the pass
    h.step_until(lambda: h.count() - before == 20_000, passes=10_000)


def test_a_client_alone_with_input_may_take_a_larger_pass_but_no_more(harness):
    """A burst's sender with nobody else to wait for takes up to PASS_LINES in a pass (each
    pass writes once to every listener and commits once: fewer, larger passes are the burst's
    speed); several with input share SHARED_LINES, so a pass of their slow lines stays short."""
    h = harness(rate=0)
    sender = h.join("amy")
    before = h.count()
    sender.sendall(b"amy>x\n" * 5_000)
    h.delivered(30_000)
    h.step()
    taken = h.count() - before
    assert server.SHARED_LINES < taken <= server.PASS_LINES


def test_a_client_over_its_allowance_is_left_unread_then_paused(harness):
    h = harness(rate=20, burst=100)
    flooder = h.join("flood")
    flooder.sendall(b"flood>x\n" * 5_000)
    h.delivered(40_000)
    h.step(5)
    assert h.count("flood") <= 1 + 100 + 20  # the burst, and what the rate allows meanwhile
    assert h.loop.clients[1].paused_until is not None


def test_a_stop_reads_nothing_a_paused_client_was_refused(harness):
    h = harness(rate=20, burst=100)
    flooder = h.join("flood")
    flooder.sendall(b"flood>x\n" * 5_000)
    h.delivered(40_000)
    h.step_until(lambda: h.loop.clients[1].paused_until is not None)
    taken = h.count("flood")
    h.loop.stopping = "SIGTERM"
    h.step()
    assert h.loop.finished
    assert h.count("flood") == taken  # what it sent past its allowance was never accepted


def test_the_consoles_lines_of_a_pass_are_written_when_the_pass_ends(harness):
    h = harness()
    h.join("amy")
    assert "amy joined" in h.read_console()
    assert "amy>hi" in h.output


def test_a_busy_console_is_written_at_most_every_hundredth_of_a_second_and_never_later():
    """Each write to the console wakes whoever reads it, on the chat's cores: a pass's lines
    are written at its end when the last write was Console.EVERY ago, else held for the next
    pass's, and `due` says when they must go (the loop waits no longer than that)."""
    import os

    from chatlog.operator import Console

    r, w = os.pipe()
    os.set_blocking(r, False)
    out = os.fdopen(w, "w")
    console = Console(out)

    def screen() -> bytes:
        try:
            return os.read(r, 65536)
        except BlockingIOError:
            return b""

    try:
        t = 1000.0
        console.write("one")
        console.flush_due(t)
        assert screen() == b"one\n" and console.due is None  # idle before: at once
        console.write("two")
        console.flush_due(t + 0.004)
        assert screen() == b"" and console.due == t + Console.EVERY  # held, with its deadline
        console.write("three")
        console.flush_due(t + 0.008)
        assert screen() == b""
        console.flush_due(t + Console.EVERY)  # the deadline: both go, in one write
        assert screen() == b"two\nthree\n" and console.due is None
        console.write("four")
        console.flush()  # (a prompt on a terminal: at once)
        assert screen() == b"four\n"
    finally:
        console.close()
        out.close()
        os.close(r)


def test_a_bystanders_line_goes_out_in_the_pass_it_was_read_in_whatever_others_send(harness):
    h = harness(rate=0)
    floods = [h.join(f"f{i}") for i in range(10)]
    alice, bob = h.join("alice"), h.join("bob")
    bob.setblocking(False)
    for s in floods:
        s.sendall(b"\n" * 30_000)
    alice.sendall(b"alice>probe\n")
    h.delivered(10 * 30_000 + 12)
    h.step(2)  # the probe was read in the first pass (every client gets its share)
    got = _drain(bob)
    assert b"alice>probe\n" in got


def test_a_turn_answered_by_a_script_is_one_commit_made_before_either_line_is_shown_or_sent(harness):
    """A piped operator's answer, already read, joins the pass of the line it answers: the line
    and the answer are committed in one statement; the console shows them in order, and the
    client gets the answer, only after that."""
    h = harness(room=False)
    os.write(h.in_w, b"pong 1\npong 2\n")
    c = socket.create_connection(("127.0.0.1", h.port))
    h.clients.append(c)
    h.step_until(lambda: len(h.loop.clients) == 1)
    commits = []
    real = h.recorder._committed

    def counted():
        db = sqlite3.connect(h.db)
        commits.append(db.execute("SELECT sender, text FROM messages ORDER BY id").fetchall())
        db.close()
        assert "ping" not in h.read_console()  # one commit a turn: nothing of it is shown yet
        real()

    h.recorder._committed = counted
    c.settimeout(5)
    for n in (1, 2):
        c.sendall(b"bob>ping %d\n" % n)
        h.step_until(lambda n=n: len(commits) == n)
        assert commits[-1][-2:] == [("client", f"ping {n}"), ("server", f"pong {n}")]
        assert c.recv(100) == b"SERVER>pong %d\n" % n
        out = h.read_console()
        assert out.index(f"bob>ping {n}") < out.index(f"SERVER>pong {n}")
        h.output = ""
    assert len(commits) == 2  # one a turn


def test_the_answer_goes_out_before_the_console_is_formatted(harness, monkeypatch):
    """A pass sends first, then formats its console lines (in their order): no client waits while
    lines are made for the operator to read."""
    events = []
    real_show = server.show_lines
    monkeypatch.setattr(server, "show_lines", lambda r, d: (events.append(("console", d.kind)), real_show(r, d))[1])
    h = harness(room=False)
    os.write(h.in_w, b"pong 1\n")
    c = socket.create_connection(("127.0.0.1", h.port))
    h.clients.append(c)
    h.step_until(lambda: len(h.loop.clients) == 1)
    real_send = h.loop._send
    monkeypatch.setattr(h.loop, "_send", lambda client, data: (events.append(("send", data)), real_send(client, data)))
    events.clear()
    c.sendall(b"bob>ping 1\n")
    h.step_until(lambda: ("send", b"SERVER>pong 1\n") in events)
    assert events[0] == ("send", b"SERVER>pong 1\n") and events[1:3] == [("console", "client"), ("console", "operator")]
    out = h.read_console()
    assert out.index("bob>ping 1") < out.index("SERVER>pong 1")


def test_a_rooms_relay_goes_out_before_its_lines_are_formatted_for_the_console(harness, monkeypatch):
    """As the 1:1 answer: what a pass relays is sent before its lines are made for the console."""
    events = []
    real_show, real_fan_out = server.show_lines, server.fan_out
    monkeypatch.setattr(server, "show_lines", lambda r, d: (events.append(("console", d.kind)), real_show(r, d))[1])
    monkeypatch.setattr(server, "fan_out", lambda lines, clients: (events.append(("relay", len(lines))),
                                                                  real_fan_out(lines, clients))[1])
    h = harness()
    alice, bob = h.join("alice"), h.join("bob")
    events.clear()
    alice.sendall(b"alice>to everyone\nalice>and again\n")
    h.step_until(lambda: h.count(handle="alice") == 3)
    assert events[0][0] == "relay" and ("console", "client") in events  # (the lines: one pass, or two)
    bob.settimeout(5)
    assert b"alice>to everyone\nalice>and again\n" in bob.recv(4096)


def test_a_burst_is_recorded_line_by_line_in_order_shown_and_relayed_whole(harness):
    h = harness(rate=0)
    alice, bob = h.join("alice"), h.join("bob")
    bob.setblocking(False)
    lines = [f"line {i}" for i in range(300)]
    lines[150] = "\\who"  # answered to alice alone, recorded in its place
    lines[200] = "caf\u00e9 \u00e0 la carte"  # not ASCII: the line-by-line path, in its place
    alice.sendall("".join(f"alice>{t}\n" for t in lines).encode())
    h.step_until(lambda: h.count(handle="alice") >= 301)
    conn = sqlite3.connect(h.db)
    try:
        rows = conn.execute("SELECT seq, text, raw, note, participant_id FROM messages WHERE sender = 'client' "
                            "AND handle = 'alice' ORDER BY seq").fetchall()
    finally:
        conn.close()
    assert [r[1] for r in rows] == ["hi", *lines]
    assert [r[0] for r in rows] == sorted({r[0] for r in rows})
    assert all(r[2] is None and r[4] == rows[0][4] for r in rows)
    assert [r[3] for r in rows if r[3]] == ["a command, answered to its sender: not relayed"]
    got = _drain(bob)
    assert got.decode().endswith("".join(f"alice>{t}\n" for t in lines if t != "\\who"))


def _drain(sock) -> bytes:
    """What a non-blocking socket holds now."""
    got = b""
    try:
        while chunk := sock.recv(1 << 20):
            got += chunk
    except BlockingIOError:
        pass
    return got


def test_a_pass_looks_at_the_clients_with_input_or_a_timer_not_at_everyone(harness, monkeypatch):
    """A pass's work follows what happens, not how many are connected: with 60 clients who say
    nothing, a pass in which one of them speaks asks no framer of the silent ones for its timer
    (each pass asked every client's framer, twice: with 5,000 connected, a line between two
    others took 37 ms instead of 0.2). An unterminated line and a paused client still have theirs."""
    from chatlog import protocol

    h = harness(rate=20, burst=100, max_clients=200)
    for _ in range(60):
        h.clients.append(socket.create_connection(("127.0.0.1", h.port)))
    h.step_until(lambda: len(h.loop.clients) == 60)
    amy = h.join("amy")
    asked = []
    real = protocol.Framer.deadline
    monkeypatch.setattr(protocol.Framer, "deadline", lambda self: (asked.append(self), real(self))[1])
    amy.sendall(b"amy>hello\n")
    h.step_until(lambda: h.count("amy") == 2)
    assert len(asked) < 10, f"{len(asked)} framers asked for their timer"
    # a line left unterminated is still completed once its sender is quiet
    amy.sendall(b"amy>no newline")
    h.step_until(lambda: h.count("amy") == 3, passes=100_000)
    # and a client paused for its rate is resumed when its pause ends
    amy.sendall(b"amy>x\n" * 300)
    h.delivered(300 * 6)
    h.step_until(lambda: h.loop.clients[61].paused_until is not None)
    h.step_until(lambda: h.count("amy") >= 3 + 150, passes=100_000)

def test_what_a_client_sent_before_it_reset_is_recorded_when_a_write_to_it_fails_first(harness):
    """A client's unterminated last line, already read, is its last word however its going is
    noticed: here by a broadcast to it failing (it reset the connection: it closed with the room's
    lines unread), before a read sees the reset. It used to be dropped with the connection."""
    import struct

    h = harness(rate=0)
    amy = h.join("amy")
    h.join("bob")
    amy.sendall(b"amy>last words")
    h.step_until(lambda: h.loop.clients[1].framer.deadline() is not None)  # read, held unterminated
    amy.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    amy.close()  # a reset
    h.clients.remove(amy)
    h.reset_seen(1)
    # The room's next line reaches amy before any read of hers sees the reset (a select that
    # returned just before it came): the write fails first.
    h.loop._send(h.loop.clients[1], b"bob>anyone there?\n")
    h.loop._carry_out()
    h.step_until(lambda: 1 not in h.loop.clients)
    assert h.count("amy") == 2, "amy's last line was lost"
    conn = sqlite3.connect(h.db)
    assert conn.execute("SELECT text FROM messages WHERE handle = 'amy' AND sender = 'client' ORDER BY id").fetchall() \
        == [("hi",), ("last words",)]
    conn.close()

@pytest.mark.parametrize("room", [True, False])
def test_a_tick_reads_every_client_first_only_where_it_may_time_one_out(tmp_path, monkeypatch, room):
    """Before a Tick that may time a client out (1:1), every client is read: after a stall a
    line sent in time may be waiting in its socket. A room's Ticks time nobody out, and a linked
    room asks for one ten times a second while people join (to say who is here): reading every
    one of 10,000 idle sockets each time would be for nothing."""
    h = Harness(tmp_path, room=room)
    socks = [socket.create_connection(("127.0.0.1", h.port)) for _ in range(3)]
    h.step_until(lambda: len(h.loop.clients) == 3)
    read = []
    real = server.Intake.read
    monkeypatch.setattr(server.Intake, "read", lambda self, clients, now: (read.extend(c.id for c in clients),
                                                                           real(self, clients, now)))
    monkeypatch.setattr(type(h.loop.policy), "deadline", lambda self: 0.0)  # a Tick is due now
    h.step()
    assert sorted(read) == ([] if room else sorted(h.loop.clients))
    for s in socks:
        s.close()


def test_the_loop_stays_small_and_never_touches_a_socket():
    """The loop carries decisions out and moves no bytes itself: socket calls live in
    transport.py, decisions in the policies (docs/architecture.md)."""
    import ast
    import inspect
    import re

    from chatlog import server

    source = inspect.getsource(server.Loop)
    assert len(source.rstrip().splitlines()) < 300
    code = inspect.getsource(server)
    assert not re.search(r"\.(recv|recv_into|send|sendall|sendmsg)\(", code)
    assert re.findall(r"\w+\.accept\(", code) == ["acc.accept("]  # (transport.Acceptor's)
    assert not [n for n in ast.walk(ast.parse(inspect.getsource(server))) if isinstance(n, ast.Import)
                and any(a.name == "socket" for a in n.names)]


@pytest.mark.parametrize("limit, accepted", [(-1, 1), (10**6, 1), ("lowest free", 0)])
def test_the_acceptor_keeps_descriptors_from_clients_only_below_a_real_limit(limit, accepted):
    """The last RESERVE descriptors below the open-files limit are never a client's; a limit of
    RLIM_INFINITY (-1 here) is no limit at all (it read as one already passed)."""
    from chatlog.transport import Acceptor, Listener

    (sock,) = listen("127.0.0.1", 0)
    sock.setblocking(False)
    acc = Acceptor([Listener(sock)])
    if limit == "lowest free":  # as if the descriptors above the next free one were the reserve
        probe = os.dup(sock.fileno())
        os.close(probe)
        limit = probe + Acceptor.RESERVE
    acc.limit = limit
    c = socket.create_connection(sock.getsockname())
    try:
        deadline = time.monotonic() + 5
        got = []
        while not got and acc.at_limit is None and time.monotonic() < deadline:
            got = acc.accept(acc.listeners[0], time.monotonic())
        assert len(got) == accepted
        assert (acc.at_limit is not None) == (not accepted)
        for conn in got:
            conn.close()
    finally:
        c.close()
        sock.close()


class _Counting:
    """A selector that records the timeout of every select (0: a poll)."""

    def __init__(self, sel):
        self.sel, self.timeouts = sel, []

    def select(self, timeout):
        self.timeouts.append(timeout)
        return self.sel.select(timeout)

    def __getattr__(self, name):
        return getattr(self.sel, name)


def test_a_wait_polls_before_it_sleeps_only_while_the_last_wait_was_short(monkeypatch):
    import selectors

    monkeypatch.setattr(server, "SPIN", 0.5)  # wide, so a loaded machine does not blur short and long
    watch = server.Watcher()
    counting = watch.sel = _Counting(watch.sel)
    a, b = socket.socketpair()
    try:
        watch.set(a, selectors.EVENT_READ, "a")
        b.send(b"x")
        assert watch.select(None) and counting.timeouts == [None]  # no spin yet: one plain wait
        assert watch.spin  # it was short
        a.recv(10)
        counting.timeouts.clear()
        b.send(b"y")
        assert watch.select(None) and counting.timeouts == [0]  # polled first, found it, never slept
        a.recv(10)
        counting.timeouts.clear()
        started = time.monotonic()
        assert watch.select(0.7) == []  # nothing comes: it polls for the spin, then sleeps the rest
        assert 0.65 < time.monotonic() - started < 5
        assert set(counting.timeouts[:-1]) == {0} and counting.timeouts[-1] == pytest.approx(0.2)
        assert not watch.spin  # that wait was long: the next one does not poll
        counting.timeouts.clear()
        b.send(b"z")
        assert watch.select(None) and counting.timeouts == [None]
        counting.timeouts.clear()
        watch.select(0)
        assert counting.timeouts == [0]  # a poll asked for is a poll, and says nothing of the next wait
    finally:
        watch.close()
        a.close()
        b.close()
