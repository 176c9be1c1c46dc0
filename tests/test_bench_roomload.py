"""The room load generator counts what it should: its own run's lines, whole, once each, whatever
the server adds around them; and it completes a small scenario against the C relay."""
import fcntl
import socket
import struct
import sys
import termios
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import roomload  # noqa: E402


def _listener(load):
    """A Load client reading one end of a real socket pair; returns (client, the other end)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    c = roomload.Client(0, a)
    c.mask = roomload.EVENT_READ
    load.sel.register(a, roomload.EVENT_READ, c)
    load.clients.append(c)
    return c, b


def _unread(sock):
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def _feed(load, c, peer, chunks, want):
    """Send each chunk, waiting until the listener has read it, so each is its own recv()."""
    for chunk in chunks:
        peer.sendall(chunk)
        assert load.loop(lambda: _unread(c.sock) == 0, time.monotonic() + 2)
    load.loop(lambda: c.count >= want, time.monotonic() + 2)


def _stream(load, other_run):
    mine = [load.line(7, n) for n in range(4)]
    theirs = other_run.line(7, 0)
    return mine, [
        b"SERVER>*** Welcome to the room: 3 here. Type at any time.\n",
        b"<user5> " + mine[0] + mine[1][:9],  # ncat's prefix, and a line cut across two reads
        mine[1][9:] + theirs + b"<announce> 127.0.0.1 is connected as <user6>.\n",
        mine[2][:12] + b"<user5> " + mine[2][12:],  # ncat's prefix inside a line: not this line
        mine[3],
    ]


def test_counting_keeps_to_this_runs_lines_and_a_strict_listener_to_whole_ones():
    load, other = roomload.Load(0), roomload.Load(0)
    c, peer = _listener(load)
    c.strict = True
    _, chunks = _stream(load, other)
    _feed(load, c, peer, chunks, 4)
    # four run tags arrived (one line cut after its tag); three lines arrived whole
    assert (c.count, load.delivered, c.intact) == (4, 4, 3)


def test_timing_records_each_line_once_with_its_latency():
    load, other = roomload.Load(0, timing=True), roomload.Load(0)
    c, peer = _listener(load)
    t0 = time.monotonic_ns()
    mine, chunks = _stream(load, other)
    _feed(load, c, peer, chunks, 3)
    assert c.count == 3
    assert load.seen == {(b"7", b"0"), (b"7", b"1"), (b"7", b"3")}
    assert len(load.lat) == 3
    assert all(0 <= x <= time.monotonic_ns() - t0 for x in load.lat)


def test_a_small_fanout_through_the_c_relay_is_complete():
    r = roomload.run("fanout", "relay", clients=5, rate=4, seconds=1)
    assert r["joined"] == 5
    assert r["sent"] >= 15
    assert r["delivered"] == r["expected"] == r["sent"] * 4
    assert r["relayed"] == r["sent"]
    assert r["server_alive"]


def test_the_relay_passes_a_line_written_in_two_halves_whole():
    load = roomload.Load(0)
    with roomload.Target("relay") as t:
        server = t.start(10)
        load.port = server.port
        listener, sender = load.open(2)
        assert load.join([listener, sender], 5) == 2
        line = load.line(1, 0)
        load.send(sender, line[:10])
        load.loop(lambda: False, time.monotonic() + 0.1)
        load.send(sender, line[10:])
        assert load.loop(lambda: listener.count == 1, time.monotonic() + 5)
        load.close_all()
        server.stop()
