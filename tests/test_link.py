"""A room across several servers, linked through NATS JetStream (`serve --room --link`,
chatlog/link.py): real `nats-server -js` processes on free loopback ports with their own storage,
real chatlog servers, raw socket clients on each. Every client sees every line in one order,
every archive holds the same lines in the same order, and the faults (a server killed with -9, the
broker restarted, the broker gone) lose and duplicate nothing."""
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from contextlib import contextmanager

import pytest

from chatlog.words import NOTICES
from conftest import ServerProc, db_rows, run_chatlog, wait_until

NATS = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")  # (Debian: sbin)
NO_NATS = "nats-server is not installed (Debian: apt-get install nats-server; .ci/run installs it)"


def free_ports(n: int) -> list[int]:
    """N distinct free ports: every socket is held until all are bound (a port released and
    asked for again can come back: two cluster nodes were once given the same one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


class Broker:
    """A real `nats-server -js` on loopback, its storage in a directory of its own; it can be
    stopped and started again on the same port and storage."""

    def __init__(self, store, port=None, args=()):
        if NATS is None:
            pytest.skip(NO_NATS)
        self.port = port or free_port()
        self.store = store
        self.args = list(args)
        self.proc = None
        self.start()

    @property
    def url(self):
        return f"nats://127.0.0.1:{self.port}"

    def start(self):
        self.log = open(f"{self.store}.log", "ab")
        self.proc = subprocess.Popen([NATS, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store), *self.args],
                                     stdout=self.log, stderr=subprocess.STDOUT)

        def up():
            assert self.proc.poll() is None, "nats-server exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(up)

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "nats")
    yield b
    b.stop()


@pytest.fixture
def linked(tmp_path, broker):
    """Factory: linked(name) -> a chatlog room server linked through the broker, its database
    tmp_path/NAME.db, up and linked (its console says so)."""
    servers = []

    def start(name, *args, room="lab", wait=True, url=None):
        s = ServerProc(tmp_path / f"{name}.db", "--room", "--name", room, "--link", url or broker.url, *args)
        servers.append(s)
        if wait:
            s.wait_for(r"^linked to nats://")
        return s

    yield start
    for s in servers:
        s.stop()


@contextlib.contextmanager
def broker_with(tmp_path, conf: str):
    """A broker of its own with this configuration (its limits), stopped after."""
    path = tmp_path / "limits.conf"
    path.write_text(conf)
    b = Broker(tmp_path / "limited", args=["-c", str(path)])
    try:
        yield b
    finally:
        b.stop()


def alice_and_bob(linked, url, *args):
    """Servers a and b linked through `url`, alice on a and bob on b, each heard by the other."""
    a, b = linked("a", *args, url=url), linked("b", *args, url=url)
    alice, bob = Peer(a, "alice"), Peer(b, "bob")
    alice.until(b"*** bob joined\n")
    return a, b, alice, bob


class Cut:
    """A real TCP relay on loopback between one server and the broker, that can cut that
    server off (every connection closed, none taken) while the others keep the broker, or hold
    what the server sends (`hold`: kept, and seen, not passed on) until `release`."""

    def __init__(self, port):
        import threading

        self.port, self.listen_port = port, free_port()
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self.threading = threading
        self.holding = False
        self.held: list[tuple[socket.socket, bytes]] = []
        self.orphans: list[socket.socket] = []  # the server gone, what it sent still held
        self.open()

    @property
    def url(self):
        return f"nats://127.0.0.1:{self.listen_port}"

    def open(self):
        self.server = socket.create_server(("127.0.0.1", self.listen_port), reuse_port=False)
        self.threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _accept(self, server):
        while True:
            try:
                conn, _ = server.accept()
                up = socket.create_connection(("127.0.0.1", self.port))
            except OSError:
                return
            with self.lock:
                self.socks += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                self.threading.Thread(target=self._pump, args=(a, b, b is up), daemon=True).start()

    def _pump(self, a, b, upward):
        try:
            while data := a.recv(65536):
                with self.lock:
                    if upward and self.holding:
                        self.held.append((b, data))
                        continue
                b.sendall(data)
        except OSError:
            pass
        # A connection to the broker with something held for it stays open (either direction may
        # end first): what is held goes when released, and then its end (`release`).
        with self.lock:
            waiting = {id(up) for up, _ in self.held}
            self.orphans += [x for x in (a, b) if id(x) in waiting and x not in self.orphans]
        for x in (a, b):
            if id(x) in waiting:
                continue
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def hold(self):
        with self.lock:
            self.holding = True

    def seen(self) -> bytes:
        """What the server sent since `hold`."""
        with self.lock:
            return b"".join(data for _, data in self.held)

    def release(self):
        # All under the lock: a pump ending meanwhile (its server gone) must still see what is
        # held for its broker connection, or it shuts that connection while this sends on it
        # (BrokenPipeError); and a pump's new bytes must not overtake the held ones.
        with self.lock:
            for up, data in self.held:
                up.sendall(data)
            self.holding, self.held = False, []
            orphans, self.orphans = self.orphans, []
        for up in orphans:
            try:
                up.shutdown(socket.SHUT_WR)  # (the broker reads what came, then the end)
            except OSError:  # (ENOTCONN: the pump the other way shut it first, as the broker answered)
                pass

    def cut(self):
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # (wakes the accept: a close alone may not)
        except OSError:
            pass
        self.server.close()
        with self.lock:
            socks, self.socks = self.socks, []
        for x in socks:
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            x.close()


class Peer:
    """A raw client: what it has received, read as it is waited for."""

    def __init__(self, server, handle=None):
        self.sock = server.connect()
        self.buf = b""
        self.until(b"Type at any time.\n")
        if handle:
            self.send(f"{handle}>\\join")

    def send(self, line: str):
        self.sock.sendall(line.encode() + b"\n")

    def pump(self, timeout: float) -> None:
        """What arrives within `timeout` (one read at most)."""
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return
        if not chunk:
            raise AssertionError(f"closed; got {self.buf[-2000:]!r}")
        self.buf += chunk

    def until(self, needle: bytes, timeout=10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.buf:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not received; got {self.buf[-2000:]!r}")
            self.pump(0.5)
        return self.buf

    def poll(self) -> bool:
        """Take what has arrived, without waiting; False (so it can be waited on)."""
        self.sock.settimeout(0.05)
        try:
            chunk = self.sock.recv(65536)
            self.buf += chunk
        except socket.timeout:
            pass
        return False

    def lines(self):
        return self.buf.decode().splitlines()

    def close(self):
        self.sock.close()


def said_until_heard(sender, line: str, listener, timeout=60.0):
    """`line` said until `listener` hears it. A cluster that has just got its quorum back may
    not take a line for some seconds (its returning node catches up before the stream confirms
    a write), or its server may find it cannot follow the stream just as the line is said: the
    sender is told it was not relayed, as anyone would be, and says it again, for as long as
    `timeout` allows (each refusal takes the broker's few seconds to confirm, and a cluster on a
    loaded machine may take half a minute to lead the stream again)."""

    def refused():
        return sender.buf.count(b"The broker did not take your line") + sender.buf.count(b"what you say now is not relayed")

    heard = line.encode() + b"\n"
    deadline = time.monotonic() + timeout
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        sender.pump(0.05)  # what the sender was told so far
        # (and, like a person, not while told the link is down, until told it is back)
        while sender.buf.rfind(b"link to the room's other servers is down") > sender.buf.rfind(b"relayed again"):
            if time.monotonic() > deadline:
                raise AssertionError(f"the link never came back; got {sender.buf[-2000:]!r}")
            sender.pump(0.2)
        told = refused()
        sender.send(line)
        while refused() == told:
            if time.monotonic() > deadline:
                raise AssertionError(f"{heard!r} not received; got {listener.buf[-2000:]!r}")
            listener.pump(0.2)
            if heard in listener.buf:
                return
            sender.pump(0.05)
    raise AssertionError(f"{line!r} refused {tries} times in {timeout:.0f} s")


def rows(db, where="stream_seq IS NOT NULL"):
    """The linked lines of an archive, in its transcripts' order."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            f"SELECT origin_server, origin_id, stream_seq, sender, handle, text, note FROM messages WHERE {where} "
            "ORDER BY session_id, seq"
        ).fetchall()
    finally:
        conn.close()


def last_seq(db):
    """How far the room's stream is committed in `db` (its lone lines carry their sequence)."""
    from chatlog.recorder import stream_position

    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT room FROM room_links").fetchone()
        return stream_position(conn, row[0]) if row else 0
    finally:
        conn.close()


def settled(*dbs):
    """Every archive has committed the same stream, as far as the first has."""
    target = wait_until(lambda: last_seq(dbs[0]))
    wait_until(lambda: all(last_seq(db) == last_seq(dbs[0]) for db in dbs) and last_seq(dbs[0]) >= target)
    return last_seq(dbs[0])


def assert_same_archives(*dbs):
    """The archives hold the same stream, as far as all have committed it (a message the stream
    brings meanwhile, such as a gone server's people leaving, is not yet in all of them)."""
    upto = min(last_seq(db) for db in dbs)
    first = rows(dbs[0], f"stream_seq IS NOT NULL AND stream_seq <= {upto}")
    seqs = [r[2] for r in first]
    assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), "a gap in the stream"
    assert len({(r[0], r[1]) for r in first}) == len(first), "a line recorded twice"
    for db in dbs[1:]:
        assert rows(db, f"stream_seq IS NOT NULL AND stream_seq <= {upto}") == first


# -- one room over three servers -----------------------------------------------------------------


def test_three_servers_one_room_one_order(tmp_path, linked):
    servers = [linked(n) for n in "abc"]
    peers = [Peer(s, h) for s, h in zip(servers, ["alice", "bob", "carol"], strict=True)]
    for p, other in ((peers[0], "bob"), (peers[0], "carol"), (peers[1], "carol")):
        p.until(f"*** {other} joined\n".encode())
    n = 15
    for i in range(n):  # interleaved as fast as they can: the stream decides one order
        for p, h in zip(peers, ["alice", "bob", "carol"], strict=True):
            p.send(f"{h}>line {i} from {h}")
    for p, me in zip(peers, ["alice", "bob", "carol"], strict=True):
        for h in {"alice", "bob", "carol"} - {me}:
            p.until(f"{h}>line {n - 1} from {h}\n".encode())
    dbs = [tmp_path / f"{x}.db" for x in "abc"]
    settled(*dbs)
    assert_same_archives(*dbs)
    order = [(h, t) for _, _, _, sender, h, t, _ in rows(dbs[0]) if sender == "client"]
    assert len(order) == 3 * n
    for p, me in zip(peers, ["alice", "bob", "carol"], strict=True):
        seen = [tuple(line.split(">", 1)) for line in p.lines() if re.match(r"(alice|bob|carol)>line", line)]
        assert seen == [(h, t) for h, t in order if h != me]  # every line, in the stream's order
    # Each archive's history is the room's, whichever server said it.
    for db in dbs:
        r = run_chatlog(db, "search", "-c", "line 14 from carol")
        assert r.exit_code == 0 and r.output.strip() == "1"


def test_forget_removes_a_persons_lines_from_every_servers_archive(tmp_path, linked):
    """Each archive holds the whole room, so each can forget a person: on the server they were
    not connected to, their lines are found by the name they were said under."""
    a, b = linked("a"), linked("b")
    alice = Peer(a, "alice")
    b.wait_for(r"^alice joined \(on ")
    bob = Peer(b, "bob")
    alice.until(b"*** bob joined\n")
    alice.send("alice>my secret")
    alice.send("alice>another")
    bob.until(b"alice>another\n")
    bob.send("bob>kept")
    alice.until(b"bob>kept\n")
    alice.send("ally>my new name")
    bob.until(b"ally>my new name\n")
    settled(tmp_path / "a.db", tmp_path / "b.db")
    for db in (tmp_path / "a.db", tmp_path / "b.db"):
        for name in ("alice", "bob", "ally"):  # (all took part in the room, wherever they were connected)
            r = run_chatlog(db, "sessions", "--handle", name, "--json")
            assert r.exit_code == 0 and [s["kind"] for s in json.loads(r.output)] == ["room"], r.output
        # a later name finds what was said under it; the person's name, everything they said
        r = run_chatlog(db, "forget", "--handle", "ally")
        assert r.exit_code == 0 and "removed 1 message from ally" in r.output, (db.name, r.output)
        r = run_chatlog(db, "forget", "--handle", "alice")
        assert r.exit_code == 0 and "removed 2 messages from alice" in r.output, r.output
        said = [(h, t) for _, _, _, sender, h, t, _ in rows(db) if sender == "client"]
        assert said == [("alice", ""), ("alice", ""), ("bob", "kept"), ("ally", "")]
        r = run_chatlog(db, "search", "-c", "secret")
        assert r.exit_code == 0 and r.output.strip() == "0"
        if db.name == "a.db":  # forgotten on a alone: a merge keeps it forgotten, whatever it met first
            out = tmp_path / "all.db"
            r = run_chatlog(None, "merge", str(tmp_path / "b.db"), str(tmp_path / "a.db"), "-o", str(out))
            assert r.exit_code == 0, r.output
            said = [(h, t) for _, _, _, sender, h, t, _ in rows(out) if sender == "client"]
            assert said == [("alice", ""), ("alice", ""), ("bob", "kept"), ("ally", "")]
            assert run_chatlog(out, "search", "-c", "secret").output.strip() == "0"
            assert db_one(out, "SELECT count(*) FROM messages WHERE removed_at IS NOT NULL")[0] == 3
    # A client address is known only where the person was connected.
    r = run_chatlog(tmp_path / "b.db", "forget", "--handle", "bob", "--host", "127.0.0.1", "--dry-run")
    assert "would remove 1 message from bob at 127.0.0.1" in r.output


def test_who_lists_everyone_and_kick_works_across_servers(tmp_path, linked):
    a, b = linked("a"), linked("b")
    alice = Peer(a, "alice")
    b.wait_for(r"^alice joined \(on ")  # (else alice's join may reach b before bob is there to hear it)
    bob = Peer(b, "bob")
    alice.until(b"*** bob joined\n")

    def who_lists_alice():
        bob.send("bob>\\who")
        try:
            bob.until(b"alice (on ", timeout=1)
            return True
        except AssertionError:
            return False

    wait_until(who_lists_alice)
    assert re.search(r"\*\*\* 2 here: bob, alice \(on [^)]+:%d\)" % a.port, bob.buf.decode())
    b.say("\\who")
    b.wait_for(r"^  alice +127\.0\.0\.1:\d+ +on .*:%d$" % a.port)
    # The operator of b kicks alice, who is on a: a carries it out, everyone hears it.
    b.say("\\kick alice")
    b.wait_for(r"asked .* to kick alice")
    alice.until(b"\\quit\n")
    assert b"You were removed from the room" in alice.buf or b"removed" in alice.buf
    bob.until(b"*** alice left\n")
    settled(tmp_path / "a.db", tmp_path / "b.db")
    assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
    assert ("event", "alice", "left", "kicked") in [r[3:] for r in rows(tmp_path / "b.db")]


def test_a_newcomer_is_shown_the_room_history_said_on_every_server(tmp_path, linked):
    a, b = linked("a", "--history", "5"), linked("b", "--history", "5")
    alice = Peer(a, "alice")
    alice.send("alice>said on a")
    b.wait_for(r"alice>said on a")
    s = b.connect()
    got = b""
    s.settimeout(10)
    while b"End of history" not in got:
        got += s.recv(65536)
    assert re.search(rb"\[\d\d:\d\d\] alice>said on a\n", got)
    s.close()


