"""Bounded work per pass: floods of tiny lines from many connections cost a bystander nothing,
memory stays bounded, a stop is prompt, and a reader dropped as slow never sees a spliced line.

Real server processes, real loopback sockets. Each flooder writes what the kernel takes of 64 KiB
of empty lines at once (the rest it never gets to send): the server must leave what it has not
taken in the kernel's buffers."""

import re
import signal
import socket
import threading
import time

import pytest
from conftest import db_rows, recv_until, wait_until

FLOODERS = 20
FLOOD = b"\n" * 65536


def join(server, handle):
    s = server.connect()
    assert recv_until(s, b"\n").startswith(b"SERVER>*** Welcome to the room: ")
    s.sendall(f"{handle}>hi\n".encode())
    return s


def flood(socks, data=FLOOD):
    """Each socket writes what the kernel takes of `data` (its {i}: the socket's index)."""
    for i, s in enumerate(socks):
        s.setblocking(False)
        try:
            s.send(data.replace(b"{i}", b"%d" % i))
        except BlockingIOError:
            pass


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def relay_latency(alice, bob, n: int) -> float:
    """Seconds from alice's line being sent to bob having it, amid whatever else bob gets."""
    tag = f"probe{n}x".encode()
    t0 = time.perf_counter()
    alice.sendall(b"alice>" + tag + b"\n")
    seen = b""
    bob.settimeout(10)
    while b"alice>" + tag + b"\n" not in seen:
        chunk = bob.recv(1 << 20)
        assert chunk, "bob was disconnected"
        seen = seen[-64:] + chunk
    return time.perf_counter() - t0


def prompt_relay(alice, bob, n: int, bound: float = 0.1, tries: int = 3) -> float:
    """The quickest of up to `tries` probes, stopping at the first within `bound`: one probe late
    because the machine's scheduler ran the suite's other workers is taken again, while a server
    busy with a flood delays every try (the fault this guards against took seconds each)."""
    best = float("inf")
    for k in range(tries):
        best = min(best, relay_latency(alice, bob, n * tries + k))
        if best < bound:
            break
    return best


def drain(sock):
    sock.setblocking(False)
    try:
        while sock.recv(1 << 20):
            pass
    except (BlockingIOError, ConnectionError):
        pass
    finally:
        sock.setblocking(True)


@pytest.mark.parametrize("rate, lines", [("20", FLOOD), ("0", FLOOD),
                                         ("0", b"\n\0" * 32768), ("0", b"f{i}>x\n\0" * 9362)],
                         ids=["rate-20", "rate-0", "rate-0-nul-ended", "rate-0-said-lines"])
def test_a_bystander_is_relayed_promptly_while_twenty_connections_flood_empty_lines(start_server, rate, lines):
    """20 connections each write 64 KiB of empty lines at once (one of them alone used to freeze
    the room for 5 s): alice's line still reaches bob within 100 ms, every time, and the server
    stays under 100 MB. With --rate 0 (no limit) each pass still takes a bounded share: of empty
    lines, of lines ended as ./chatclient ends them ("\n\0", split a read at a time), and of
    lines said under a handle (a read's run of them one record and one relay)."""
    server = start_server("--room", "--rate", rate, "--burst", "100")
    alice, bob = join(server, "alice"), join(server, "bob")
    flooders = [join(server, f"f{i}") for i in range(FLOODERS)]
    server.wait_for(r"f19 joined")
    drain(bob)
    relay_latency(alice, bob, 0)
    flood(flooders, lines)
    worst = 0.0
    for n in range(1, 11):
        worst = max(worst, prompt_relay(alice, bob, n))
        flood(flooders, lines)  # more, as the kernel takes it
    assert worst < 0.1, f"a bystander's line took {worst * 1000:.0f} ms"
    assert rss_mb(server.proc.pid) < 100
    t0 = time.perf_counter()
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=10) == 0
    assert time.perf_counter() - t0 < 2.0, "SIGTERM during a flood took too long"
    assert "Traceback" not in server.stderr_text()


def test_sigterm_with_paused_flooders_exits_at_once_in_bounded_memory(start_server):
    """The limiter has paused every flooder and megabytes wait in their sockets: a stop reads
    nothing it refused (its senders are told the server shut down), commits what it took, and
    exits within 2 s."""
    server = start_server("--room", "--rate", "20", "--burst", "100")
    bob = join(server, "bob")
    flooders = [join(server, f"f{i}") for i in range(FLOODERS)]
    server.wait_for(r"f19 joined")
    for _ in range(5):
        flood(flooders)
    wait_until(lambda: server.count("reading paused to that rate") >= FLOODERS)
    peak = rss_mb(server.proc.pid)
    t0 = time.perf_counter()
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=10) == 0
    assert time.perf_counter() - t0 < 2.0
    assert peak < 100
    drain(bob)
    # Nothing past a flooder's allowance was recorded: 100 at once, then 20 a second.
    per = db_rows(server.db, "SELECT handle, count(*) FROM messages WHERE sender = 'client' GROUP BY handle")
    for handle, n in per:
        if handle.startswith("f"):
            assert n < 100 + 20 * 30, (handle, n)
    ends = db_rows(server.db, "SELECT DISTINCT end_reason FROM participants")
    assert ends == [("shutdown",)]


def test_a_reader_dropped_as_slow_never_sees_a_spliced_or_invented_line(start_server):
    """A reader that stops reading is cut at the room's sendq bound: what it got ends in whole
    lines that someone said; the line in flight is finished or nothing more is sent (never the
    queue dropped mid-line with a notice glued on), and nothing is sent after the cut."""
    server = start_server("--room", "--rate", "0")
    stuck = server.connect()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert recv_until(stuck, b"\n").startswith(b"SERVER>*** Welcome")
    stuck.sendall(b"stuck>hi\n")
    talkers = [join(server, f"t{i}") for i in range(3)]
    reading = threading.Event()
    reading.set()

    def keep_reading():  # the talkers read everything, so only `stuck` is slow
        while reading.is_set():
            for t in talkers:
                drain(t)
            time.sleep(0.005)

    reader = threading.Thread(target=keep_reading, daemon=True)
    reader.start()
    lines = {}
    try:
        for i in range(8000):
            t = i % 3
            line = f"t{t}>zanzibar{t} line {i} ".encode() + b"y" * (200 + i % 250) + b"\n"
            talkers[t].sendall(line)
            lines[line.rstrip(b"\n")] = True
            if i % 100 == 0 and server.count(r"stuck \(.*\) left"):
                break
        server.wait_for(r"stuck \(.*\) left: dropped, it stopped reading")
        for _ in range(50):  # broadcasts after the cut must not reach it
            talkers[0].sendall(b"t0>after the cut\n")
        server.wait_for("after the cut")
    finally:
        reading.clear()
        reader.join()
    assert server.count(r"left: dropped") == 1  # the talkers kept up
    got = b""
    stuck.settimeout(10)
    while True:
        chunk = stuck.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    whole, _, tail = got.rpartition(b"\n")
    for line in whole.split(b"\n"):
        ok = (
            line in lines
            or re.fullmatch(rb"SERVER>\*\*\* (Welcome to the room: \d+ here\. Type at any time\.|t\d joined"
                            rb"|You stopped reading what the room sends: disconnected\.)", line)
            or line in (b"\\quit", b"t0>hi", b"t1>hi", b"t2>hi")
        )
        assert ok, f"a line nobody said reached the slow reader: {line[:120]!r}"
    assert b"after the cut" not in got
    # Whatever is left after the last newline is a cut line, never one glued to another.
    assert b"SERVER>" not in tail and b"t0>" not in tail[1:]
