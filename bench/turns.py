"""The chat turn: a client sends N messages, each answered by a scripted operator.

chatlog: `chatlog serve 0` with the replies piped in and the console into a pipe.
Baseline: a bare Python echo server (recv a line, send a line; no store, no console).
The client measures every turn (send to full reply) with perf_counter_ns.
"""

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import VENV_BIN, rss_mb

ECHO = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = b""
while True:
    data = conn.recv(65536)
    if not data:
        break
    buf += data
    while b"\n" in buf:
        line, _, buf = buf.partition(b"\n")
        conn.sendall(b"SERVER>reply\n")
"""


def drive(port, n, checkpoints=(), on_checkpoint=None):
    """Chat n turns; return the per-turn latencies in ns."""
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat = []
    marks = set(checkpoints)
    for i in range(n):
        t0 = time.perf_counter_ns()
        c.sendall(b"bob>message %d\n\0" % i)
        data = c.recv(4096)
        while not data.endswith(b"\n"):
            data += c.recv(4096)
        lat.append(time.perf_counter_ns() - t0)
        if i + 1 in marks and on_checkpoint:
            on_checkpoint(i + 1)
    c.close()
    return lat


def summary(lat, elapsed):
    s = sorted(lat)
    return {
        "turns_per_s": len(s) / elapsed,
        "p50_us": s[len(s) // 2] / 1000,
        "p99_us": s[int(len(s) * 0.99)] / 1000,
    }


def echo_turns(n):
    p = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline())
    t = time.perf_counter()
    lat = drive(port, n)
    elapsed = time.perf_counter() - t
    p.wait(10)
    return summary(lat, elapsed)


def chatlog_turns(n, checkpoints=()):
    """Returns (summary, {turns: server RSS in MB}, messages committed)."""
    tmp = tempfile.mkdtemp(prefix="chatlog-bench-")
    db = Path(tmp) / "turns.db"
    p = subprocess.Popen(
        [str(VENV_BIN / "chatlog"), "serve", "0", "--db", str(db), "--bind", "127.0.0.1", "--idle-timeout", "600"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ, NO_COLOR="1"),
    )
    port = int(p.stdout.readline().decode().rsplit("port ", 1)[1])
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()  # the console

    def answers():
        for i in range(n):
            p.stdin.write(b"reply %d\n" % i)
        p.stdin.flush()

    threading.Thread(target=answers, daemon=True).start()
    rss = {}
    t = time.perf_counter()
    lat = drive(port, n, checkpoints, lambda k: rss.__setitem__(k, rss_mb(p.pid)))
    elapsed = time.perf_counter() - t
    p.terminate()
    p.wait(10)
    import sqlite3

    committed = sqlite3.connect(db).execute("SELECT count(*) FROM messages").fetchone()[0]
    return summary(lat, elapsed), rss, committed