def test_one_new_name_claimed_on_two_servers_at_the_same_instant_ends_with_one_holder(tmp_path, linked):
    """Two people take one new name at once, one on each server: before, both were accepted
    (each server checked against the other's list, which had not come yet). Now exactly one
    keeps it, the same one on both servers, and the other is told to choose another."""
    a, b = linked("a"), linked("b")
    watcher = Peer(b, "watcher")
    a.wait_for(r"^watcher joined \(on ")
    for trial in range(4):
        name = f"zed{trial}"
        x, y = Peer(a), Peer(b)
        x.send(f"{name}>\\join")
        y.send(f"{name}>\\join")
        wait_until(lambda x=x, y=y: x.poll() or y.poll() or (b"choose another" in x.buf + y.buf))
        settled(tmp_path / "a.db", tmp_path / "b.db")
        x.poll(), y.poll()
        assert sorted([x.buf.count(b"choose another"), y.buf.count(b"choose another")]) == [0, 1], (x.buf, y.buf)
        # Both servers agree who has it: \who lists it once, on the server that kept it.
        keeper, loser = (a, b) if b"choose another" in y.buf else (b, a)
        for s in (a, b):
            listed = r"^  %s +127\.0\.0\.1:\d+ +%s" % (name, "idle" if s is keeper else "on ")
            wait_until(lambda s=s, listed=listed: s.say("\\who") or s.count(listed), interval=0.2)
            assert s.count(rf"^  {name} ") == s.count(listed)  # (never the other way)
        # Either both took it and the later claim gave it up, or the first claim had already
        # come when the second was made, and the second was refused there and then.
        loser.wait_for(rf"^(?:{name} \(127\.0\.0\.1:\d+\) gave up the name: it was taken first on "
                       rf"|127\.0\.0\.1:\d+: the handle {name} is taken by someone here)")
        if loser.count(rf"^{name} \(127\.0\.0\.1:\d+\) gave up the name"):
            keeper.wait_for(rf"^{name} left: the name was taken first on .* \(on ")
        x.close(), y.close()
        for s in (a, b):  # the keeper's leaving reaches both records before the next trial
            s.wait_for(rf"^{name} (?:\(127\.0\.0\.1:\d+\) )?left: disconnected ")
    settled(tmp_path / "a.db", tmp_path / "b.db")
    assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
    watcher.close()


# -- faults --------------------------------------------------------------------------------------


def test_server_killed_and_restarted_resumes_without_gap_or_duplicate(tmp_path, linked):
    a, b = linked("a"), linked("b")
    alice, bob = Peer(a, "alice"), Peer(b, "bob")
    alice.until(b"*** bob joined\n")
    for i in range(10):
        alice.send(f"alice>before {i}")
    bob.until(b"alice>before 9\n")
    b.proc.send_signal(signal.SIGKILL)
    b.wait()
    for i in range(10):  # said while b is away: b's archive must have them all the same
        alice.send(f"alice>while away {i}")
    settled(tmp_path / "a.db")
    b2 = linked("b", wait=False)  # the same database: resumes from its last committed sequence
    carol = Peer(b2)  # (connected at once: had the backlog been relayed, carol would hear it)
    b2.wait_for(r"^linked to nats://")
    wait_until(lambda: last_seq(tmp_path / "b.db") == last_seq(tmp_path / "a.db"))
    carol.send("carol>\\join")
    alice.until(b"*** carol joined\n")
    alice.send("alice>after")
    carol.until(b"alice>after\n")
    settled(tmp_path / "a.db", tmp_path / "b.db")
    assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
    texts = [r[5] for r in rows(tmp_path / "b.db")]
    assert [t for t in texts if "away" in t] == [f"while away {i}" for i in range(10)]
    assert b"while away" not in carol.buf  # the backlog is recorded, not relayed as if said now


def test_a_killed_servers_people_leave_on_every_record_once(tmp_path, linked):
    """A server killed with -9 says nothing more: its people stayed in the room on every other
    server's record for good (and in \\who until it went stale). The servers that notice say
    they left, each under the same id, so the stream keeps one; every archive agrees, the
    killed server's too when it comes back."""
    a, b, c = linked("a"), linked("b"), linked("c")
    alice, bob, carol = Peer(a, "alice"), Peer(b, "bob"), Peer(c, "carol")
    for s, other in ((b, "alice"), (c, "alice"), (b, "carol")):  # (the consoles: a client may come after)
        s.wait_for(rf"^{other} joined \(on ")
    alice.send("alice>last words")
    carol.until(b"alice>last words\n")
    a.proc.send_signal(signal.SIGKILL)
    a.wait()
    for p in (bob, carol):
        p.until(b"*** alice left: their server stopped answering\n", timeout=30)
    for s in (b, c):
        s.wait_for(r"^alice left: their server stopped answering \(on ")
    settled(tmp_path / "b.db", tmp_path / "c.db")
    gone = [r for r in rows(tmp_path / "b.db") if r[4] == "alice" and r[5] == "left"]
    assert [(r[3], r[6]) for r in gone] == [("event", "server-gone")]  # said by both, kept once
    assert_same_archives(tmp_path / "b.db", tmp_path / "c.db")
    a2 = linked("a", wait=False)  # back: it records its people's leaving as the others did
    a2.wait_for(r"^linked to nats://")
    wait_until(lambda: last_seq(tmp_path / "a.db") == last_seq(tmp_path / "b.db"))
    settled(tmp_path / "a.db", tmp_path / "b.db", tmp_path / "c.db")
    assert_same_archives(tmp_path / "a.db", tmp_path / "b.db", tmp_path / "c.db")
    assert b"alice left" not in bob.buf[bob.buf.index(b"stopped answering"):]  # said once


def test_people_on_a_server_cut_off_for_a_while_are_back_on_every_record(tmp_path, broker, linked):
    """Cut off from the broker, a server looks gone to the others, who say its people left;
    when its link returns, those still on it join every record again, and the archives agree."""
    relay = Cut(broker.port)
    a, b = linked("a", url=relay.url), linked("b")
    alice, bob = Peer(a, "alice"), Peer(b, "bob")
    b.wait_for(r"^alice joined \(on ")  # (its console: bob may come after)
    for time_ in (1, 2):  # twice: the second leaving is one of its own, not the first again
        relay.cut()
        alice.until(b"is down", timeout=15)
        bob.buf = bob.buf.replace(b"stopped answering", b"(seen)").replace(b"is back", b"(seen)")
        bob.until(b"*** alice left: their server stopped answering\n", timeout=30)
        relay.open()
        bob.until(b"*** alice is back\n", timeout=30)
        alice.send(f"alice>still here {time_}")
        bob.until(f"alice>still here {time_}\n".encode())
        alice.buf = b""
    wait_until(lambda: a.count(r"^alice \(127\.0\.0\.1:\d+\) is back on the other servers") == 2)
    settled(tmp_path / "a.db", tmp_path / "b.db")
    assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
    said = [(r[5], r[6]) for r in rows(tmp_path / "a.db") if r[4] == "alice" and r[3] == "event"]
    assert said == [("joined", None)] + [("left", "server-gone"), ("joined", "back")] * 2
    # alice is one participant on each record, there still (b took her for gone, then back)
    for db in (tmp_path / "a.db", tmp_path / "b.db"):
        assert db_rows(db, "SELECT handle, left_at FROM participants ORDER BY handle") == [("alice", None), ("bob", None)], db
    relay.cut()


def test_a_server_stopped_for_a_while_is_gone_then_back_and_takes_nobody_else_for_gone(tmp_path, linked):
    """SIGSTOP: the others say its people left, and when it goes on it brings them back. What
    it finds waiting when it wakes (the others' lists, heard long ago by the clock) is taken
    before any silence is judged: it says nobody else left."""
    a, b = linked("a"), linked("b")
    alice, bob = Peer(a, "alice"), Peer(b, "bob")
    b.wait_for(r"^alice joined \(on ")
    a.proc.send_signal(signal.SIGSTOP)
    try:
        bob.until(b"*** alice left: their server stopped answering\n", timeout=30)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    bob.until(b"*** alice is back\n", timeout=30)
    alice.send("alice>woke up")
    bob.until(b"alice>woke up\n")
    bob.send("bob>hello alice")
    alice.until(b"bob>hello alice\n")
    wait_until(lambda: a.count(r"is back on the other servers") == 1)
    settled(tmp_path / "a.db", tmp_path / "b.db")
    assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
    said = [(r[4], r[5], r[6]) for r in rows(tmp_path / "b.db") if r[3] == "event"]
    assert [x for x in said if x[0] == "alice"] == [("alice", "joined", None), ("alice", "left", "server-gone"),
                                                    ("alice", "joined", "back")]
    assert [x for x in said if x[0] == "bob"] == [("bob", "joined", None)]  # never taken for gone
    assert a.count(r"left: their server stopped answering") == 0 and b"stopped answering" not in alice.buf


def test_clients_at_the_open_files_limit_leave_room_for_the_broker(tmp_path, broker):
    """With the open-files limit reached by clients, the broker restarted: the server links again
    while they are all still there. (It took every descriptor for clients, so the link's new
    socket failed, silently, until some of them left.)"""
    import resource

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    s = ServerProc(tmp_path / "a.db", "--room", "--name", "lab", "--link", broker.url, "--per-address", "100",
                   preexec_fn=low_limit)
    socks = []
    try:
        s.wait_for(r"^linked to nats://")
        for i in range(80):
            c = socket.create_connection(("127.0.0.1", s.port))
            c.sendall(b"u%d\n" % i)
            socks.append(c)
        s.wait_for("cannot accept connections")
        broker.stop()
        s.wait_for("lost the broker")
        broker.start()
        s.wait_for(r"^linked to nats://\S+ again", timeout=20)
        assert s.count("accepting connections again") == 0  # (nobody had left)
    finally:
        for c in socks:
            c.close()
        s.stop()


def test_a_broker_stopped_for_a_while_takes_nobody_for_gone_and_the_archives_agree(tmp_path, broker, linked):
    """The broker stopped (SIGSTOP) for 10 s, a line said on each server meanwhile. When it went
    on, a server heard its own announcements back before the other's and took the other's
    people for gone, then back; and a line kept here unconfirmed that the broker had stored
    after the other's stood before it in this archive alone (a probe). Meanwhile each server
    says it cannot follow the stream, and that it follows it again after."""
    a, b = linked("a"), linked("b")
    alice, bob = Peer(a, "alice"), Peer(b, "bob")
    alice.until(b"*** bob joined\n")
    # (b has alice too; bob hears of her joining only if it reached b after he did: if it came
    # first, his welcome counted her)
    b.wait_for(r"^alice joined \(on ")
    broker.proc.send_signal(signal.SIGSTOP)
    stalled = time.monotonic()
    cannot = r"^cannot follow the room's stream CHATLOG_lab: nats: timeout; retrying"
    try:
        alice.send("alice>said in the stall")
        bob.send("bob>said in the stall too")
        # Still connected (the stall is shorter than the client's pings allow), each server says
        # its look at the stream went unanswered: it said nothing at all before.
        for s in (a, b):
            s.wait_for(cannot, timeout=15)
        # the stall itself is what is tested: the broker's silence for this long
        wait_until(lambda: time.monotonic() >= stalled + 10, timeout=15)
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    for s in (a, b):
        s.wait_for(r"^following the stream CHATLOG_lab again from sequence \d+", timeout=30)
    alice.send("alice>after")
    bob.until(b"alice>after\n", timeout=30)
    bob.send("bob>after")
    alice.until(b"bob>after\n", timeout=30)
    settled(tmp_path / "a.db", tmp_path / "b.db")
    assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
    for db in ("a.db", "b.db"):
        assert not [r for r in rows(tmp_path / db) if r[6] == "server-gone" or r[6] == "back"]
    assert b"stopped answering" not in alice.buf and b"stopped answering" not in bob.buf
    for s in (a, b):
        assert s.count(r"stopped answering|is back on the other servers") == 0


def test_a_broker_whose_store_is_full_refuses_lines_that_are_kept_told_and_said_why(tmp_path, linked):
    """The broker's JetStream store full: what it refuses is kept on its own server, marked with
    why, its sender told; the console says why, a few times, not once a line; what it took is
    on both archives alike."""
    with broker_with(tmp_path, "jetstream { max_file_store: 1MB, max_memory_store: 1MB }\n") as small:
        a, b, alice, _bob = alice_and_bob(linked, small.url, "--rate", "0")
        n = 1500  # 1.4 MB of lines
        for k in range(0, n, 100):
            alice.sock.sendall(b"".join(b"alice>%s %d\n" % (b"x" * 900, i) for i in range(k, k + 100)))
        alice.until(b"The broker did not take your line", timeout=30)

        def held():
            conn = sqlite3.connect(tmp_path / "a.db")
            try:
                return conn.execute("SELECT count(*) FROM messages WHERE text LIKE 'xxx%'").fetchone()[0]
            finally:
                conn.close()

        wait_until(lambda: held() == n, timeout=60)
        settled(tmp_path / "a.db", tmp_path / "b.db")
        assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
        relayed = rows(tmp_path / "b.db", "text LIKE 'xxx%'")
        kept = rows(tmp_path / "a.db", "text LIKE 'xxx%' AND stream_seq IS NULL")
        assert relayed and kept and len(relayed) + len(kept) == n
        assert {r[6] for r in kept} == {"longer than 500 characters; not relayed: the broker did not take it "
                                         "(insufficient resources)"}
        said = a.count(r"^the broker did not take .*\(insufficient resources\)")
        assert 1 <= said <= 4, said


@pytest.mark.parametrize("line", [b"y" * 40, b"\x01z" * 245, b"q\x02" * 4000], ids=["plain", "control", "cut"])
def test_a_burst_fits_a_broker_that_takes_small_messages(tmp_path, linked, line):
    """A broker whose max_payload is 64 KB (NATS's default is 1 MB): a burst's publications were
    batched up to 256 KB, and one read's lines made one publication of ~200 KB, so the broker
    refused all but a few and 1,751 of 2,000 lines were kept here alone, not relayed (a probe).
    Now the stream messages keep to the broker's size, and a read that would weigh more is
    published in pieces: every line reaches the other server, in order."""
    with broker_with(tmp_path, "max_payload: 65536\n") as small:
        a, b, alice, _bob = alice_and_bob(linked, small.url, "--rate", "0")
        n = 600
        alice.sock.settimeout(60)  # (the server takes a burst a pass at a time)
        alice.sock.sendall(b"".join(b"alice>%s %d\n" % (line, i) for i in range(n)))
        mine = "handle = 'alice' AND sender = 'client'"
        wait_until(lambda: len(rows(tmp_path / "b.db", mine)) == n, timeout=60)
        settled(tmp_path / "a.db", tmp_path / "b.db")
        assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
        got = [r[5] for r in rows(tmp_path / "b.db", mine)]
        assert [int(t.rsplit(" ", 1)[1]) for t in got] == list(range(n))
        assert not rows(tmp_path / "a.db", f"{mine} AND stream_seq IS NULL")
        assert a.count("did not take") == 0


