"""What `chatlog web` costs: a page's server time over loopback (the whole body, as a browser
gets it), the first byte of a streamed transcript, and how soon a line recorded by a real room
reaches a page following it (server-sent events)."""

import re
import socket
import subprocess
import time

from common import CHATLOG, median_spread


class Web:
    """A `chatlog web` process on a free loopback port."""

    def __init__(self, db):
        self.proc = subprocess.Popen([*CHATLOG, "web", "--db", str(db), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not m:
            self.stop()
            raise RuntimeError(f"chatlog web did not start: {line!r} {self.proc.stderr.read().decode()[-300:]}")
        self.port = int(m.group(1))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fetch(port, path, first_byte=False):
    """Seconds to the whole body (or to its first byte) of one GET over HTTP/1.0."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = s.recv(65536)
        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
            raise RuntimeError(f"GET {path}: {head[:100]!r}")
        if first_byte:
            while b"<!DOCTYPE" not in head:
                head += s.recv(65536)
            return time.perf_counter() - t0
        while s.recv(1 << 20):
            pass
    return time.perf_counter() - t0


def timed(port, path, runs=11, first_byte=False):
    fetch(port, path, first_byte)  # warm-up: the file in the page cache
    return median_spread([fetch(port, path, first_byte) for _ in range(runs)])


def follow_latency(db, lines=20):
    """A real room (`chatlog serve --room`) and a page following its session: for each line a
    client says, the seconds from sending it to its arrival on the event stream (the room commits
    it before relaying it, so this includes the commit). Returns the latencies."""
    server = subprocess.Popen([*CHATLOG, "serve", "0", "--room", "--no-operator", "--db", str(db), "--bind", "127.0.0.1"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    web = None
    try:
        port = None
        for _ in range(50):  # the banner says the port
            m = re.search(r"Server started .* port (\d+)", server.stdout.readline().decode())
            if m:
                port = int(m.group(1))
                break
        if port is None:
            raise RuntimeError("chatlog serve --room did not say its port")
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        got = b""
        while b"Type at any time.\n" not in got:
            got += client.recv(4096)
        client.sendall(b"bench>hello\n")
        web = Web(db)
        events = socket.create_connection(("127.0.0.1", web.port), timeout=10)
        events.sendall(b"GET /s/1/live?after=0 HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
        stream = events.makefile("rb")
        seen = b""

        def until(word: bytes):
            nonlocal seen
            while word not in seen:
                line = stream.readline()
                if not line:
                    raise RuntimeError("the event stream ended")
                seen += line
            seen = b""

        until(b"hello")
        latencies = []
        for i in range(lines):
            word = f"mark{i}x".encode()
            t0 = time.perf_counter()
            client.sendall(b"bench>" + word + b"\n")
            until(word)
            latencies.append(time.perf_counter() - t0)
        events.close()
        client.close()
        return latencies
    finally:
        if web is not None:
            web.stop()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