def test_what_is_not_a_chatlog_servers_on_the_broker_is_skipped_and_every_server_goes_on(tmp_path, broker, linked):
    """Anyone who may publish on the broker (a buggy or hostile client) put into the room's
    stream a line whose time was 1e308: every linked server died on it (OverflowError making its
    date), and died again on it at every restart (a probe). A NaN time, a note that is an object,
    JSON nested past the parser's depth, an `Infinity` where a number goes, and a list of who is
    on a server with an address that is an object (\\who then failed) or holds escapes: each is
    skipped, or shown made visible, and the servers go on."""
    import asyncio

    import nats

    a, b = linked("a"), linked("b")
    alice, bob = Peer(a, "alice"), Peer(b, "bob")
    alice.until(b"*** bob joined\n")
    ours = {"Chatlog-Origin": "evil", "Chatlog-Run": "1", "Chatlog-Server": "evil:1"}
    bad = [b'[[1, {"c": [{"k": 1, "s": "client", "h": "eve", "L": [["hi", 1e308]], "v": 1}], "w": [], "b": []}]]',
           b'[[1, {"c": [{"k": 1, "s": "client", "h": "eve", "t": "x", "r": null, "n": null, "at": 1e308, "v": 0}], '
           b'"w": [], "b": []}]]',
           b'[[1, {"c": [{"k": 1, "s": "client", "h": "eve", "t": "x", "r": null, "n": null, "at": NaN, "v": 0}], '
           b'"w": [], "b": []}]]',
           b'[[1, {"c": [{"k": 1, "s": "client", "h": "eve", "t": "x", "r": null, "n": {"a": 1}, "at": 5, "v": 0}], '
           b'"w": [], "b": []}]]',
           b"[" * 100000 + b"]" * 100000,
           b"[[Infinity, {}]]"]
    # and a well-formed line whose relayed bytes carry escapes (a server's own are made visible)
    cast = (b'[[1, {"c": [{"k": 1, "s": "client", "h": "eve", "t": "hi", "r": null, "n": null, "at": 5, "v": 0}], '
            b'"w": [], "b": [["eve>hi \\u001b[2J\\u0007\\n", null]]}]]')

    # and one in server a's name (its identity is in every header it publishes) with a connection
    # that is not one: a took it for its own and failed looking the connection up
    conn = sqlite3.connect(tmp_path / "a.db")
    uid, run = conn.execute("SELECT (SELECT uid FROM node), (SELECT max(id) FROM servers)").fetchone()
    conn.close()
    spoof = (b'[[999, {"c": [{"k": [1], "s": "client", "h": "alice", "t": "x", "r": null, "n": null, "at": 5, '
             b'"v": 0}], "w": [], "b": []}]]')

    async def publish():
        nc = await nats.connect(broker.url)
        js = nc.jetstream()
        for i, data in enumerate([*bad, cast]):
            await js.publish("chatlog.room.lab", data, headers=dict(ours, **{"Nats-Msg-Id": f"evil.{i}"}))
        await js.publish("chatlog.room.lab", spoof, headers={"Chatlog-Origin": uid, "Chatlog-Run": str(run),
                                                              "Chatlog-Server": "a:1", "Nats-Msg-Id": "evil.a"})
        await nc.publish("chatlog.who.lab", b'{"s": "mal", "l": "m\\u001b]0;x\\u0007:1", "r": "1", "p": '
                         b'[[1, "mallory", {"x": 1}], [2, "eve", "\\u001b[2J10.0.0.1:1"]]}')
        await nc.publish("chatlog.kick.lab", b'{"server": 1, "conn": Infinity}')
        await nc.flush()
        await nc.close()

    asyncio.run(publish())
    for server in (a, b):
        wait_until(lambda s=server: s.count(r"^stream message \d+ from evil:1 is not a chatlog line; skipped$")
                   == len(bad))
    a.wait_for(r"^stream message \d+ from a:1 is not a chatlog line; skipped$")
    def listed():  # (the list of who is on that server is heard; until then \\who does not show it)
        start = len(a.lines)
        a.say("\\who")
        a.wait_for(r"^  alice ", start=start)
        return next((x for x in a.lines[start:] if x and x.startswith("  eve ")), None)

    line = wait_until(listed)
    assert line.split() == ["eve", "\\x1b[2J10.0.0.1:1", "on", "m\\x1b]0;x\\x07:1"]
    assert "\x1b" not in a.output and "mallory" not in a.output
    bob.until(b"eve>hi \\x1b[2J\\x07\n")
    assert b"\x1b" not in bob.buf and b"\x07" not in bob.buf
    alice.send("alice>still here")
    bob.until(b"alice>still here\n")
    bob.send("bob>so am I")
    alice.until(b"bob>so am I\n")
    assert a.proc.poll() is None and b.proc.poll() is None


def test_a_broker_that_will_not_make_the_stream_is_said_so_not_taken_for_unreachable(tmp_path, linked):
    """--link-replicas 3 against a single broker: it refuses the stream ("replicas > 1 not
    supported in non-clustered mode"). The console said "cannot reach the broker", then "lost the
    broker; reconnecting" as the server itself closed its connection to try again."""
    s = linked("a", "--link-replicas", "3", wait=False)
    s.wait_for(r"^the broker nats://127\.0\.0\.1:\d+ refused the room's stream CHATLOG_lab: .*replicas > 1 not "
               r"supported in non-clustered mode.*; retrying$")
    wait_until(lambda: s.count(r"refused the room's stream") == 1 and "lost the broker" not in s.output
               and s.count(r"^linked to") == 0, timeout=3)
    time.sleep(1.5)  # (retries, RETRY_SECONDS apart, meanwhile: the same reason is not said again, nor else)
    assert s.count(r"refused the room's stream") == 1
    assert "lost the broker" not in s.output and "cannot reach" not in s.output


def test_a_broker_without_jetstream_is_said_so(tmp_path, linked):
    """A nats-server started without -js answers no JetStream request: the console said
    "ServiceUnavailableError: code=None err_code=None description='None'"."""
    if NATS is None:
        pytest.skip(NO_NATS)
    port = free_port()
    plain = subprocess.Popen([NATS, "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _listening(port))
        s = linked("a", wait=False, url=f"nats://127.0.0.1:{port}")
        s.wait_for(r"^the broker nats://127\.0\.0\.1:\d+ refused the room's stream CHATLOG_lab: it answers no "
                   r"JetStream request \(is JetStream on\? nats-server -js\); retrying$")
    finally:
        plain.terminate()
        plain.wait(10)


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("how", ["SIGTERM", "quit"])
def test_a_server_stopped_mid_burst_records_what_it_published_before_it_ends(tmp_path, broker, linked, how):
    """SIGTERM while alice's burst went out: server a published her lines and her leaving, but
    stopped before the stream brought them back, so b's archive held a thousand or two more of
    her lines than a's, and her leaving, until a was started again (a probe). Now a records what
    it published before it ends (2 s at most): the two archives hold the same. The same for the
    operator's \\quit."""
    a, b, alice, _bob = alice_and_bob(linked, broker.url, "--rate", "0")
    alice.sock.settimeout(30)
    alice.sock.sendall(b"".join(b"alice>burst %d\n" % i for i in range(30000)))
    a.wait_for(r"^alice>burst 2000$")  # (well into it)
    if how == "quit":
        a.say("\\quit")
    else:
        a.proc.send_signal(signal.SIGTERM)
    a.proc.wait(20)
    mine = "handle = 'alice' AND (text LIKE 'burst %' OR sender = 'event')"
    wait_until(lambda: rows(tmp_path / "b.db", "handle = 'alice' AND text = 'left'"))
    settled(tmp_path / "b.db")
    there, here = rows(tmp_path / "b.db", mine), rows(tmp_path / "a.db", mine)
    assert here == there and [r[5] for r in here[-1:]] == ["left"]
    assert len(here) > 2000


def test_what_a_stopping_server_published_unconfirmed_is_kept_and_placed_when_it_links_again(
        tmp_path, broker, linked):
    """The broker stalled (SIGSTOP in a probe; here a relay that holds what a sends) as server a
    stopped: the lines alice had just said were published, never confirmed, and recorded nowhere
    on a (had the broker lost them, nowhere at all). They are kept on a now, marked; when a
    links again and the broker has them after all, the stream brings them and each takes its
    place: once, as on b."""
    relay = Cut(broker.port)
    a, b = linked("a", "--rate", "0", url=relay.url), linked("b", "--rate", "0")
    alice, _bob = Peer(a, "alice"), Peer(b, "bob")
    alice.until(b"*** bob joined\n")
    relay.hold()  # (what a sends stops on its way to the broker: seen, never confirmed)
    alice.sock.sendall(b"".join(b"alice>stall %d\n" % i for i in range(50)))
    wait_until(lambda: b"stall 49" in relay.seen())
    a.proc.send_signal(signal.SIGTERM)
    a.proc.wait(30)
    relay.release()  # (the broker takes the publication after all)
    assert a.count(r"^\d+ messages the broker had not confirmed as the room ended: kept here alone") == 1, a.output
    stalled = "text LIKE 'stall %'"
    kept = rows(tmp_path / "a.db", stalled)
    assert len(kept) == 50 and {(r[2], r[6]) for r in kept} == {
        (None, "not relayed: the broker had not confirmed it when the server stopped")}
    linked("a", "--rate", "0", url=broker.url)
    wait_until(lambda: all(r[2] is not None for r in rows(tmp_path / "a.db", stalled)))
    settled(tmp_path / "a.db", tmp_path / "b.db")
    assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
    assert [r[5] for r in rows(tmp_path / "a.db", stalled)] == [f"stall {i}" for i in range(50)]


def test_broker_restarted_mid_room_loses_and_duplicates_nothing(tmp_path, broker, linked):
    a, b = linked("a"), linked("b")
    alice, bob = Peer(a, "alice"), Peer(b, "bob")
    alice.until(b"*** bob joined\n")
    for i in range(5):
        alice.send(f"alice>one {i}")
    bob.until(b"alice>one 4\n")
    broker.stop()
    alice.until(b"link to the room's other servers is down")
    bob.until(b"link to the room's other servers is down")
    broker.start()  # the same storage: the stream and its sequence are kept
    alice.until(b"lines are relayed again")
    bob.until(b"lines are relayed again")
    for i in range(5):
        bob.send(f"bob>two {i}")
    alice.until(b"bob>two 4\n")
    settled(tmp_path / "a.db", tmp_path / "b.db")
    assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
    texts = [r[5] for r in rows(tmp_path / "a.db") if r[3] == "client"]
    assert texts == [f"one {i}" for i in range(5)] + [f"two {i}" for i in range(5)]


def test_broker_gone_clients_told_lines_refused_and_kept_marked(tmp_path, broker, linked):
    a, b = linked("a"), linked("b")
    alice, bob = Peer(a, "alice"), Peer(b, "bob")
    alice.until(b"*** bob joined\n")
    broker.stop()
    alice.until(b"link to the room's other servers is down")
    a.wait_for("lost the broker")
    # why it cannot link again, said (once per reason) while it tries
    a.wait_for(r"^cannot reach the broker nats://127\.0\.0\.1:\d+: .*[Rr]efused.*; retrying")
    alice.send("alice>said while the broker is gone")
    alice.until(b"what you say now is not relayed", timeout=10)
    newcomer = Peer(a)  # one who joins meanwhile is told at once too
    newcomer.until(b"link to the room's other servers is down")
    kept = wait_until(lambda: rows(tmp_path / "a.db", "text = 'said while the broker is gone'"))
    assert kept[0][2] is None and "not relayed" in kept[0][6]  # recorded here alone, marked
    broker.start()
    alice.until(b"lines are relayed again")
    alice.send("alice>back")
    bob.until(b"alice>back\n")
    assert b"said while the broker is gone" not in bob.buf
    settled(tmp_path / "a.db", tmp_path / "b.db")
    assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
    # The room's history never shows a line that was not relayed.
    r = run_chatlog(tmp_path / "b.db", "search", "broker gone")
    assert "said while" not in r.output
    # Merged, the line a kept alone is in its place by time: after what was said before it.
    out = tmp_path / "all.db"
    assert run_chatlog(None, "merge", str(tmp_path / "a.db"), str(tmp_path / "b.db"), "-o", str(out)).exit_code == 0
    texts = [r[5] for r in rows(out, "1") if r[3] in ("client", "event")]
    assert texts.count("said while the broker is gone") == 1
    assert texts.index("joined") < texts.index("said while the broker is gone") < texts.index("back")


@pytest.mark.slow
def test_broker_gone_for_ten_seconds_then_the_room_is_whole_again(tmp_path, broker, linked):
    """The broker away for 10 s (the clients keep retrying all that time): what was said before
    is everywhere, what was said meanwhile is refused and marked, and the room carries on."""
    a, b = linked("a"), linked("b")
    alice, bob = Peer(a, "alice"), Peer(b, "bob")
    alice.until(b"*** bob joined\n")
    alice.send("alice>before")
    bob.until(b"alice>before\n")
    broker.stop()
    gone = time.monotonic()
    bob.until(b"link to the room's other servers is down")
    n = 0
    refused = b"what you say now is not relayed"
    while time.monotonic() - gone < 10:  # the outage itself: about a line a second, ten at most
        alice.send(f"alice>meanwhile {n}")
        n += 1
        wait_until(lambda want=n + 1: alice.buf.count(refused) >= want or alice.poll())
        time.sleep(max(0.0, min(1.0, gone + n - time.monotonic())))  # pacing, not waiting on anything
    broker.start()
    alice.until(b"lines are relayed again", timeout=20)
    bob.until(b"lines are relayed again", timeout=20)
    bob.send("bob>after ten seconds")
    alice.until(b"bob>after ten seconds\n")
    assert b"meanwhile" not in bob.buf
    settled(tmp_path / "a.db", tmp_path / "b.db")
    assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
    kept = rows(tmp_path / "a.db", "text LIKE 'meanwhile %'")
    assert len(kept) == n and all(r[2] is None and "not relayed" in r[6] for r in kept)


def _stream(url, what):
    """Delete the room's stream on the broker, or make it again (as someone could by hand)."""
    import asyncio

    import nats

    async def go():
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            if what == "delete":
                await js.delete_stream("CHATLOG_lab")
            else:
                await js.add_stream(name="CHATLOG_lab", subjects=["chatlog.room.lab"])
        finally:
            await nc.close()

    asyncio.run(go())


@pytest.mark.slow
def test_a_stream_deleted_or_made_again_is_not_followed_and_nothing_said_is_lost(tmp_path, broker, linked):
    """The room's stream deleted on the broker (by hand, or its storage lost): a stream made in
    its place starts again at sequence 1, so following it from where an archive is would drop
    what it holds, unseen by anyone. No server makes it again or follows one made again: each
    says so, its people are told the link is down, and what they say is kept, marked."""
    a, b = linked("a"), linked("b")
    alice, bob = Peer(a, "alice"), Peer(b, "bob")
    alice.until(b"*** bob joined\n")
    alice.send("alice>before")
    bob.until(b"alice>before\n")
    settled(tmp_path / "a.db", tmp_path / "b.db")
    _stream(broker.url, "delete")
    for s in (a, b):
        s.wait_for(r"the room's stream CHATLOG_lab is gone from the broker \(this server has recorded it to "
                   r"sequence \d+\): not making it again; a room started afresh needs a new --name", timeout=20)
    alice.until(b"link to the room's other servers is down")
    alice.send("alice>while it is gone")
    a.stop()
    a = linked("a", wait=False)  # restarted, the same archive: it makes no new stream either
    a.wait_for(r"the room's stream CHATLOG_lab is gone from the broker")
    carol = Peer(a, "carol")
    carol.send("carol>after the restart")
    _stream(broker.url, "add")
    b.wait_for(r"the room's stream CHATLOG_lab was made again \(it ends at sequence 0; this server has "
               r"recorded it to \d+\): not following it", timeout=20)
    bob.until(b"link to the room's other servers is down")
    bob.send("bob>after it was made again")
    for db, text in (("a", "while it is gone"), ("a", "after the restart"), ("b", "after it was made again")):
        kept = wait_until(lambda db=db, text=text: rows(tmp_path / f"{db}.db", f"text = '{text}'"))
        assert len(kept) == 1 and "not relayed" in kept[0][6], kept
    assert not any(r[2] is not None and r[2] > 0 for r in rows(tmp_path / "a.db", "text = 'after the restart'"))
    assert "linked to nats://" not in a.output


def test_one_name_taken_on_two_servers_while_the_broker_was_away_ends_with_one_holder(tmp_path, broker, linked):
    """A name taken while the link is down is kept here alone: before, nobody else heard of it,
    so when the link returned two servers could each have someone under one name (and the
    others' records had no joining for anyone who joined then). Now those joinings are said
    when the link returns, in the stream's order: the first keeps the name, every record has it."""
    a, b = linked("a"), linked("b")
    watcher = Peer(b, "watcher")
    a.wait_for(r"^watcher joined \(on ")
    broker.stop()
    x, y = Peer(a), Peer(b)
    for p in (x, y):
        p.until(b"is down")
    x.send("zed>\\join")
    y.send("zed>\\join")
    a.wait_for(r"^zed joined \(127")
    b.wait_for(r"^zed joined \(127")
    broker.start()
    wait_until(lambda: x.poll() or y.poll() or b"choose another" in x.buf + y.buf, timeout=20)
    keeper, kept_on = (x, a) if b"choose another" in y.buf else (y, b)
    settled(tmp_path / "a.db", tmp_path / "b.db")
    x.poll(), y.poll()
    assert sorted([x.buf.count(b"choose another"), y.buf.count(b"choose another")]) == [0, 1], (x.buf, y.buf)
    keeper.send("zed>the name is mine")
    watcher.until(b"zed>the name is mine\n")
    settled(tmp_path / "a.db", tmp_path / "b.db")
    assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
    joins = [r for r in rows(tmp_path / "a.db") if r[4] == "zed" and r[5] == "joined"]
    assert [r[6] for r in joins] == ["relinked", "relinked"]  # both said, in one order everywhere
    assert kept_on.count(r"^zed ") >= 1


def test_a_copied_archive_linking_beside_its_original_is_said(tmp_path, linked):
    a = linked("a")
    a.say("\\who")  # (something committed: the copy is a real archive)
    a.stop()
    shutil.copy(tmp_path / "a.db", tmp_path / "copy.db")
    linked("a")
    twin = linked("copy")
    twin.wait_for(r"links with this archive's identity \(a copy of this database\?\)")


def _broker_port_of(server, ports):
    """Which of the brokers' ports a chatlog server is connected to (from ss)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if f"pid={server.proc.pid}," in line:
            peer = line.split()[3]
            port = int(peer.rsplit(":", 1)[1])
            if port in ports:
                return port
    return None


@contextmanager
def cluster_room(tmp_path):
    """A 3-node JetStream cluster on loopback and two chatlog servers in one room linked through
    it, the stream replicated three times; alice on the first, bob on the second, a line between
    them. Yields (nodes, ports, servers, alice, bob); the consoles are printed if the test fails."""
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed: cannot tell which node a server uses")
    six = free_ports(6)
    ports, routes = six[:3], six[3:]
    nodes = []
    for i in range(3):
        conf = tmp_path / f"n{i}.conf"
        conf.write_text(
            f"server_name: n{i}\n"  # (address, port, JetStream and its storage: Broker's flags)
            f"cluster {{\n  name: chatlog\n  listen: 127.0.0.1:{routes[i]}\n"
            f"  routes: [{', '.join(f'nats://127.0.0.1:{r}' for r in routes)}]\n}}\n")
        nodes.append(Broker(tmp_path / f"n{i}", port=ports[i], args=["-c", str(conf)]))
    urls = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
    servers = []
    try:
        for name in "ab":  # (until the cluster has elected its leaders, a server retries)
            servers.append(ServerProc(tmp_path / f"{name}.db", "--room", "--name", "lab", "--link", urls,
                                      "--link-replicas", "3"))
        for s in servers:
            s.wait_for(r"^linked to nats://", timeout=30)
        alice, bob = Peer(servers[0], "alice"), Peer(servers[1], "bob")
        alice.until(b"*** bob joined\n")
        alice.send("alice>before")
        bob.until(b"alice>before\n")
        yield nodes, ports, servers, alice, bob
        settled(tmp_path / "a.db", tmp_path / "b.db")
        assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
    finally:
        for s in servers:
            s.stop()
            print(f"----- {s.db.name}:\n{s.output}")  # (shown if it failed)
        for n in nodes:
            n.stop()


@pytest.mark.slow
def test_a_three_node_nats_cluster_keeps_the_room_through_the_loss_of_a_node(tmp_path):
    """The broker need not be the one thing that can fail: a 3-node JetStream cluster with the
    room's stream replicated three times; the node a chatlog server uses is stopped mid-room."""
    with cluster_room(tmp_path) as (nodes, ports, servers, alice, bob):
        used = wait_until(lambda: _broker_port_of(servers[0], ports))
        nodes[ports.index(used)].stop()  # the node alice's server uses
        servers[0].wait_for(r"linked to nats://\S+ again", timeout=45)
        said_until_heard(alice, "alice>after a node died", bob)
        said_until_heard(bob, "bob>still here", alice)


@pytest.mark.slow
@pytest.mark.parametrize("left", ["another node", "alice's node"])
def test_a_cluster_without_its_quorum_for_a_while_is_followed_again_when_it_returns(tmp_path, left):
    """Two of three nodes stopped: the one left takes the clients, but the room's stream (three
    replicas) has no leader, so nobody can follow it. A server that lost its node keeps trying,
    says it cannot, and follows it again once a node returns (it had given up after 20 tries:
    its people heard nothing more, while what they said still went out). One whose node is the
    one left is followed again by the client's own recovery of its consumer."""
    with cluster_room(tmp_path) as (nodes, ports, servers, alice, bob):
        used = [wait_until(lambda s=s: _broker_port_of(s, ports)) for s in servers]
        kept = used[0] if left == "alice's node" else next(p for p in ports if p not in used)
        gone = [n for n in nodes if n.port != kept]
        moved = [s for s, port in zip(servers, used, strict=True) if port != kept]  # (they must follow anew)
        for n in gone:  # both at once: no server moves to the second before it goes too
            n.proc.send_signal(signal.SIGTERM)
        before = {s: s.count(r"linked to nats://\S+ again") for s in moved}
        for n in gone:
            n.stop()
        # A moved server says it cannot follow the stream, and keeps trying. (One that reached the
        # node left and followed the stream there before the cluster noticed it had lost its
        # quorum may not: where the node left leads the stream, it goes on answering, and the
        # consumer there goes on delivering. Where it does not, the server's look at the stream
        # goes unanswered and it says it cannot follow, as with a stalled broker.)
        cannot = r"cannot follow the room's stream CHATLOG_lab: .*; retrying"
        for s in moved:
            wait_until(lambda s=s: s.count(cannot) or s.count(r"linked to nats://\S+ again") > before[s], timeout=45)
        told = [s for s in moved if s.count(cannot)]
        # (following again: after it reconnected, or after its look at the stream went unanswered)
        again = r"(?:linked to nats://\S+|following the stream CHATLOG_lab) again"
        back = {s: s.count(again) for s in told}  # (a first node may go too)
        # The outage lasts longer than the 20 tries (10 s and more) the servers used to make.
        outage = time.monotonic() + 15
        wait_until(lambda: time.monotonic() >= outage, timeout=30)
        gone[0].start()
        for s in told:
            wait_until(lambda s=s: s.count(again) > back[s], timeout=60)
        said_until_heard(bob, "bob>still here", alice)
        said_until_heard(alice, "alice>and me", bob)


def test_a_second_server_on_one_archive_does_not_link_the_same_room(tmp_path, broker, linked):
    """Two servers on one database, linked into one room, both ran: they shared the room's
    stream position and wrote each line into two sessions of one file, told only that the other
    "links with this archive's identity (a copy of this database?)". The second now refuses, in
    one line, and the first goes on."""
    a = linked("a")
    second = ServerProc(tmp_path / "a.db", "--room", "--name", "lab", "--link", broker.url, ready=False)
    try:
        assert second.wait(30) != 0
    finally:
        second.stop()
    err = second.output + second.stderr_text()
    assert re.search(r"chatlog: the room lab is open from this database already, by the server on port "
                     r"%d \(pid \d+\); each linked server needs a database of its own" % a.port, err), err
    assert "Traceback" not in err
    alice, _bob = Peer(a, "alice"), Peer(linked("b"), "bob")  # (the first is still in the room)
    alice.until(b"*** bob joined\n")


def test_a_broker_that_offers_no_tls_is_not_linked_to_in_plaintext(tmp_path):
    """`tls://` asks for TLS. A broker (or someone between) whose greeting does not require it
    was linked to in plaintext anyway, the password in the URL sent in the clear: the client
    upgrades only when the greeting says so. Now nothing is sent, and the console says why."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    ls.settimeout(0.2)
    port = ls.getsockname()[1]
    got = []
    done = threading.Event()

    def fake_broker():  # a NATS greeting without tls_required, then whatever the client says
        conns = []
        while not done.is_set():
            try:
                c, _ = ls.accept()
                c.sendall(b'INFO {"server_id":"FAKE","version":"2.10.0","proto":1,"max_payload":1048576,'
                          b'"headers":true,"jetstream":true}\r\n')
                c.settimeout(0.05)
                conns.append(c)
            except OSError:
                pass
            for c in conns:
                try:
                    got.append(c.recv(65536))
                except OSError:
                    pass
        for c in conns:
            c.close()

    t = threading.Thread(target=fake_broker, daemon=True)
    t.start()
    s = ServerProc(tmp_path / "x.db", "--room", "--name", "lab", "--link", f"tls://someone:s3cret@127.0.0.1:{port}")
    try:
        s.wait_for(r"^cannot reach the broker tls://127\.0\.0\.1:%d: .*does not require TLS.*not linking in plaintext; retrying" % port, timeout=15)
        assert s.count(r"^linked to ") == 0
    finally:
        s.stop()
        done.set()
        t.join(5)
        ls.close()
    assert b"s3cret" not in b"".join(got) and b"CONNECT" not in b"".join(got)
    assert "s3cret" not in s.output and "someone" not in s.output


def test_credentials_in_the_url_are_used_and_never_printed(tmp_path):
    broker = Broker(tmp_path / "auth", args=["--user", "someone", "--pass", "s3cret"])
    try:
        s = ServerProc(tmp_path / "x.db", "--room", "--name", "lab", "--link",
                       f"nats://someone:s3cret@127.0.0.1:{broker.port}")
        wrong = ServerProc(tmp_path / "y.db", "--room", "--name", "lab", "--link",
                           f"nats://someone:wrong@127.0.0.1:{broker.port}")
        try:
            s.wait_for(r"Linked room lab through the broker nats://127\.0\.0\.1:%d \(stream CHATLOG_lab\)" % broker.port)
            s.wait_for(r"^linked to nats://127\.0\.0\.1:%d: room lab" % broker.port)
            wrong.wait_for(r"cannot reach the broker nats://127\.0\.0\.1:%d: .*[Aa]uthori" % broker.port)
            for server in (s, wrong):
                assert "s3cret" not in server.output and "someone" not in server.output and "wrong" not in server.output
        finally:
            s.stop()
            wrong.stop()
    finally:
        broker.stop()
    r = run_chatlog(tmp_path / "z.db", "serve", "0", "--link", "nats://127.0.0.1:1")
    assert r.exit_code != 0 and "--link is for a room" in r.output


# -- a credentials file (decentralized JWT auth) -------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _nkey(prefix):
    """A new NATS nkey pair of a role (operator, account, user), from 32 random bytes."""
    import nkeys

    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _nats_jwt(issuer, subject, name, claims):
    """A NATS JWT (v2): base64url JSON header and claims, signed by the issuer's nkey."""
    body = {"iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name, "sub": subject,
            "nats": {**claims, "version": 2}}
    body["jti"] = base64.b32encode(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()).decode().rstrip("=")
    signed = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode()) + "." + _b64url(json.dumps(body).encode())
    return signed + "." + _b64url(issuer.sign(signed.encode()))


def _creds(path, account, name):
    """A user of `account` and its credentials file, as `nsc generate creds` writes it; returns
    (the user's JWT, its seed): the secrets a console must never show."""
    import nkeys

    user = _nkey(nkeys.PREFIX_BYTE_USER)
    token = _nats_jwt(account, user.public_key.decode(), name,
                      {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
    seed = user.seed.decode()
    path.write_text(f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
                    f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n")
    return token, seed


def operator_mode(tmp_path):
    """A broker configuration in decentralized JWT auth: an operator, its system account, and an
    account with JetStream, preloaded in a memory resolver. Returns (the configuration file, the
    account's nkey pair)."""
    import nkeys

    operator = _nkey(nkeys.PREFIX_BYTE_OPERATOR)
    system, account = _nkey(nkeys.PREFIX_BYTE_ACCOUNT), _nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
              "conn": -1, "leaf": -1}
    sys_pub, acc_pub = system.public_key.decode(), account.public_key.decode()
    op_jwt = _nats_jwt(operator, operator.public_key.decode(), "chatlog-test",
                       {"type": "operator", "system_account": sys_pub})
    sys_jwt = _nats_jwt(operator, sys_pub, "SYS", {"type": "account", "limits": limits})
    acc_jwt = _nats_jwt(operator, acc_pub, "chat", {"type": "account", "limits": {
        **limits, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}})  # JetStream on
    conf = tmp_path / "operator.conf"
    conf.write_text(f"operator: {op_jwt}\nsystem_account: {sys_pub}\nresolver: MEMORY\n"
                    f"resolver_preload: {{\n  {sys_pub}: {sys_jwt}\n  {acc_pub}: {acc_jwt}\n}}\n")
    return conf, account


def test_a_credentials_file_links_servers_and_is_never_printed(tmp_path):
    pytest.importorskip("nkeys", reason="nats-py's nkeys extra (a dependency of chatlog) is not installed")
    import nkeys

    conf, account = operator_mode(tmp_path)
    broker = Broker(tmp_path / "jwt", args=["-c", str(conf)])
    token, seed = _creds(tmp_path / "lab.creds", account, "lab")
    # A user the broker's operator never signed: an account of its own, unknown to the broker.
    _creds(tmp_path / "stranger.creds", _nkey(nkeys.PREFIX_BYTE_ACCOUNT), "stranger")
    servers = []
    try:
        for name in "ab":
            servers.append(ServerProc(tmp_path / f"{name}.db", "--room", "--name", "lab", "--link", broker.url,
                                      "--link-creds", str(tmp_path / "lab.creds")))
        for s in servers:
            s.wait_for(r"Linked room lab through the broker nats://127\.0\.0\.1:%d \(stream CHATLOG_lab\)" % broker.port)
            s.wait_for(r"^linked to nats://127\.0\.0\.1:%d: room lab" % broker.port)
        alice, bob = Peer(servers[0], "alice"), Peer(servers[1], "bob")
        alice.until(b"*** bob joined\n")
        alice.send("alice>signed in with a credentials file")
        bob.until(b"alice>signed in with a credentials file\n")
        settled(tmp_path / "a.db", tmp_path / "b.db")
        assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
        # Refused by the broker: said on the console in one line, once, and the server carries on.
        stranger = ServerProc(tmp_path / "stranger.db", "--room", "--name", "lab", "--link", broker.url,
                              "--link-creds", str(tmp_path / "stranger.creds"))
        servers.append(stranger)
        stranger.wait_for(r"^cannot reach the broker nats://127\.0\.0\.1:%d: .*Authorization Violation.*; retrying$"
                          % broker.port)
        peer = Peer(stranger)
        peer.until(b"link to the room's other servers is down")
        peer.close()
        # Without any credentials the broker refuses too.
        bare = ServerProc(tmp_path / "bare.db", "--room", "--name", "lab", "--link", broker.url)
        servers.append(bare)
        bare.wait_for(r"^cannot reach the broker nats://127\.0\.0\.1:%d: .*[Aa]uthori" % broker.port)
    finally:
        for s in servers:
            s.stop()
        broker.stop()
    for s in servers:
        said = s.output + s.stderr_text()
        assert seed not in said and token not in said and token.split(".")[2] not in said
        assert "Traceback" not in said
        # said once per reason, not once per retry (the broker refuses, then may reset: two)
        assert len(set(re.findall(r"(?m)^cannot reach the broker.*$", s.output))) == s.count(r"^cannot reach the broker") <= 2
    assert servers[0].count(r"^linked to nats://") == 1
    # A file that is not there, or not a credentials file: one line from the command, which
    # never starts (nats-py would read a file without a JWT forever) and never quotes the file.
    (tmp_path / "garbled.creds").write_text(f"-----BEGIN NATS USER JWT-----\nnot a token {seed}\n")
    (tmp_path / "no-seed.creds").write_text(f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n")
    account_seed = account.seed.decode()
    (tmp_path / "account.creds").write_text(
        f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n"
        f"-----BEGIN USER NKEY SEED-----\n{account_seed}\n------END USER NKEY SEED------\n")
    for name, why in (("missing", r"missing\.creds.*does not exist"),
                      ("garbled", r"garbled\.creds is not a NATS credentials file \(no user JWT in it\)"),
                      ("no-seed", r"no-seed\.creds is not a NATS credentials file \(no user nkey seed in it\)"),
                      ("account", r"the nkey seed in \S*account\.creds is not a user's")):
        r = run_chatlog(tmp_path / "z.db", "serve", "0", "--room", "--link", broker.url,
                        "--link-creds", str(tmp_path / f"{name}.creds"), process=True)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        said = [line for line in r.output.splitlines() if line.strip()]
        assert len(said) == 1 and "--link-creds" in said[0] and re.search(why, said[0]), r.output
        assert seed not in r.output and token not in r.output and account_seed not in r.output


def test_tls_to_the_broker_with_a_private_ca(tmp_path):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    broker = Broker(tmp_path / "tlsjs", args=["--tls", "--tlscert", str(tmp_path / "cert.pem"),
                                              "--tlskey", str(tmp_path / "key.pem")])
    servers = []
    try:
        for name in "ab":
            servers.append(ServerProc(tmp_path / f"{name}.db", "--room", "--name", "lab", "--link",
                                      f"tls://127.0.0.1:{broker.port}", "--link-ca", str(tmp_path / "ca.pem")))
        for s in servers:
            s.wait_for(r"^linked to tls://127\.0\.0\.1:%d: room lab" % broker.port)
        alice, bob = Peer(servers[0], "alice"), Peer(servers[1], "bob")
        alice.until(b"*** bob joined\n")
        alice.send("alice>over TLS")
        bob.until(b"alice>over TLS\n")
        # The broker restarted: both link again over TLS (each greeting checked again).
        broker.stop()
        broker.start()
        for s in servers:
            s.wait_for(r"^linked to tls://127\.0\.0\.1:%d again" % broker.port, timeout=30)
        said_until_heard(alice, "alice>over TLS again", bob)
        # Without the CA the broker's certificate is not trusted: said, never linked.
        untrusting = ServerProc(tmp_path / "c.db", "--room", "--name", "lab", "--link", f"tls://127.0.0.1:{broker.port}")
        servers.append(untrusting)
        untrusting.wait_for(r"cannot reach the broker tls://127\.0\.0\.1:%d: .*(CERTIFICATE|certificate)" % broker.port)
    finally:
        for s in servers:
            s.stop()
        broker.stop()


def test_why_the_broker_cannot_be_reached_reads_as_words():
    """The reasons the console gives, in words: not asyncio's "[Errno 111] Connect call failed
    (...)", nor a bare "TimeoutError" for a broker that accepts and never answers."""
    import asyncio
    import errno

    from chatlog.link import _why

    assert _why(OSError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 4222)")) == "Connection refused"
    assert _why(OSError(errno.EMFILE, "x")) == "Too many open files"
    assert _why(asyncio.TimeoutError()) == "it did not answer in time"
    assert _why(TimeoutError()) == "it did not answer in time"
    assert _why(ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")) == (
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert _why(socket.gaierror(-2, "Name or service not known")) == "[Errno -2] Name or service not known"
    assert _why(ValueError("first line\nsecond")) == "first line"


def test_stream_names_are_safe_tokens():
    from chatlog.link import safe_url, stream_token

    assert stream_token("lab") == "lab"
    assert stream_token("cs372-room_1") == "cs372-room_1"
    for odd in ("a.b", "a b", "a>*", "café"):
        tok = stream_token(odd)
        assert re.fullmatch(r"x[0-9a-f]{24}", tok)
    assert safe_url("nats://u:p@h:4222") == "nats://h:4222"
    assert safe_url("tls://u@[::1]:4222") == "tls://[::1]:4222"


# -- one archive from several --------------------------------------------------------------------


def dump(db):
    """Every table an archive's readers use, as rows (ids included): what a second merge must
    leave exactly as it was."""
    conn = sqlite3.connect(db)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("sessions", "messages", "participants", "servers", "merged")}
    finally:
        conn.close()


def test_every_servers_archive_has_everyone_in_the_room_and_a_merge_has_each_once(tmp_path, linked):
    """Each server's archive holds the whole room, and now its people too: the other servers'
    people have a participant there (without an address: their own server has it), so `show`,
    `sessions` and `stats` count everyone, and every line and leaving is somebody's. A merge
    takes each person once, with their address, whatever the order of the archives."""
    a, b = linked("a"), linked("b")
    alice, bob = Peer(a, "alice"), Peer(b, "bob")
    alice.until(b"*** bob joined\n")
    alice.send("alice>hello from a")
    bob.until(b"alice>hello from a\n")
    c = linked("c")  # linked after they joined: they are known there by what they say
    carol = Peer(c, "carol")
    bob.until(b"*** carol joined\n")
    alice.send("alice>who is new?")
    bob.send("bob>carol is")
    carol.until(b"bob>carol is\n")
    bob.send("robert>call me robert")  # a new name: still the one participant, under the first
    carol.until(b"robert>call me robert\n")
    bob.close()
    carol.until(b"*** robert left\n")
    dbs = [tmp_path / f"{x}.db" for x in "abc"]
    settled(*dbs)
    wait_until(lambda: all(rows(db, "sender = 'event' AND text = 'left'") for db in dbs))
    b.stop()  # alice and carol are still in the room: they leave b's record with its room
    assert db_rows(dbs[1], "SELECT p.handle, p.end_reason = s.end_reason, p.left_at = s.ended_at FROM participants p "
                           "JOIN sessions s ON s.id = p.session_id WHERE p.handle != 'bob' ORDER BY 1") == [
        ("alice", 1, 1), ("carol", 1, 1)]
    for p in (alice, carol):
        p.close()
    wait_until(lambda: all(len(rows(db, "sender = 'event' AND text = 'left'")) == 3 for db in (dbs[0], dbs[2])))
    for s in (a, c):
        s.stop()
    here = {"a": "alice", "b": "bob", "c": "carol"}
    for name, db in zip("abc", dbs, strict=True):
        people = db_rows(db, "SELECT handle, host IS NOT NULL, left_at IS NOT NULL, origin_server IS NOT NULL "
                             "FROM participants ORDER BY handle")
        assert people == [(h, int(h == here[name]), 1, 1) for h in ("alice", "bob", "carol")], (name, people)
        # every line and every join and leave is somebody's, and theirs
        said = db_rows(db, "SELECT m.handle, p.handle FROM messages m LEFT JOIN participants p "
                           "ON p.id = m.participant_id WHERE m.sender IN ('client', 'event')")
        assert said and all(h == ph or (h, ph) == ("robert", "bob") for h, ph in said), (name, said)
        shown = run_chatlog(db, "show", "1")
        assert shown.exit_code == 0 and "3 participants" in shown.output, shown.output
        stats = run_chatlog(db, "stats")
        assert re.search(r"distinct handles +3\n", stats.output), stats.output
        assert re.search(r"bob +said 2 messages", stats.output), stats.output
    merged = []
    for i, order in enumerate((dbs, dbs[::-1])):
        out = tmp_path / f"all{i}.db"
        r = run_chatlog(None, "merge", *map(str, order), "-o", str(out))
        assert r.exit_code == 0, r.output
        people = db_rows(out, "SELECT handle, host, port, joined_at, left_at, end_reason FROM participants ORDER BY handle")
        assert [p[0] for p in people] == ["alice", "bob", "carol"] and all(p[1] and p[2] for p in people), people
        said = db_rows(out, "SELECT m.handle, p.handle FROM messages m LEFT JOIN participants p "
                            "ON p.id = m.participant_id WHERE m.sender IN ('client', 'event')")
        assert said and all(h == ph or (h, ph) == ("robert", "bob") for h, ph in said), said
        before = dump(out)
        assert run_chatlog(None, "merge", *map(str, order), "-o", str(out)).exit_code == 0
        assert dump(out) == before  # merging again changes nothing
        merged.append(people)
    assert merged[0] == merged[1]  # each person as their own server recorded them, in either order


def test_merge_one_archive_from_three_idempotent_and_readable(tmp_path, linked):
    from storebuild import open_store

    servers = [linked(n) for n in "abc"]
    peers = [Peer(s, h) for s, h in zip(servers, ["alice", "bob", "carol"], strict=True)]
    peers[0].until(b"*** carol joined\n")
    for i in range(5):
        for p, h in zip(peers, ["alice", "bob", "carol"], strict=True):
            p.send(f"{h}>merge {i} from {h}")
    for h in ("bob", "carol"):
        peers[0].until(f"{h}>merge 4 from {h}\n".encode())
    dbs = [tmp_path / f"{x}.db" for x in "abc"]
    settled(*dbs)
    for p in peers:
        p.close()
    # Each archive has everyone's leaving (a stopping server's own would come after it stopped).
    wait_until(lambda: all(len(rows(db, "sender = 'event' AND text = 'left'")) == 3 for db in dbs))
    for s in servers:
        s.stop()
    # A 1:1 chat that server b had of its own: kept, with its server named.
    st = open_store(dbs[1])
    sid = st.begin_session(("10.0.0.9", 5000), ("127.0.0.1", 9999), served=True)
    st.add_message(sid, "client", "dave", "a private word")
    st.end_session(sid, "client-quit")
    st.close()

    out = tmp_path / "all.db"
    r = run_chatlog(None, "merge", *map(str, dbs), "-o", str(out))
    assert r.exit_code == 0, r.output
    stream = [r for r in rows(dbs[0])]
    merged = rows(out, "session_id = (SELECT merged_session FROM merged WHERE source = 'room:lab')")
    # Each line once, in the stream's order (local-only lines: none here).
    assert merged == stream + [x for x in merged if x[2] is None]
    assert [x for x in merged if x[2] is None] == []
    assert len({(x[0], x[1]) for x in merged}) == len(merged)
    texts = [x[5] for x in merged if x[3] == "client"]
    assert len(texts) == 15 and texts == [x[5] for x in stream if x[3] == "client"]
    chat = db_one(out, "SELECT s.client_host, s.server_port, m.source FROM sessions s "
                       "JOIN merged m ON m.merged_session = s.id WHERE s.kind = 'chat'")
    assert chat == ("10.0.0.9", 9999, db_one(dbs[1], "SELECT uid FROM node")[0])  # b's, and said so
    before = dump(out)
    r = run_chatlog(None, "merge", *map(str, dbs), "-o", str(out))
    assert r.exit_code == 0 and "0 new sessions, 0 new messages" in r.output, r.output
    assert dump(out) == before  # merging again changes nothing
    # The readers work on the result.
    assert run_chatlog(out, "sessions").exit_code == 0
    room_sid = db_one(out, "SELECT merged_session FROM merged WHERE source = 'room:lab'")[0]
    shown = run_chatlog(out, "show", str(room_sid))
    assert shown.exit_code == 0 and "merge 4 from carol" in shown.output
    assert run_chatlog(out, "search", "-c", "merge").output.strip() == "15"
    assert "a private word" in run_chatlog(out, "export", "--format", "jsonl").output
    # A merged archive is a source like any other: beside the archives it came from, in either
    # order, each session, person and line is there once (the room's people used to be twice).
    counts = "SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM participants), (SELECT count(*) FROM messages)"
    for i, order in enumerate(((out, *dbs), (*dbs, out))):
        again = tmp_path / f"again{i}.db"
        assert run_chatlog(None, "merge", *map(str, order), "-o", str(again)).exit_code == 0
        assert db_one(again, counts) == db_one(out, counts), order
        assert [x[5] for x in rows(again, f"session_id = {room_sid}")] == [x[5] for x in merged]


def db_one(db, sql):
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchone()
    finally:
        conn.close()


# -- the policy alone (no broker, no sockets) ----------------------------------------------------


def _policy():
    from chatlog.events import Connected, Started
    from chatlog.link import LinkedRoom, LinkState
    from chatlog.room import Room

    room = Room(history=0)
    room.elsewhere = []
    p = LinkedRoom(room)
    p.handle_event(Started(1.0))
    p.handle_event(LinkState(True, "linked", 1.0))
    p.handle_event(Connected(1, "127.0.0.1", 5001, 1.0))
    return p


def _line(conn, text, handle=None, at=2.0):
    from chatlog.events import Received
    from chatlog.protocol import Message

    return Received(conn, Message(handle, text, text.encode(), text.strip() == "\\quit", 0), at)


def test_policy_a_line_is_published_not_committed_then_carried_out_in_stream_order():
    import json

    from chatlog.events import Broadcast, Commit, Publish
    from chatlog.link import Advance, Arrived, LinkCommit

    p = _policy()
    out = p.handle_event(_line(1, "hello", "alice"))
    assert not [d for d in out if type(d) in (Commit, Broadcast)]  # nothing before the stream says so
    (pub,) = [d for d in out if type(d) is Publish and d.what == "line"]
    assert b'"hello"' in pub.data
    assert [d.what for d in out if type(d) is Publish] == ["line", "who"]  # and who is here now
    body = json.loads(pub.data)
    back = p.handle_event(Arrived(7, "me", "3.1", "vm:1", body, True, pub.ref, 2.1))
    kinds = [type(d) for d in back]
    assert kinds.index(Advance) > max(i for i, k in enumerate(kinds) if k is LinkCommit)
    assert kinds.index(Broadcast) > kinds.index(Advance)  # committed, then relayed
    assert [d.seq for d in back if type(d) is LinkCommit] == [7, 7]  # the join and the line
    assert all(d.exclude == 1 for d in back if type(d) is Broadcast)  # the sender does not hear itself
    # The same message from another server: relayed to everyone here, its origin kept.
    there = p.handle_event(Arrived(8, "other", "5.9", "far:2", body, False, 0, 2.2))
    assert all(d.exclude is None for d in there if type(d) is Broadcast)
    assert {(d.origin, d.oid) for d in there if type(d) is LinkCommit} == {("other", "5.9.0"), ("other", "5.9.1")}


def test_policy_link_down_refuses_tells_and_keeps_marked():
    import json

    from chatlog.events import Connected, Publish, Send
    from chatlog.link import DOWN_NOTICE, LATE_NOTICE, Arrived, LinkCommit, LinkState, Unsent

    p = _policy()
    p.handle_event(_line(1, "first", "alice"))
    down = p.handle_event(LinkState(False, "lost the broker", 3.0))
    assert any(DOWN_NOTICE.encode() in getattr(d, "data", b"") for d in down)  # everyone, at once
    out = p.handle_event(_line(1, "meanwhile", "alice", at=3.1))
    assert not [d for d in out if type(d) is Publish]
    (kept,) = [d for d in out if type(d) is LinkCommit]
    assert kept.seq is None and kept.origin is None and "not relayed" in kept.note
    assert any(type(d) is Send and d.conn == 1 and DOWN_NOTICE.encode() in d.data for d in out)
    joined = p.handle_event(Connected(2, "127.0.0.1", 5002, 3.2))
    assert any(type(d) is Send and d.conn == 2 and DOWN_NOTICE.encode() in d.data for d in joined)
    # A publication the broker never confirmed: kept, marked, its sender told.
    p.handle_event(LinkState(True, "back", 4.0))
    pub = next(d for d in p.handle_event(_line(1, "lost", at=4.1)) if type(d) is Publish)
    out = p.handle_event(Unsent(pub.ref, 7.0))
    assert [d.text for d in out if type(d) is LinkCommit] == ["lost"]
    assert any(type(d) is Send and d.conn == 1 for d in out)
    # The broker had taken it after all: the stream brings it, and its sender hears so.
    came = p.handle_event(Arrived(9, "me", f"1.{pub.ref}", "here:1", json.loads(pub.data), True, pub.ref, 8.0))
    assert [d for d in came if type(d) is Send and d.conn == 1 and LATE_NOTICE.encode() in d.data]
    assert any(type(d) is LinkCommit and d.text == "lost" and d.seq == 9 for d in came)
    # A line confirmed in time says nothing of the kind.
    pub = next(d for d in p.handle_event(_line(1, "in time", at=8.1)) if type(d) is Publish)
    came = p.handle_event(Arrived(10, "me", f"1.{pub.ref}", "here:1", json.loads(pub.data), True, pub.ref, 8.2))
    assert not [d for d in came if type(d) is Send and LATE_NOTICE.encode() in d.data]


def test_policy_lines_the_broker_refuses_say_why_on_the_console_without_flooding_it():
    """A broker whose store is full refuses every line: the console said "the broker did not take
    a line" once for each, with no reason (a probe: 2,529 such lines for one burst). Now the
    reason is said, and is in each kept line's note; the console says it the first time and at
    10, 100, ... lines, and again once a line has got through since."""
    import json

    from chatlog.events import Publish, Send, Show
    from chatlog.link import Arrived, LinkCommit, Unsent

    p = _policy()
    p.handle_event(_line(1, "first", "alice"))
    shown, notes, told = [], [], 0
    for i in range(120):
        pub = next(d for d in p.handle_event(_line(1, f"l{i}", at=3.0 + i / 100)) if type(d) is Publish)
        out = p.handle_event(Unsent(pub.ref, 4.0 + i / 100, "insufficient resources"))
        shown += [d.text for d in out if type(d) is Show]
        notes += [d.note for d in out if type(d) is LinkCommit]
        told += sum(1 for d in out if type(d) is Send and d.conn == 1)
    assert shown == [
        "the broker did not take a line (insufficient resources): kept here alone, marked not relayed",
        "the broker did not take 10 lines (insufficient resources) (since one last got through): each kept here "
        "alone, marked not relayed",
        "the broker did not take 100 lines (insufficient resources) (since one last got through): each kept here "
        "alone, marked not relayed"]
    assert notes == ["not relayed: the broker did not take it (insufficient resources)"] * 120 and told == 120
    # one gets through: the next refusal is said again
    pub = next(d for d in p.handle_event(_line(1, "through", at=6.0)) if type(d) is Publish)
    p.handle_event(Arrived(9, "me", f"1.{pub.ref}", "here:1", json.loads(pub.data), True, pub.ref, 6.1))
    pub = next(d for d in p.handle_event(_line(1, "again", at=7.0)) if type(d) is Publish)
    out = p.handle_event(Unsent(pub.ref, 8.0, "insufficient resources\x1b[2J"))
    assert [d.text for d in out if type(d) is Show] == [
        "the broker did not take a line (insufficient resources\\x1b[2J): kept here alone, marked not relayed"]


def test_policy_a_broker_taking_tiny_messages_is_no_reason_to_fail():
    """A broker whose max_payload leaves no room for a publication (under about 1 KB) gave the
    policy a size of 0 (ignored: 1 MB assumed) or below it (each line alone). It takes 1 KB."""
    from chatlog.events import Publish, ReceivedLines
    from chatlog.link import MOST_AT_LEAST, LinkState
    from chatlog.protocol import Run

    p = _policy()
    p.handle_event(_line(1, "first", "alice"))
    for most in (0, -24, 10):
        p.handle_event(LinkState(True, "linked", 2.0, most))
        assert p.most == MOST_AT_LEAST
    data = b"".join(b"alice>line %d\n" % i for i in range(300))
    out = p.handle_event(ReceivedLines(1, [Run(data, 300, 3.0)]))
    sent = [d for d in out if type(d) is Publish and d.what == "line"]
    assert len(sent) > 1 and sum(len(json.loads(d.data)["c"][0]["L"]) for d in sent) == 300


def test_policy_why_the_link_is_down_reaches_the_console_even_after_clients_were_told():
    """A broker that accepts and never answers times out only after a client has been told the
    link is down: its reason still reaches the console (once each), the clients nothing more."""
    from chatlog.events import Broadcast, Connected, Send, Show, Started
    from chatlog.link import LinkedRoom, LinkState
    from chatlog.room import Room

    room = Room(history=0)
    room.elsewhere = []
    p = LinkedRoom(room)
    p.handle_event(Started(1.0))
    p.handle_event(Connected(1, "127.0.0.1", 5001, 1.0))  # before the link was ever up
    told = p.handle_event(_line(1, "hello", "alice", at=1.5))
    assert any(type(d) is Send and b"is down" in d.data for d in told)
    why = "cannot reach the broker nats://127.0.0.1:4222: TimeoutError; retrying"
    out = p.handle_event(LinkState(False, why, 3.0))
    assert [d.text for d in out if type(d) is Show] == [why]
    assert not [d for d in out if type(d) in (Send, Broadcast)]
    assert p.handle_event(LinkState(False, why, 5.5)) == []  # the same reason again: said once
    reset = "cannot reach the broker nats://127.0.0.1:4222: Connection reset by peer; retrying"
    assert [d.text for d in p.handle_event(LinkState(False, reset, 6.0)) if type(d) is Show] == [reset]
    assert p.handle_event(LinkState(False, why, 6.5)) == []  # retries alternating: each reason once


def test_policy_who_lists_other_servers_their_handles_are_taken_and_kick_goes_there():
    import json

    from chatlog.events import End, OperatorLine, Publish, Send, Show
    from chatlog.link import KickAsked, Roster

    p = _policy()
    p.handle_event(_line(1, "hi", "alice"))
    p.handle_event(Roster("srvB", "hostb:9999", [[4, "bob", "10.0.0.2:4000"]], 5.0))
    out = p.handle_event(_line(1, "\\who", at=5.1))
    (who,) = [d for d in out if type(d) is Send]
    assert b"2 here: alice, bob (on hostb:9999)" in who.data
    shown = p.handle_event(OperatorLine("\\who", 5.2))
    assert any(type(d) is Show and re.search(r"bob +10\.0\.0\.2:4000 +on hostb:9999", d.text) for d in shown)
    came = p.handle_event(__import__("chatlog.events", fromlist=["Connected"]).Connected(2, "127.0.0.1", 5002, 5.3))
    assert any(type(d) is Send and b"Welcome to the room: 3 here." in d.data for d in came)  # bob counts
    taken = p.handle_event(_line(2, "me too", "bob", at=5.4))
    assert any(type(d) is Send and b"taken" in d.data for d in taken)  # one name, one person, across the room
    for how in ("bob", "10.0.0.2:4000"):  # by handle, or by address as \who shows it
        kick = p.handle_event(OperatorLine(f"\\kick {how}", 5.5))
        (pub,) = [d for d in kick if type(d) is Publish]
        assert pub.what == "kick" and json.loads(pub.data) == {"server": "srvB", "conn": 4}
    # Asked of us by another server: our own kick, its leave through the stream.
    out = p.handle_event(KickAsked(1, "srvB", 6.0))
    assert any(type(d) is End and d.conn == 1 and d.reason == "kicked" for d in out)
    assert any(type(d) is Publish and b'"left"' in d.data for d in out)
    # A server not heard from for a while has nobody.
    p.handle_event(Roster("srvC", "hostc:1", [[1, "carol", "x:1"]], 20.0))
    assert [name for name, _, _ in p.room.elsewhere] == ["carol"]


def test_people_joining_by_the_hundred_are_announced_ten_times_a_second_not_once_each():
    """Each announcement is the whole list of who is here, and every other server takes it
    whole: announced at every join, a room filling up cost each server its size squared (200
    joins in a second were 200 lists of up to 200 people, a stall of every linked server). A
    change is announced at once after a quiet while, then ROSTER_GAP after the last at the
    soonest, with everything that changed meanwhile; the policy asks for a Tick then."""
    import json

    from chatlog.events import Connected, Publish, Tick
    from chatlog.link import ROSTER_GAP

    def who(out):
        return [json.loads(d.data) for d in out if type(d) is Publish and d.what == "who"]

    p = _policy()
    first = p.handle_event(_line(1, "hi", "alice", at=2.0))
    assert [[h for _, h, _ in people] for people in who(first)] == [["alice"]]  # at once: a quiet while before
    assert p.deadline() is None
    said = []
    for i in range(2, 202):
        at = 2.0 + i * ROSTER_GAP / 250  # 200 more before the gap is over
        said += who(p.handle_event(Connected(i, "127.0.0.1", 5000 + i, at)))
        said += who(p.handle_event(_line(i, "hello", f"u{i}", at=at)))
    assert said == []  # none of them yet: the last announcement was less than ROSTER_GAP ago
    assert p.deadline() == 2.0 + ROSTER_GAP
    (everyone,) = who(p.handle_event(Tick(2.0 + ROSTER_GAP)))
    assert len(everyone) == 201  # one announcement with all of them
    assert p.deadline() is None
    assert who(p.handle_event(Tick(3.0))) == []  # nothing changed since
    # The clock set back an hour: a change is not held until it catches up.
    p.handle_event(Connected(300, "127.0.0.1", 6000, 3.0))
    (again,) = who(p.handle_event(_line(300, "back", "late", at=3.0 - 3600)))
    assert "late" in [h for _, h, _ in again]


def test_a_roster_heard_again_unchanged_costs_nothing_but_its_time():
    from chatlog.link import ROSTER_STALE, Roster

    p = _policy()
    people = [[i, f"u{i}", f"10.0.0.2:{i}"] for i in range(100)]
    p.handle_event(Roster("srvB", "hostb:1", people, 5.0))
    before = p.room.elsewhere
    assert len(before) == 100
    p.handle_event(Roster("srvB", "hostb:1", [list(x) for x in people], 5.0 + ROSTER_STALE - 1))
    assert p.room.elsewhere is before  # nothing rebuilt
    p.handle_event(Roster("srvC", "hostc:1", [[1, "carol", "x:1"]], 5.0 + 2 * ROSTER_STALE - 1.5))
    assert [n for n, _, _ in p.room.elsewhere][-1] == "carol" and len(p.room.elsewhere) == 101  # heard in time
    p.handle_event(Roster("srvC", "hostc:1", [[1, "carol", "x:1"]], 5.0 + 3 * ROSTER_STALE))
    assert [n for n, _, _ in p.room.elsewhere] == ["carol"]  # srvB not heard for too long: nobody there
    assert p.room.names.holder("u1") is None and p.room.names.holder("carol") == "carol"


def test_policy_a_gone_servers_people_leave_on_the_record_under_one_id_each():
    """Not heard of for ROSTER_STALE while this server's own link has been up that long, and
    this server's own announcement heard back since (so nothing it took for silence was still
    queued behind a backlog): that run's people leave, each its own publication with that
    person's id on that run (the broker keeps one of however many servers say it). Silence
    while our own link was down proves nothing; a server heard again is not gone; a server
    that started again left its last run's people."""
    import json

    from chatlog.events import Publish, Tick
    from chatlog.link import ROSTER_STALE, Echo, LinkState, Roster

    def gone(out):
        return [(g["o"], g["r"], g["k"], g["l"], g["b"]["c"][0]["h"], g["b"]["c"][0]["t"], g["b"]["c"][0]["n"])
                for g in (json.loads(d.data) for d in out if type(d) is Publish and d.what == "gone")]

    p = _policy()
    p.handle_event(Roster("srvB", "hostb:1", [[4, "bob", "10.0.0.2:4000"], [5, "dan", "10.0.0.2:4001"]], 5.0, "7"))
    assert gone(p.handle_event(Tick(5.0 + ROSTER_STALE - 0.5))) == []
    # Silent for long enough, but our own announcement not heard back since (a backlog, say).
    assert gone(p.handle_event(Tick(5.0 + ROSTER_STALE + 2.5))) == []
    assert p.room.names.holder("bob") is None  # (\who no longer lists them meanwhile)
    out = p.handle_event(Echo(5.0 + ROSTER_STALE + 3.0))
    assert gone(out) == [("srvB", "7", 4, "hostb:1", "bob", "left", "server-gone"),
                         ("srvB", "7", 5, "hostb:1", "dan", "left", "server-gone")]
    assert gone(p.handle_event(Tick(40.0)) + p.handle_event(Echo(40.0))) == []  # said once
    # Our own link was down: the others' silence proves nothing, and they are heard again.
    q = _policy()
    q.handle_event(Roster("srvB", "hostb:1", [[4, "bob", "10.0.0.2:4000"]], 5.0, "7"))
    q.handle_event(LinkState(False, "lost the broker", 6.0))
    q.handle_event(LinkState(True, "linked", 12.0))
    assert gone(q.handle_event(Echo(13.0)) + q.handle_event(Tick(13.5))) == []
    assert gone(q.handle_event(Roster("srvB", "hostb:1", [[4, "bob", "10.0.0.2:4000"]], 14.0, "7"))) == []
    assert gone(q.handle_event(Tick(19.0)) + q.handle_event(Echo(19.5))) == []
    assert q.room.names.holder("bob") == "bob"
    # Started again (a new run) before anyone noticed: who was on its last run is gone.
    r = _policy()
    r.handle_event(Roster("srvB", "hostb:1", [[4, "bob", "10.0.0.2:4000"]], 5.0, "7"))
    r.handle_event(Roster("srvB", "hostb:1", [[1, "eve", "10.0.0.2:4002"]], 8.0, "8"))
    assert gone(r.handle_event(Echo(11.5))) == [("srvB", "7", 4, "hostb:1", "bob", "left", "server-gone")]


def test_policy_a_stalled_broker_is_no_reason_to_take_anyone_for_gone():
    """The broker stopped (SIGSTOP) for 10 s and went on: this server's own announcements, made
    meanwhile, came back before the other server's (the broker takes each connection's in turn),
    so its people were taken for gone, and then were back: a leaving and a joining on every
    record for nothing (a probe). An announcement of ours that comes back late says the link
    stalled: the others' silence proves nothing until it has worked for ROSTER_STALE again."""
    import json

    from chatlog.events import Publish, Tick
    from chatlog.link import ECHO_LATE, ROSTER_STALE, Echo, Roster

    def gone(out):
        return [json.loads(d.data)["b"]["c"][0]["h"] for d in out if type(d) is Publish and d.what == "gone"]

    bob = [[4, "bob", "10.0.0.2:4000"]]
    p = _policy()
    p.handle_event(Roster("srvB", "hostb:1", bob, 5.0, "7"))
    p.handle_event(Echo(5.1, 5.0))
    # stopped from 6 to 16: ours, made at 7 ... 15, come back at 16, before srvB's
    said = []
    for sent in (7.0, 9.0, 11.0, 13.0, 15.0):
        said += p.handle_event(Echo(16.0, sent)) + p.handle_event(Tick(16.0))
    assert 16.0 - 15.0 < ECHO_LATE < 16.0 - 13.0  # (the last one was not late: the first ones were)
    said += p.handle_event(Roster("srvB", "hostb:1", bob, 16.05, "7"))
    for at in (17.0, 18.0, 20.0, 22.0, 24.0):
        said += p.handle_event(Roster("srvB", "hostb:1", bob, at, "7")) + p.handle_event(Echo(at + 0.01, at))
    assert gone(said) == [] and p.room.names.holder("bob") == "bob"
    # srvB killed in a stall: once the link has worked for ROSTER_STALE, its people are gone.
    q = _policy()
    q.handle_event(Roster("srvB", "hostb:1", bob, 5.0, "7"))
    assert gone(q.handle_event(Echo(16.0, 7.0)) + q.handle_event(Tick(16.0 + ROSTER_STALE - 0.5))) == []
    assert gone(q.handle_event(Echo(16.0 + ROSTER_STALE + 0.5, 16.0 + ROSTER_STALE + 0.5))) == ["bob"]
    # An echo from a server that does not say when it made it: as before.
    r = _policy()
    r.handle_event(Roster("srvB", "hostb:1", bob, 5.0, "7"))
    assert gone(r.handle_event(Echo(16.0))) == ["bob"]


def test_policy_a_gone_persons_leaving_has_one_id_whatever_each_servers_lists_said_when():
    """The id is the person's run and joining as the stream brought it: it was the sequence of
    their claim, which a server drops when a list that lags does not show them yet, so two
    servers could say one leaving under two ids (two rows on every record; a loaded CI saw it)."""
    import json

    from chatlog.events import Publish
    from chatlog.link import Arrived, Echo, Roster

    a, b = _policy(), _policy()
    body = json.loads([d for d in a.handle_event(_line(1, "\\join", "zed")) if type(d) is Publish][0].data)
    b.handle_event(Arrived(3, "srvA", "1.1", "hosta:1", body, False, 0, 5.0))
    b.handle_event(Roster("srvA", "hosta:1", [], 6.5, "1"))  # its list, not showing zed yet
    b.handle_event(Roster("srvA", "hosta:1", [[1, "zed", "127.0.0.1:5001"]], 7.0, "1"))
    out = b.handle_event(Echo(20.0))
    assert [(g["r"], g["e"], g["k"]) for g in (json.loads(d.data) for d in out if type(d) is Publish)] == [("1", 3, 1)]


def test_policy_people_taken_for_gone_while_their_server_was_cut_off_are_back_on_the_record():
    import json

    from chatlog.events import Broadcast, Publish
    from chatlog.link import Arrived, LinkState

    p = _policy()
    p.handle_event(_line(1, "hi", "alice"))
    body = {"c": [{"k": 1, "s": "event", "h": "alice", "t": "left", "r": None, "n": "server-gone", "at": 9.0,
                   "v": False}], "w": [], "b": [["*** alice left: their server stopped answering\n", None]]}
    out = p.handle_event(Arrived(9, "me", "1-gone.1", "hosta:1", body, False, 1, 9.5, True, True, True))
    assert not [d for d in out if type(d) is Broadcast]  # alice never left here: not told she did
    (pub,) = [d for d in out if type(d) is Publish]
    (joined,) = json.loads(pub.data)["c"]
    assert (joined["k"], joined["h"], joined["t"], joined["n"]) == (1, "alice", "joined", "back")
    # The stream may bring it before the news that the link is up: then said as it comes up.
    q = _policy()
    q.handle_event(_line(1, "hi", "alice"))
    q.handle_event(LinkState(False, "lost the broker", 8.0))
    out = q.handle_event(Arrived(9, "me", "1-gone.1", "hosta:1", body, False, 1, 9.5, True, True, True))
    assert not [d for d in out if type(d) in (Publish, Broadcast)]
    up = q.handle_event(LinkState(True, "linked again", 9.6))
    (joined,) = [c for d in up if type(d) is Publish and d.what == "line" for c in json.loads(d.data)["c"]]
    assert (joined["h"], joined["t"], joined["n"]) == ("alice", "joined", "back")
    assert any(b"alice is back" in cast.encode() for d in up if type(d) is Publish and d.what == "line"
               for cast, _ in json.loads(d.data)["b"])


def test_one_name_claimed_on_two_servers_at_once_is_the_first_claimants_by_the_stream():
    """Each server checks a claim against what it has heard of the others, and both claims can
    be made before either hears of the other. The stream's order is every server's: the claim
    that comes first keeps the name, and the server whose person claimed it second (it reads
    the same order) takes it back from them: recorded as their leaving under it, everyone
    told; they stay, and must choose another."""
    import json

    from chatlog.events import Broadcast, Publish, Send
    from chatlog.link import Arrived, LinkCommit

    a, b = _policy(), _policy()
    pub_a = [d for d in a.handle_event(_line(1, "\\join", "bob")) if type(d) is Publish and d.what == "line"][0]
    pub_b = [d for d in b.handle_event(_line(1, "\\join", "bob")) if type(d) is Publish and d.what == "line"][0]
    first, second = json.loads(pub_a.data), json.loads(pub_b.data)
    # The stream: a's claim (7), then b's (8); each server reads both in that order.
    kept = a.handle_event(Arrived(7, "srvA", "1.1", "hosta:1", first, True, pub_a.ref, 2.1, True, True))
    kept += a.handle_event(Arrived(8, "srvB", "4.1", "hostb:1", second, False, 0, 2.2))
    assert not [d for d in kept if type(d) is Publish and b"name-taken" in d.data]  # a's bob keeps it
    b.handle_event(Arrived(7, "srvA", "1.1", "hosta:1", first, False, 0, 2.1))
    gave = b.handle_event(Arrived(8, "srvB", "4.1", "hostb:1", second, True, pub_b.ref, 2.2, True, True))
    (left,) = [json.loads(d.data) for d in gave if type(d) is Publish and d.what == "line"]
    assert [(c["s"], c["h"], c["t"], c["n"]) for c in left["c"]] == [("event", "bob", "left", "name-taken")]
    assert left["b"] == [["SERVER>*** bob left: the name was taken first on hosta:1\n", 1]]
    (told,) = [d.data for d in gave if type(d) is Send and d.conn == 1]
    assert b"The handle bob was taken first on hosta:1" in told and b"choose another" in told
    assert b.room.people[1].handle is None
    # b's person, still sending as bob, is refused: a's bob has it, for b too.
    again = b.handle_event(_line(1, "hello", "bob", at=2.3))
    assert not [d for d in again if type(d) is Publish and d.what == "line" and b'"v":false}],"w":[["client"' in d.data]
    assert any(type(d) is Send and b"taken" in d.data for d in again)
    assert not any(type(d) is Broadcast for d in again)
    # Their leaving under it, back through the stream: a forgets b's claim; a's bob is alone.
    a.handle_event(Arrived(9, "srvB", "4.2", "hostb:1", left, False, 0, 2.4))
    assert a.claims == {} and a.room.names.holder("bob") == "bob"
    assert b.handle_event(Arrived(9, "srvB", "4.2", "hostb:1", left, True, 2, 2.4, True, True))
    assert [d.note for d in b.handle_event(Arrived(9, "srvB", "4.2", "hostb:1", left, True, 2, 2.4, True, True))
            if type(d) is LinkCommit] == ["name-taken"]


def test_a_name_claimed_on_another_server_is_taken_here_before_its_list_comes():
    """Between another server's claim reaching here through the stream and its list of who is
    there (up to ROSTER_GAP later), a claim here of the same name is refused at once."""
    import json

    from chatlog.events import Connected, Publish, Send
    from chatlog.link import Arrived

    b = _policy()
    b.handle_event(Connected(2, "127.0.0.1", 5002, 2.0))
    a = _policy()
    body = json.loads([d for d in a.handle_event(_line(1, "\\join", "zed")) if type(d) is Publish][0].data)
    b.handle_event(Arrived(3, "srvA", "1.1", "hosta:1", body, False, 0, 2.1))
    out = b.handle_event(_line(2, "\\join", "ZED", at=2.15))  # (a look-alike: the same rule)
    assert any(type(d) is Send and b"ZED looks like zed, who is here; choose another" in d.data for d in out)
    assert not any(type(d) is Publish and b'"joined"' in d.data for d in out)


def test_other_servers_are_forgotten_when_nobody_else_announces():
    """A server that stops (kill -9, a lost host) announces nothing more: its people and the
    names they claimed are forgotten after ROSTER_STALE even when no other server is left to
    announce anything (the policy asks for Ticks while it knows of any)."""
    import json

    from chatlog.events import Publish, Tick
    from chatlog.link import ROSTER_EVERY, ROSTER_STALE, Arrived, Echo, Roster

    b = _policy()
    a = _policy()
    body = json.loads([d for d in a.handle_event(_line(1, "\\join", "zed")) if type(d) is Publish][0].data)
    b.handle_event(Arrived(3, "srvA", "1.1", "hosta:1", body, False, 0, 5.0))
    b.handle_event(Roster("srvA", "hosta:1", [[1, "zed", "127.0.0.1:5001"]], 5.0))
    assert b.room.elsewhere and b.room.names.holder("zed") == "zed"
    assert b.deadline() is not None
    at = 5.0
    while b.deadline() is not None and at < 5.0 + 10 * ROSTER_STALE:
        at = max(at, b.deadline())
        said = b.handle_event(Tick(at)) + b.handle_event(Echo(at))  # (its own announcements come back)
        at += 0.01
    assert at <= 5.0 + ROSTER_STALE + ROSTER_EVERY + 0.1
    assert b.room.elsewhere == [] and b.room.names.holder("zed") is None and b.claims == {}
    assert [json.loads(d.data)["b"]["c"][0]["h"] for d in said if type(d) is Publish] == ["zed"]  # left, on the record


def _burst(conn, texts, handle="alice", at=2.0):
    """A read of `texts` from one client, framed as the loop frames it."""
    from chatlog.events import ReceivedLines
    from chatlog.protocol import Framer

    data = b"".join(f"{handle}>{t}\n".encode() for t in texts)
    return ReceivedLines(conn, Framer().feed(data, at))


def test_a_read_of_plain_lines_is_one_publication_and_one_batch_of_rows_on_every_server():
    """A burst went through the stream a line at a time: one publication, one stream item,
    one row written and one relay per line, on every server (a linked room took a burst at a
    fifteenth of one server's rate). A read's run of plain lines is one entry now; its rows are
    numbered as before (a publication's rows in order), so the archives and a kept copy agree."""
    import json

    from chatlog.events import Broadcast, Publish, ShowLines
    from chatlog.link import Arrived, LinkCommit, LinkLines, LinkState

    p = _policy()
    p.handle_event(_line(1, "hi", "alice"))  # (its handle known: the burst is plain lines)
    texts = [f"line {i}" for i in range(50)]
    out = p.handle_event(_burst(1, texts[:20] + ["caf\u00e9"] + texts[20:]))
    (pub,) = [d for d in out if type(d) is Publish and d.what == "line"]
    body = json.loads(pub.data)
    assert [("L" in c, len(c.get("L", [1]))) for c in body["c"]] == [(True, 20), (False, 1), (True, 30)]
    # Back from the stream: three writes, the rows numbered 0..50 in the order said.
    back = p.handle_event(Arrived(9, "srvA", "1.2", "hosta:1", body, True, pub.ref, 2.1, True, True))
    writes = [d for d in back if type(d) in (LinkLines, LinkCommit)]
    assert [(type(d).__name__, getattr(d, "first", None)) for d in writes] == [
        ("LinkLines", 0), ("LinkCommit", None), ("LinkLines", 21)]
    assert writes[1].oid == "1.2.20" and writes[1].text == "caf\u00e9"
    assert [t for t, _ in writes[2].lines] == texts[20:]
    assert sum(len(d.texts) for d in back if type(d) is ShowLines) == 50
    assert len([d for d in back if type(d) is Broadcast]) == 3
    # Another server's copy: the same rows, with no connection of ours.
    there = p.handle_event(Arrived(9, "srvA", "1.2", "hosta:1", body, False, 0, 2.1))
    assert [(type(d).__name__, getattr(d, "first", None), d.conn) for d in there if type(d) in (LinkLines, LinkCommit)] == [
        ("LinkLines", 0, None), ("LinkCommit", None, None), ("LinkLines", 21, None)]
    # Kept here alone (the link down): a row each, numbered the same way.
    p.handle_event(LinkState(False, "down", 3.0))
    kept = [d for d in p.handle_event(_burst(1, texts[:3] + ["caf\u00e9"] + texts[3:5], at=3.1)) if type(d) is LinkCommit]
    assert [(d.oid.split(".", 1)[1], d.text) for d in kept] == [
        ("0", "line 0"), ("1", "line 1"), ("2", "line 2"), ("3", "caf\u00e9"), ("4", "line 3"), ("5", "line 4")]
    assert all("not relayed" in d.note for d in kept)


def test_a_run_of_lines_the_archive_has_already_is_not_recorded_twice(tmp_path):
    """A publication the stream brings twice (a retry after the broker's duplicate window):
    the batch finds a row it has, writes none of the batch so, and takes each line alone."""
    import time

    from chatlog.recorder import open_recorder

    r = open_recorder(tmp_path / "x.db")
    r.start("127.0.0.1", 0, time.time())
    sid = r.begin_session("127.0.0.1", 0, "127.0.0.1", 0, time.time(), served=True)
    lines = [(f"l{i}", 5.0 + i) for i in range(5)]
    oids = [f"1.1.{i}" for i in range(5)]
    with r.transaction():
        r.add_linked_lines(sid, "amy", lines[1:3], None, False, "srvA", oids[1:3], 7)
    with r.transaction():
        r.add_linked_lines(sid, "amy", lines, None, False, "srvA", oids, 7)
    with r.transaction():
        r.add_linked_lines(sid, "amy", lines, None, False, "srvA", oids, 8)
    got = r.conn.execute("SELECT seq, text, origin_id, stream_seq FROM messages ORDER BY id").fetchall()
    assert [t for _, t, _, _ in got] == ["l1", "l2", "l0", "l3", "l4"]
    assert [s for s, _, _, _ in got] == [1, 2, 3, 4, 5] and {x for _, _, _, x in got} == {7}
    r.close()


def test_a_line_kept_as_not_relayed_that_the_stream_brings_after_all_is_relayed_on_the_record(tmp_path):
    """The broker took a line but its confirmation came too late: kept here alone, marked "not
    relayed: the broker did not take it"; when the stream brought it, the row got its sequence
    but kept that note, so this archive said not relayed where every other said nothing (a
    loaded test run compared them)."""
    import time

    from chatlog.recorder import open_recorder

    r = open_recorder(tmp_path / "x.db")
    r.start("127.0.0.1", 0, time.time())
    sid = r.begin_session("127.0.0.1", 0, "127.0.0.1", 0, time.time(), served=True)
    r.add_linked(sid, "client", "amy", "hi", None, "not relayed: the broker did not take it", 5.0, None, False,
                 "me", "1.3.0", None)
    r.add_linked(sid, "client", "amy", "hi", None, None, 5.0, None, False, "me", "1.3.0", 7)
    r.add_linked(sid, "event", "amy", "left", None, "disconnect; not relayed: the broker did not take it", 6.0,
                 None, False, "me", "1.4.0", None)
    r.add_linked(sid, "event", "amy", "left", None, "disconnect", 6.0, None, False, "me", "1.4.0", 8)
    got = r.conn.execute("SELECT text, note, stream_seq FROM messages ORDER BY id").fetchall()
    assert got == [("hi", None, 7), ("left", "disconnect", 8)]
    r.close()


def test_a_kept_line_the_stream_brings_after_all_takes_its_place_in_the_stream_order(tmp_path):
    """A line kept here alone (the broker stalled: not confirmed in time) that the stream stored
    after another server's line: every other archive has that line first, so this one must too.
    It kept its place from when it was said, so the archives' transcripts differed (a probe with
    the broker stopped by SIGSTOP for 10 s)."""
    import time

    from chatlog.recorder import open_recorder

    here, there = open_recorder(tmp_path / "a.db"), open_recorder(tmp_path / "b.db")
    sids = []
    for r in (here, there):
        r.start("127.0.0.1", 0, time.time())
        sids.append(r.begin_session("127.0.0.1", 0, "127.0.0.1", 0, time.time(), served=True))
    kept = ("client", "amy", "hi", None, None, 5.0, None, False, "srvA", "1.3.0")
    gone = ("event", "amy", "left", None, "server-gone", 6.0, None, False, "srvB", "2.9.0")
    here.add_linked(sids[0], *kept[:4], "not relayed: the broker did not take it", *kept[5:], None)
    here.add_linked(sids[0], *gone, 7)
    here.add_linked(sids[0], *kept, 8)
    there.add_linked(sids[1], *gone, 7)
    there.add_linked(sids[1], *kept, 8)
    for r in (here, there):
        r.close()
    a, b = rows(tmp_path / "a.db"), rows(tmp_path / "b.db")
    assert [x[2] for x in a] == [7, 8] and a == b
    # and the transcript, as anyone reads it, has the stream's order
    for db in ("a.db", "b.db"):
        out = run_chatlog(tmp_path / db, "show", "1").output
        assert out.index("amy left (their server stopped answering)\n") < out.index("amy>hi\n")


def test_a_burst_over_the_link_arrives_whole_in_order_and_the_archives_agree(tmp_path, linked):
    a, b = linked("a", "--rate", "0"), linked("b", "--rate", "0")
    bob = Peer(b, "bob")
    a.wait_for(r"^bob joined \(on ")
    alice = Peer(a, "alice")
    bob.until(b"*** alice joined\n")
    n = 2000
    alice.sock.sendall(b"".join(b"alice>burst %d\n" % i for i in range(n)))
    bob.until(b"alice>burst %d\n" % (n - 1))
    got = [line for line in bob.lines() if line.startswith("alice>burst ")]
    assert got == [f"alice>burst {i}" for i in range(n)]
    settled(tmp_path / "a.db", tmp_path / "b.db")
    assert_same_archives(tmp_path / "a.db", tmp_path / "b.db")
    assert len(rows(tmp_path / "b.db", "text LIKE 'burst %'")) == n


def test_a_stream_message_not_from_a_chatlog_server_is_skipped_never_a_crash():
    """Anything on the room's subject (another program, another version) is counted and
    skipped: the stream moves on, nothing of it is recorded, shown or relayed. What is shown
    from another server is made safe again here: it came over the network."""
    from chatlog.events import Broadcast, Show, ShowLines
    from chatlog.link import Advance, Arrived, LinkCommit, LinkLines

    line = {"k": 1, "s": "client", "h": "bob", "t": "hi", "r": None, "n": None, "at": 2.0, "v": False}
    bad = [
        None, [], "text", {"c": "x", "w": [], "b": []}, {"c": [], "w": [], "b": [[1, None]]},
        {"c": [{"s": "client"}], "w": [], "b": []},
        {"c": [dict(line, t=5)], "w": [], "b": []},
        {"c": [dict(line, at="now")], "w": [], "b": []},
        {"c": [{"k": 1, "s": "client", "h": "bob", "L": [["a", 1.0], ["b"]]}], "w": [], "b": []},
        {"c": [{"k": 1, "h": "bob", "L": [["a", 1.0]]}], "w": [], "b": []},
        {"c": [{"k": 1, "s": "event", "h": "bob", "L": [["a", 1.0]]}], "w": [], "b": []},
        {"c": [line], "w": [["shout", "hi", "bob"]], "b": []},
        {"c": [line], "w": [["client", "hi"]], "b": []},
    ]
    p = _policy()
    for seq, body in enumerate(bad, 10):
        out = p.handle_event(Arrived(seq, "srvB", "4.1", "hostb:1", body, False, 0, 3.0))
        assert [type(d) for d in out] == [Advance, Show], body
        assert out[1].kind == "error" and "is not a chatlog line; skipped" in out[1].text
    shown = p.handle_event(Arrived(99, "srvB", "4.2", "hostb:1", {
        "c": [line, {"k": 1, "s": "client", "h": "bob", "L": [["x", 2.0], ["y", 2.0]]}],
        "w": [["client", "hi\x1b[2J", "bob\x07"], ["client", ["x\x1b", "y"], "bob"]],
        "b": [["bob>hi\n", None]]}, False, 0, 3.0))
    assert [type(d) for d in shown if type(d) in (LinkCommit, LinkLines)] == [LinkCommit, LinkLines]
    texts = [d.text for d in shown if type(d) is Show] + [t for d in shown if type(d) is ShowLines for t in d.texts]
    assert texts == ["hi\\x1b[2J", "x\\x1b", "y"]
    assert [d.handle for d in shown if type(d) is Show] == ["bob\\x07"]
    assert [d.data for d in shown if type(d) is Broadcast] == [b"bob>hi\n"]


def test_the_link_takes_the_stream_in_order_and_asks_again_from_a_gap():
    """What the consumer delivers out of order (a gap after a slow consumer's drops, a repeat
    after a consumer made again) never reaches the loop out of order: a repeat is dropped, a gap
    asks for the stream again from the first sequence missing, once."""
    import asyncio
    import json
    from types import SimpleNamespace

    from chatlog.link import Arrived, BrokerLink

    link = BrokerLink("nats://127.0.0.1:1")
    link.uid, link.run, link.label, link.next_seq, link.live_from = "me", 5, "vm:1", 1, 1
    asked = []

    async def resubscribe():
        asked.append(link.next_seq)

    link._resubscribe = resubscribe

    def msg(seq, origin="other", refs=(1,)):
        body = json.dumps([[r, {"c": [], "w": [], "b": []}] for r in refs]).encode()
        return SimpleNamespace(metadata=SimpleNamespace(sequence=SimpleNamespace(stream=seq)), data=body,
                               headers={"Chatlog-Origin": origin, "Chatlog-Run": "5", "Chatlog-Server": "x:1"})

    async def deliver():
        for m in (msg(1), msg(1), msg(3), msg(2, "me", (7, 8)), msg(3)):
            await link._on_msg(m)
            await asyncio.sleep(0)

    asyncio.run(deliver())
    got = link.take(100, 0.0)
    assert [(e.seq, e.ref, e.mine) for e in got if type(e) is Arrived] == [(1, 1, False), (2, 7, True), (2, 8, True), (3, 1, False)]
    assert asked == [2]  # the gap at 3: asked again from 2, once
    link.wake.close()


def test_merge_takes_an_archive_from_before_linked_rooms_as_it_is(tmp_path):
    from storebuild import schema_before

    old = tmp_path / "old.db"
    conn = schema_before(old, "m014")
    conn.execute("INSERT INTO sessions (started_at, client_host, client_port) VALUES ('2026-01-01 00:00:00', '1.2.3.4', 5)")
    conn.execute("INSERT INTO messages (session_id, seq, at, sender, handle, text) VALUES (1, 1, '2026-01-01 00:00:01', 'client', 'zed', 'old words')")
    conn.close()
    before = old.read_bytes()
    out = tmp_path / "all.db"
    assert run_chatlog(None, "merge", str(old), "-o", str(out)).exit_code == 0
    again = run_chatlog(None, "merge", str(old), "-o", str(out))
    assert "0 new sessions, 0 new messages" in again.output
    assert old.read_bytes() == before  # only read
    assert "zed>old words" in run_chatlog(out, "show", "1").output
    r = run_chatlog(None, "merge", str(tmp_path / "nothing.txt"), "-o", str(out))
    assert r.exit_code != 0


def _one_line(kind, seq):
    from chatlog.link import LinkCommit, LinkLines

    if kind == "a client's plain line":  # (a run of one: what a paced room's stream brings)
        return LinkLines(None, "amy", [(f"line {seq}", time.time())], False, "b0b0", f"7.{seq}", 0, seq)
    return LinkCommit(None, "client", "amy", f"line {seq}", None, None, time.time(), False, "b0b0", f"7.{seq}", seq)


@pytest.mark.parametrize("kind", ["a client's plain line", "a line"])
def test_lone_lines_carry_the_streams_position_and_a_restart_resumes_from_the_newest(tmp_path, kind):
    """A stream message of one line is recorded by that line alone (one INSERT, which carries its
    sequence), the position written down at most once a second: a server killed before it was
    resumes from its newest line, not from the position written, and writes it down."""
    from chatlog.link import Advance, LinkedRoomStore
    from chatlog.recorder import open_recorder

    db = tmp_path / "a.db"
    rec = open_recorder(db)
    rec.start("127.0.0.1", 9999, time.time())
    store = LinkedRoomStore(rec, None, name="lab")
    store.session = rec.begin_session("", 0, "127.0.0.1", 9999, time.time(), served=True, kind="room", room="lab")
    assert rec.link_resume("lab", "CHATLOG_lab") == 0
    for seq in range(1, 51):
        store.record([_one_line(kind, seq), Advance(seq)])
    written = db_rows(db, "SELECT last_seq FROM room_links")[0][0]
    assert 1 <= written < 50  # (the first at once, then at most once a second)
    assert last_seq(db) == 50
    again = open_recorder(db)  # (the first never closed: as after kill -9)
    assert again.link_resume("lab", "CHATLOG_lab") == 50
    assert db_rows(db, "SELECT last_seq FROM room_links") == [(50,)]
    assert db_rows(db, "SELECT count(*), min(stream_seq), max(stream_seq) FROM messages WHERE text LIKE 'line %'") == [(50, 1, 50)]
    store = LinkedRoomStore(again, None, name="lab")
    store.session = again.begin_session("", 0, "127.0.0.1", 9999, time.time(), served=True, kind="room", room="lab")
    for seq in range(51, 61):
        store.record([_one_line(kind, seq), Advance(seq)])
    from chatlog.events import CloseRoom

    store.record([CloseRoom("shutdown", time.time())])  # the room ends: its position written down as it is
    assert db_rows(db, "SELECT last_seq FROM room_links") == [(60,)]


def test_a_linked_server_whose_disk_fills_stops_and_takes_its_place_again(tmp_path, broker, linked, tmpfs):
    """Its disk full, a linked server cannot commit what the stream brings: it relays none of
    it, tells its people, stops with one clear line, and its people leave the other servers'
    records; the room goes on there. With room on its disk again it starts, resumes from what it
    had committed, and the archives agree."""
    disk = tmpfs("2m")
    db = disk / "a.db"

    def start_a():
        s = ServerProc(db, "--room", "--name", "lab", "--link", broker.url, "--rate", "0")
        s.wait_for(r"^linked to nats://")
        return s

    a, b = start_a(), linked("b", "--rate", "0")
    alice, bob, carol = Peer(a, "alice"), Peer(b, "bob"), Peer(b, "carol")
    alice.until(b"*** carol joined\n")
    filler = disk / "filler"
    # All but the last few pages of the disk. Unbuffered: a buffer holding what the full disk
    # refused failed the test as the file closed, whenever the space left ended mid-buffer.
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 16384)
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - 96 * 1024))
    said = 0
    deadline = time.monotonic() + 60
    while a.proc.poll() is None and time.monotonic() < deadline:
        bob.send(f"bob>{said} " + "x" * 480)
        said += 1
        carol.until(f"bob>{said - 1} ".encode())  # (the stream took it)
    assert a.proc.poll() is not None, "a never filled its disk"
    err = a.stderr_text()
    assert err.startswith(f"chatlog: cannot write the database {db}: disk is full") and err.count("\n") == 1, err
    assert "Traceback" not in a.output
    alice.until(NOTICES["store"].encode())
    # a relayed nothing it had not committed: every line alice saw of bob's is in a's archive
    shown = re.findall(rb"bob>(\d+) x+\n", alice.buf)
    kept = {r[5].split()[0] for r in rows(db) if r[4] == "bob"}
    assert shown and {s.decode() for s in shown} <= kept
    bob.until(b"*** alice left", timeout=30)
    bob.send("bob>while a is away")
    carol.until(b"bob>while a is away\n")
    filler.unlink()
    a.stop()
    a = start_a()
    settled(tmp_path / "b.db", db)
    assert_same_archives(tmp_path / "b.db", db)
    assert any(r[5] == "while a is away" for r in rows(db))
    a.stop()


def test_a_linked_server_whose_database_is_locked_for_a_while_catches_up_whole(tmp_path, broker, linked):
    """Another process holds a's database's write lock while the room goes on at b (5,000 lines,
    2 MB): a says it is waiting, relays nothing it could not commit, and once the lock is let go
    takes up the stream where it was, so both archives hold the same lines, none lost or twice.
    What it relays as it catches up comes a pass's share at a time, as a sender's burst does: a
    client there that reads as it comes gets all of it. (It took up to 512 stream messages a
    pass, whatever they held: the whole backlog in one pass, more than a client may leave
    unread, so everyone there was dropped as a slow reader.)"""
    a, b = linked("a", "--rate", "0"), linked("b", "--rate", "0")
    alice, bob, carol = Peer(a, "alice"), Peer(b, "bob"), Peer(b, "carol")
    alice.until(b"*** carol joined\n")
    n, pad = 5000, "y" * 400
    holder = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for i in range(0, n, 100):  # (a read of 100 lines: one publication)
            bob.sock.sendall("".join(f"bob>held {j} {pad}\n" for j in range(i, i + 100)).encode())
            carol.poll()
        carol.until(f"bob>held {n - 1} ".encode(), timeout=30)
        a.wait_for("locked by another process", timeout=15)
        before = alice.buf.count(b"bob>held ")
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    assert before == 0  # nothing relayed there that was not committed there
    alice.sock.settimeout(30)
    last = f"bob>held {n - 1} ".encode()
    while last not in alice.buf[-1000:]:  # (read as it comes: no search of the whole buffer)
        chunk = alice.sock.recv(1 << 20)
        assert chunk and b"stopped reading" not in alice.buf[-1000:], alice.buf[-300:]
        alice.buf += chunk
    assert re.findall(rb"bob>held (\d+) ", alice.buf) == [str(i).encode() for i in range(n)]
    settled(tmp_path / "b.db", tmp_path / "a.db")
    assert_same_archives(tmp_path / "b.db", tmp_path / "a.db")


def _peak_mb(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _read_to(peer, last: bytes, timeout=60.0) -> int:
    """Read what comes until `last` (keeping only the tail: 40 MB pass through); the number
    of lines of bob's seen."""
    peer.sock.settimeout(timeout)
    seen, rest = 0, b""
    while last not in peer.buf:
        chunk = peer.sock.recv(1 << 20)
        assert chunk, f"closed: {peer.buf[-300:]!r}"
        whole, _, rest = (rest + chunk).rpartition(b"\n")
        seen += whole.count(b"bob>held ")
        peer.buf = (peer.buf + chunk)[-4000:]
        assert b"stopped reading" not in peer.buf, peer.buf[-300:]
    return seen


def test_a_linked_server_far_behind_the_stream_catches_up_in_bounded_memory(tmp_path, broker, linked):
    """100,000 lines (42 MB) said at b while a's database is locked: once it is free, a takes the
    stream up again. What the broker delivers meanwhile waits in the client's own queue, which
    held up to 256 MB (nats-py's default for a JetStream subscription): a's memory grew with the
    backlog (+120 MB for this one). Now that queue holds 16 MB at most (past it the client drops
    what comes and the stream is followed again from where a was), and its own queue of events
    4 MB; its people get every line, in order, and the archives agree."""
    a, b = linked("a", "--rate", "0"), linked("b", "--rate", "0")
    alice, bob, carol = Peer(a, "alice"), Peer(b, "bob"), Peer(b, "carol")
    alice.until(b"*** carol joined\n")
    n, pad = 100_000, "y" * 400
    start = _peak_mb(a.proc.pid)
    holder = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for i in range(0, n, 100):
            bob.sock.sendall("".join(f"bob>held {j} {pad}\n" for j in range(i, i + 100)).encode())
            carol.sock.settimeout(0.001)
            with contextlib.suppress(OSError):
                carol.buf = (carol.buf + carol.sock.recv(1 << 20))[-4000:]
        _read_to(carol, f"bob>held {n - 1} ".encode())
        a.wait_for("locked by another process", timeout=15)
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    assert _read_to(alice, f"bob>held {n - 1} ".encode()) == n
    grew = _peak_mb(a.proc.pid) - start
    assert grew < 80, f"a's peak memory grew {grew:.0f} MB catching up"
    settled(tmp_path / "b.db", tmp_path / "a.db")
    assert_same_archives(tmp_path / "b.db", tmp_path / "a.db")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "SIGINT", "\\quit"])
def test_a_server_that_stops_has_its_people_leave_in_the_others_hearing(tmp_path, broker, linked, how):
    """A linked server stopped (a signal, or its operator's \\quit) ends its part of the room:
    its people are each told, and their leaving reached the other servers' records and consoles,
    but not the people there: bob, on b, was never told that alice had gone."""
    a, b = linked("a"), linked("b")
    alice, bob = Peer(a, "alice"), Peer(b, "bob")
    alice.until(b"*** bob joined\n")
    if how == "\\quit":
        a.say("\\quit")
    else:
        a.proc.send_signal(getattr(signal, how))
    assert a.wait(10) == 0
    bob.until(b"SERVER>*** alice left: their server stopped\n", timeout=10)
    b.wait_for(r"^alice left: shutdown|^alice left: server-quit")
    assert bob.buf.count(b"alice left") == 1
